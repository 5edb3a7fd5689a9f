"""Writing a flat dict of params as an orbax PyTree checkpoint, one tensor at a time when asked.

Orbax writes every numpy leaf of a tree concurrently (deep-copying each first), so a checkpoint of
tensors produced on demand (dequantized, transposed, cast) would hold the whole model in memory.
A ``LazyTensor`` leaf is produced only when its turn comes and released once written: converting
a model then needs about one tensor beyond the interpreter. The directory is the same orbax
PyTree checkpoint (leaves typed ``np.ndarray``) that ``StandardCheckpointer`` restores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path
from typing import Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from lin_llm.errors import LinLLMError
from lin_llm.io import checksums

# LazyTensors being written at once, in bytes (at least one, however large): writes overlap with
# producing the next tensor, and memory stays about this much beyond the interpreter
BYTES_IN_FLIGHT = 128 * 2**20


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor of known shape and dtype whose values ``load()`` produces when needed."""

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


class _OneAtATime(ocp.type_handlers.NumpyHandler):
    """Writes LazyTensor leaves in turn: load one, write it, let it go (while BYTES_IN_FLIGHT allows,
    the next is loaded while earlier ones are written). A LinLLMError raised by a load stops the
    writing and is raised again by ``save_params`` (not logged as a crash)."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)
        self.error: LinLLMError | None = None
        self.digests: dict[str, str] = {}  # param name -> sha256 of what was written

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.type_handlers.SaveArgs()] * len(values)
        return [ocp.future.CommitFutureAwaitingContractedSignals(self._in_turn(values, infos, args), name="lin_llm")]

    async def _in_turn(self, values, infos, args):
        in_flight: list[tuple[asyncio.Future, int]] = []  # writes under way and their sizes
        for value, info, arg in zip(values, infos, args):
            while in_flight and sum(n for _, n in in_flight) + value.nbytes > BYTES_IN_FLIGHT:
                await in_flight.pop(0)[0]
            try:
                array = np.asarray(value.load(), value.dtype)
            except LinLLMError as err:
                self.error = err
                break
            if array.shape != tuple(value.shape):
                raise ValueError(f"{info.name}: load() gave shape {array.shape}, declared {value.shape}")
            self.digests[info.name] = checksums.digest(array)
            # orbax 0.12's NumpyHandler coroutine that opens and writes arrays (pinned in requirements.txt)
            in_flight.append((asyncio.ensure_future(self._background_serialize([array], [info], [arg])), array.nbytes))
            del array  # the write holds it until done
        await asyncio.gather(*(write for write, _ in in_flight))


def save_params(directory: Path, flat: Mapping[str, object]) -> dict[str, str]:
    """Write ``flat`` (name -> host array or LazyTensor) as an orbax PyTree checkpoint at ``directory``,
    by this process alone: arrays concurrently, LazyTensors one at a time. Returns the sha256 of
    each array written (lin_llm.io.checksums), computed while it was in memory."""
    lazy = _OneAtATime()
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (LazyTensor, lazy),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    this = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=this, active_processes={this})
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, multiprocessing_options=options)
    tree = {name: v if isinstance(v, LazyTensor) else np.asarray(v) for name, v in flat.items()}
    ocp.Checkpointer(handler, multiprocessing_options=options).save(directory, args=ocp.args.PyTreeSave(tree))
    if lazy.error is not None:
        raise lazy.error
    arrays = {name: v for name, v in tree.items() if not isinstance(v, LazyTensor)}
    return dict(sorted({**lazy.digests, **checksums.digests(arrays)}.items()))
