"""The GPU (Triton) backend of the chunked scan: how it iterates over chunks and where the state lives.

The grid is (value block, batch, head); GPU programs run in no fixed order, so each program loops
over its chunks itself, carrying the state (and the scale-gradient sums) in registers, and sees
the whole padded sequence of its (batch, head) as one block. Lowered through Triton
(`compiler_params=pallas.triton.CompilerParams`), whose blocks are powers of two.

The math, specs and ref roles come from linear_scan.Sweep (passed in, not imported: linear_scan
dispatches here).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.reference import F32


def check_chunk(chunk_size):
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size}: the Triton kernels need a power of two >= 16")


def layout(d, dv, blocks):
    """(Dp, Dvp, value block): head dims padded to powers of two >= 16, which the value block divides."""
    pow2 = lambda x: max(16, pl.next_power_of_2(x))
    return pow2(d), pow2(dv), min(blocks.gpu_value_block, pow2(dv))


def _kernel(plan, *refs):
    r = plan.refs(refs)
    c = plan.chunk

    def body(j, carry):
        state, sums = carry
        rows = pl.ds(pl.multiple_of(plan.chunk_at(j) * c, c), c)
        state, new = plan.run_chunk(r, state, (rows, slice(None)))
        return state, (tuple(a + b for a, b in zip(sums, new)) if r.sums is not None else sums)

    zero = jnp.zeros((1, 1), F32)
    state, sums = lax.fori_loop(0, plan.n_chunks, body, (r.state0[...], (zero, zero) if r.sums is not None else ()))
    if r.final is not None:
        r.final[...] = state
    if r.sums is not None:
        r.sums[...] = plan.pack_sums(sums)


def sweep(plan, scales, seqs, state0):
    """Run a linear_scan.Sweep as one Triton pallas_call."""
    in_specs, out_specs = plan.specs(pl.BlockSpec((2,), lambda *_: (0,)), plan.shape[2], lambda: 0)
    call = pl.pallas_call(
        functools.partial(_kernel, plan),
        out_shape=plan.out_shape(),
        grid=plan.grid,
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=pltriton.CompilerParams(num_warps=plan.blocks.num_warps(plan.shape[3] * plan.value_block),
                                                num_stages=plan.blocks.gpu_num_stages),
        interpret=plan.interpret,
        name=plan.name,
    )
    return call(scales, *seqs, state0)
