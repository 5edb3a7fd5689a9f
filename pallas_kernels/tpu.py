"""The TPU (Mosaic) backend of the chunked scan: how it iterates over chunks and where the state lives.

The grid is (value block, batch, head, chunk) with semantics (parallel, parallel, parallel,
arbitrary): the chunk axis runs in order on one core, so the state is carried across it in a VMEM
scratch buffer, set from the initial state at the first chunk. The scale-gradient sums accumulate
in their output block, which stays resident across the chunk axis; the scales are read from SMEM.
Sequence blocks are (chunk, 128k) tiles, which satisfy Mosaic's (8, 128) tiling.

The math, specs and ref roles come from linear_scan.Sweep (passed in, not imported: linear_scan
dispatches here).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.reference import F32

LANES = 128


def check_chunk(chunk_size):
    if chunk_size < 16 or chunk_size % 16:
        raise ValueError(f"chunk_size={chunk_size}: the TPU kernels need a multiple of 16 (bf16 sublane tiling)")


def layout(d, dv, blocks):
    """(Dp, Dvp, value block): head dims padded to whole lanes, Dvp to whole value blocks."""
    lanes = lambda x, m=LANES: pl.cdiv(x, m) * m
    bv = min(blocks.tpu_value_block or lanes(dv), lanes(dv))
    return lanes(d), lanes(dv, bv), bv


def _kernel(plan, *refs):
    r = plan.refs(refs)
    (state_ref,) = r.scratch
    i = pl.program_id(3)

    @pl.when(i == 0)
    def _():
        state_ref[...] = r.state0[...]
        if r.sums is not None:
            r.sums[...] = jnp.zeros(r.sums.shape, F32)

    state, sums = plan.run_chunk(r, state_ref[...], ...)
    state_ref[...] = state
    if r.sums is not None:
        r.sums[...] += plan.pack_sums(sums)
    if r.final is not None:
        @pl.when(i == plan.n_chunks - 1)
        def _():
            r.final[...] = state


def sweep(plan, scales, seqs, state0):
    """Run a linear_scan.Sweep as one Mosaic pallas_call."""
    in_specs, out_specs = plan.specs(pl.BlockSpec(memory_space=pltpu.SMEM), plan.chunk, plan.chunk_at)
    call = pl.pallas_call(
        functools.partial(_kernel, plan),
        out_shape=plan.out_shape(),
        grid=plan.grid + (plan.n_chunks,),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((plan.shape[3], plan.value_block), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=plan.interpret,
        name=plan.name,
    )
    return call(scales, *seqs, state0)
