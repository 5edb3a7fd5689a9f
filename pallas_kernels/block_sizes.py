"""The kernels' tiling choices: they change speed and memory use, never results (beyond fp32 summation order)."""

from __future__ import annotations

import dataclasses


def _power_of_two(x) -> bool:
    return isinstance(x, int) and x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes of the chunked-scan kernels, checked when built.

    The value dimension Dv is cut into blocks of columns, one program per (value block, batch,
    head): more blocks mean more parallel programs and a smaller state tile per program, but dq
    and dk become partial sums over blocks (fp32, added up in XLA). The chunk size is not here:
    for relu2 it is the model's group size, part of the math.
    """

    tpu_value_block: int | None = None  # TPU: value columns per program (a multiple of 128); None: all of Dv
    gpu_value_block: int = 64  # Triton: value columns per program (a power of two >= 16)
    gpu_num_warps: int | None = None  # Triton: None is 4 while the state tile (D x value block) is <= 64 x 64, else 8
    gpu_num_stages: int = 2  # Triton software pipelining depth
    acc_tile: tuple[int, int] = (8, 128)  # the scale-gradient sums' output tile: row 0 d ls, row 1 d gs (one TPU vreg)

    def __post_init__(self):
        v = self.tpu_value_block
        if v is not None and not (isinstance(v, int) and v > 0 and v % 128 == 0):
            raise ValueError(f"BlockSizes.tpu_value_block={v!r}: need a positive multiple of 128 (TPU lanes), or None")
        if not (_power_of_two(self.gpu_value_block) and self.gpu_value_block >= 16):
            raise ValueError(f"BlockSizes.gpu_value_block={self.gpu_value_block!r}: need a power of two >= 16 (Triton)")
        if self.gpu_num_warps is not None and not (_power_of_two(self.gpu_num_warps) and self.gpu_num_warps <= 32):
            raise ValueError(f"BlockSizes.gpu_num_warps={self.gpu_num_warps!r}: need a power of two <= 32, or None")
        if not (isinstance(self.gpu_num_stages, int) and self.gpu_num_stages >= 1):
            raise ValueError(f"BlockSizes.gpu_num_stages={self.gpu_num_stages!r}: need an int >= 1")
        tile = self.acc_tile
        if not (isinstance(tile, tuple) and len(tile) == 2 and all(map(_power_of_two, tile)) and tile[0] >= 2):
            raise ValueError(f"BlockSizes.acc_tile={tile!r}: need (rows, columns), powers of two, rows >= 2")

    def num_warps(self, state_elements: int) -> int:
        """Triton warps for a program holding a state tile of `state_elements` fp32 values."""
        if self.gpu_num_warps is not None:
            return self.gpu_num_warps
        return 4 if state_elements <= 64 * 64 else 8
