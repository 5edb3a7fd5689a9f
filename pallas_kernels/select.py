"""Choosing the implementation of the chunked scan from a config flag and the platform."""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels import linear_scan, reference
from pallas_kernels.block_sizes import BlockSizes

IMPL_FLAGS = ("auto", "xla", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class Impl:
    """The resolved implementation: name is "xla", "pallas" or "pallas_interpret"; backend is the
    kernels' target ("tpu" | "gpu", None for xla); blocks their tiling (unused by xla). Calling it
    runs chunked_linear_attention's contract."""

    name: str
    backend: str | None
    blocks: BlockSizes = BlockSizes()

    def __call__(self, q, k, v, *, chunk_size, local_kernel, initial_state=None, return_final_state=False,
                 local_scale=1.0, global_scale=1.0):
        kwargs = dict(chunk_size=chunk_size, local_kernel=local_kernel, initial_state=initial_state,
                      return_final_state=return_final_state, local_scale=local_scale, global_scale=global_scale)
        if self.name == "xla":
            return reference.chunked_linear_attention(q, k, v, **kwargs)
        return linear_scan.chunked_linear_attention(q, k, v, interpret=self.name == "pallas_interpret",
                                                    backend=self.backend, blocks=self.blocks, **kwargs)

    def normalized(self, q, k, v, *, eps=1e-6, initial_state=None, return_final_state=False, **kwargs):
        """The normalised form (elu+1-style families) through the same implementation."""
        return linear_scan.normalized(self, q, k, v, eps=eps, initial_state=initial_state,
                                      return_final_state=return_final_state, **kwargs)


def select_impl(flag: str, platform: str | None = None, blocks: BlockSizes = BlockSizes()) -> Impl:
    """Map model.attention_impl (auto | xla | pallas | pallas_interpret) and the platform
    (default jax.default_backend()) to an implementation; blocks: the kernels' tiling.

    auto: the Pallas kernels on TPU and GPU, XLA on CPU. pallas on CPU is an error (the kernels
    only run interpreted there). pallas_interpret runs the interpreter with the platform's
    kernels (the TPU ones on CPU).
    """
    if flag not in IMPL_FLAGS:
        raise ValueError(f"attention_impl={flag!r} is not one of {IMPL_FLAGS}")
    platform = jax.default_backend() if platform is None else platform
    if platform not in linear_scan.PLATFORM_KINDS:
        raise ValueError(f"platform={platform!r} is not one of {tuple(linear_scan.PLATFORM_KINDS)}")
    kind = linear_scan.PLATFORM_KINDS[platform]
    if flag == "auto":
        flag = "xla" if kind == "cpu" else "pallas"
    if flag == "xla":
        return Impl("xla", None)
    if flag == "pallas" and kind == "cpu":
        raise ValueError("attention_impl='pallas' needs a TPU or GPU; on CPU use 'xla' (or 'pallas_interpret' to test)")
    return Impl(flag, "tpu" if kind == "cpu" else kind, blocks)
