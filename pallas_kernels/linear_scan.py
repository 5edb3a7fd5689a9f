"""Pallas kernels for the chunked causal linear-attention scan, forward and backward.

Per batch row and head, the padded sequence is cut into chunks of C tokens; chunk n holds Q_n,
K_n [C, D] and V_n [C, Dv]. With the chunk's causal mask M and A = Q_n K_n^T:

    S_0 = initial state,  S_{n+1} = S_n + K_n^T V_n                          (fp32)
    W   = kappa(A) * M                                 kappa: dot (identity) or relu(.)^2
    O_n = ls * W V_n + gs * Q_n S_n                     ls, gs: local_scale, global_scale

Backward, given dO_n and dS_final:

    dW = ls * (dO_n V_n^T) * M,   dA = dW * kappa'(A)
    dQ_n = dA K_n + gs * dO_n S_n^T                                (forward sweep, recomputes S_n)
    R_n  = dS_final + gs * sum_{m > n} Q_m^T dO_m                  (reverse sweep: dL/d(K_n^T V_n))
    dK_n = dA^T Q_n + V_n R_n^T,   dV_n = ls * W^T dO_n + K_n R_n,   dS_0 = R_{-1}
    d ls = sum W * (dO V^T),       d gs = sum Q * (dO S^T)   (summed over chunks, rows and heads)

Three kernels each sweep the chunks in order carrying one fp32 [D, Dv] state: forward (S),
dq (S again, plus the two scale-gradient sums) and dkv (R, reversed). Products of two inputs run
in the inputs' dtype with fp32 accumulation; products with a state run in fp32.

The value dimension may be split into blocks of columns (BlockSizes) for parallelism: outputs per
value column need only those columns, while dq and dk are sums over blocks (added up in XLA).

This module holds everything both backends share: the per-chunk math above, the operands' block
specs and what one chunk reads and writes (`Sweep`), the padding, the custom_vjp wiring and the
public functions. The backends differ only in how they iterate over the chunks and where the
state lives: tpu.py (Mosaic: a grid axis over chunks, "arbitrary", state in VMEM scratch) and
gpu.py (Triton: a loop over chunks inside each program, state in registers).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import gpu, reference, tpu
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.reference import F32, LOCAL_KERNELS, kappa

_BACKENDS = {"tpu": tpu, "gpu": gpu}
BACKENDS = tuple(_BACKENDS)
PLATFORM_KINDS = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "cpu": "cpu"}  # jax platform -> kind
BACKWARDS = ("pallas", "xla")


@dataclasses.dataclass(frozen=True)
class _Config:
    chunk: int
    kernel: str
    backend: str
    interpret: bool | pltpu.InterpretParams
    backward: str
    blocks: BlockSizes


# --------------------------------------------------------------------------- per-chunk math


def _mm(a, b):
    """a @ b with fp32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _mm_nt(a, b):
    """a @ b^T with fp32 accumulation (the transposed-rhs form both Mosaic and Triton take natively)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


# a^T @ b is written as an explicit 2-D transpose and a plain matmul, the form JAX's own TPU
# flash-attention backward uses; fp32 operands are transposed before being cast down.


def _kappa_grad(kind, score):
    return jnp.ones_like(score) if kind == "dot" else 2.0 * jnp.maximum(score, 0.0)


def _causal(c):
    return lax.broadcasted_iota(jnp.int32, (c, c), 0) >= lax.broadcasted_iota(jnp.int32, (c, c), 1)


def _total(x):
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)  # [1, 1]: no 0-d vectors


# Each step maps (kernel kind, ls, gs, state, chunks of the inputs) to (next state, chunks of the
# outputs, the chunk's two [1, 1] scale-gradient sums or None); its name names the pallas_call.


def _fwd_step(kind, ls, gs, s, q, k, v):
    w = jnp.where(_causal(q.shape[0]), kappa(kind, _mm_nt(q, k)), 0.0)
    out = ls * _mm(w.astype(v.dtype), v) + gs * _mm(q.astype(F32), s)
    return s + _mm(k.T, v), (out,), None


def _dq_step(kind, ls, gs, s, q, k, v, do):
    mask = _causal(q.shape[0])
    a = _mm_nt(q, k)
    do_v = _mm_nt(do, v)
    w = jnp.where(mask, kappa(kind, a), 0.0)
    da = jnp.where(mask, ls * do_v * _kappa_grad(kind, a), 0.0)
    do_s = _mm_nt(do.astype(F32), s)
    dq = _mm(da.astype(k.dtype), k) + gs * do_s
    sums = (_total(w * do_v), _total(q.astype(F32) * do_s))
    return s + _mm(k.T, v), (dq,), sums


def _dkv_step(kind, ls, gs, r, q, k, v, do):
    mask = _causal(q.shape[0])
    a = _mm_nt(q, k)
    w = jnp.where(mask, kappa(kind, a), 0.0)
    da = jnp.where(mask, ls * _mm_nt(do, v) * _kappa_grad(kind, a), 0.0)
    dk = _mm(da.T.astype(q.dtype), q) + _mm_nt(v.astype(F32), r)
    dv = ls * _mm(w.T.astype(do.dtype), do) + _mm(k.astype(F32), r)
    return r + gs * _mm(q.T, do), (dk, dv), None


# --------------------------------------------------------------------------- one sweep = one pallas_call


@dataclasses.dataclass(frozen=True)
class _Seq:
    """A [B, H, Tp, W] operand read or written chunk by chunk; split: W is the value dim, cut in value blocks.

    Unsplit outputs (dq, dk) are partial sums over value blocks, so they get a leading block axis.
    """

    split: bool
    dtype: object = None  # outputs only


class Refs(NamedTuple):
    """A kernel's refs by role; final and sums are None where the sweep does not write them."""

    scales: object  # [2]: local_scale, global_scale
    seqs: tuple
    state0: object
    outs: tuple
    final: object
    sums: object
    scratch: tuple


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One pallas_call: `step` over the n chunks of every (value block, batch, head), carrying an fp32 state.

    Everything the two backends share: shapes, block specs and what one chunk reads and writes. The
    grid starts (value block, batch, head) on both; a backend may add axes (TPU: the chunk).
    """

    step: Callable  # a *_step with its kernel kind bound
    ins: tuple[_Seq, ...]
    outs: tuple[_Seq, ...]
    reverse: bool
    emit_state: bool
    with_sums: bool
    shape: tuple[int, int, int, int, int]  # b, h, tp, dp, dvp
    chunk: int
    value_block: int
    blocks: BlockSizes
    interpret: bool | pltpu.InterpretParams

    @property
    def grid(self):
        b, h, _, _, dvp = self.shape
        return dvp // self.value_block, b, h

    @property
    def n_chunks(self):
        return self.shape[2] // self.chunk

    @property
    def name(self):
        return f"linear_scan_{self.step.func.__name__.lstrip('_')}"

    def chunk_at(self, i):
        """The chunk visited i-th."""
        return self.n_chunks - 1 - i if self.reverse else i

    def out_shape(self):
        nv, b, h = self.grid
        _, _, tp, dp, dvp = self.shape
        shapes = [jax.ShapeDtypeStruct((b, h, tp, dvp) if s.split else (nv, b, h, tp, dp), s.dtype) for s in self.outs]
        if self.emit_state:
            shapes.append(jax.ShapeDtypeStruct((b, h, dp, dvp), F32))
        if self.with_sums:
            shapes.append(jax.ShapeDtypeStruct((nv, b, h) + self.blocks.acc_tile, F32))
        return shapes

    def specs(self, scales_spec, rows, row_block):
        """(in_specs, out_specs): sequences in blocks of `rows` tokens at row_block(*grid axes after the head)."""
        dp, bv = self.shape[3], self.value_block

        def seq(s, is_out):
            if s.split:
                return pl.BlockSpec((None, None, rows, bv), lambda iv, ib, ih, *i: (ib, ih, row_block(*i), iv))
            if is_out:
                return pl.BlockSpec((None, None, None, rows, dp), lambda iv, ib, ih, *i: (iv, ib, ih, row_block(*i), 0))
            return pl.BlockSpec((None, None, rows, dp), lambda iv, ib, ih, *i: (ib, ih, row_block(*i), 0))

        state = pl.BlockSpec((None, None, dp, bv), lambda iv, ib, ih, *_: (ib, ih, 0, iv))
        outs = [seq(s, True) for s in self.outs] + [state] * self.emit_state
        if self.with_sums:
            outs.append(pl.BlockSpec((None, None, None) + self.blocks.acc_tile, lambda iv, ib, ih, *_: (iv, ib, ih, 0, 0)))
        return [scales_spec] + [seq(s, False) for s in self.ins] + [state], outs

    def refs(self, refs) -> Refs:
        n_in, n_out = len(self.ins), len(self.outs)
        rest = list(refs[2 + n_in + n_out :])
        final = rest.pop(0) if self.emit_state else None
        sums = rest.pop(0) if self.with_sums else None
        return Refs(refs[0], refs[1 : 1 + n_in], refs[1 + n_in], refs[2 + n_in : 2 + n_in + n_out], final, sums,
                    tuple(rest))

    def run_chunk(self, r: Refs, state, at):
        """One chunk at index `at` of the sequence refs: read the inputs, write the outputs; (new state, sums)."""
        state, outs, sums = self.step(r.scales[0], r.scales[1], state, *(ref[at] for ref in r.seqs))
        for ref, val in zip(r.outs, outs):
            ref[at] = val.astype(ref.dtype)
        return state, sums

    def pack_sums(self, sums):
        """The two [1, 1] sums as the acc tile: row 0 d local_scale, row 1 d global_scale, zeros elsewhere."""
        row = lax.broadcasted_iota(jnp.int32, self.blocks.acc_tile, 0)
        return jnp.where(row == 0, sums[0], jnp.where(row == 1, sums[1], 0.0))


def _sweep(cfg: _Config, dims, step, scales, state0, seqs_in, ins, outs, *, reverse, emit_state, with_sums):
    """Run `step` over the chunks on cfg's backend. Returns the sequence outputs, then the final state if
    emit_state, then the summed-scalar tiles [NV, B, H, *acc_tile] if with_sums."""
    b, h = seqs_in[0].shape[:2]
    plan = Sweep(functools.partial(step, cfg.kernel), tuple(ins), tuple(outs), reverse, emit_state, with_sums,
                 (b, h, dims.tp, dims.dp, dims.dvp), cfg.chunk, dims.bv, cfg.blocks, cfg.interpret)
    return _BACKENDS[cfg.backend].sweep(plan, scales, seqs_in, state0)


# --------------------------------------------------------------------------- layout


class _Dims(NamedTuple):
    t: int
    d: int
    dv: int
    tp: int  # T padded to whole chunks
    dp: int  # head dims padded to what the backend tiles
    dvp: int  # ... and to whole value blocks
    bv: int  # the value block


def _dims(cfg, q, v) -> _Dims:
    t, d, dv = q.shape[1], q.shape[3], v.shape[3]
    return _Dims(t, d, dv, pl.cdiv(t, cfg.chunk) * cfg.chunk, *_BACKENDS[cfg.backend].layout(d, dv, cfg.blocks))


def _to_kernel(x, tp, wp):
    """[B, T, H, W] -> zero-padded [B, H, Tp, Wp]; zero rows add nothing to any state or score."""
    _, t, _, w = x.shape
    return jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, wp - w))).transpose(0, 2, 1, 3)


def _from_kernel(x, t, w):
    return x[:, :, :t, :w].transpose(0, 2, 1, 3)


def _pad_state(s, dp, dvp):
    return jnp.pad(s, ((0, 0), (0, 0), (0, dp - s.shape[2]), (0, dvp - s.shape[3])))


# --------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, s0, scales):
    return _forward(cfg, q, k, v, s0, scales)


def _forward(cfg, q, k, v, s0, scales):
    n = _dims(cfg, q, v)
    out, final = _sweep(
        cfg, n, _fwd_step, scales, _pad_state(s0, n.dp, n.dvp),
        [_to_kernel(q, n.tp, n.dp), _to_kernel(k, n.tp, n.dp), _to_kernel(v, n.tp, n.dvp)],
        [_Seq(False), _Seq(False), _Seq(True)], [_Seq(True, v.dtype)],
        reverse=False, emit_state=True, with_sums=False,
    )
    return _from_kernel(out, n.t, n.dv), final[:, :, :n.d, :n.dv]


def _attention_fwd(cfg, q, k, v, s0, scales):
    return _forward(cfg, q, k, v, s0, scales), (q, k, v, s0, scales)


def _xla_backward(cfg, residuals, cotangents):
    """The debug backward: autodiff of the XLA form."""
    def xla(q, k, v, s0, scales):
        out, final = reference.chunked(q, k, v, chunk_size=cfg.chunk, local_kernel=cfg.kernel, initial_state=s0,
                                       local_scale=scales[0], global_scale=scales[1])
        return out.astype(v.dtype), final

    return jax.vjp(xla, *residuals)[1](cotangents)


def _attention_bwd(cfg, residuals, cotangents):
    if cfg.backward == "xla":
        return _xla_backward(cfg, residuals, cotangents)
    q, k, v, s0, scales = residuals
    d_out, d_final = cotangents
    n = _dims(cfg, q, v)
    seqs = [_to_kernel(x, n.tp, w) for x, w in ((q, n.dp), (k, n.dp), (v, n.dvp), (d_out, n.dvp))]
    kinds = [_Seq(False), _Seq(False), _Seq(True), _Seq(True)]
    partial_dtype = lambda x: x.dtype if n.dvp == n.bv else F32  # dq, dk: partial sums over value blocks

    dq, sums = _sweep(cfg, n, _dq_step, scales, _pad_state(s0, n.dp, n.dvp), seqs, kinds,
                      [_Seq(False, partial_dtype(q))], reverse=False, emit_state=False, with_sums=True)
    dk, dv, d_s0 = _sweep(cfg, n, _dkv_step, scales, _pad_state(d_final, n.dp, n.dvp), seqs, kinds,
                          [_Seq(False, partial_dtype(k)), _Seq(True, v.dtype)], reverse=True, emit_state=True,
                          with_sums=False)
    sums = jnp.sum(sums[..., :2, 0], axis=(0, 1, 2))
    return (
        _from_kernel(jnp.sum(dq, axis=0, dtype=F32).astype(q.dtype), n.t, n.d),
        _from_kernel(jnp.sum(dk, axis=0, dtype=F32).astype(k.dtype), n.t, n.d),
        _from_kernel(dv, n.t, n.dv),
        d_s0[:, :, :n.d, :n.dv],
        sums.astype(scales.dtype),
    )


_attention.defvjp(_attention_fwd, _attention_bwd)


# --------------------------------------------------------------------------- public API


def _resolve_backend(backend, interpret):
    if backend is None:
        platform = jax.default_backend()
        if PLATFORM_KINDS.get(platform) in BACKENDS:
            return PLATFORM_KINDS[platform]
        if interpret:
            return "tpu"  # on CPU the interpreter runs the TPU kernels unless told otherwise
        raise ValueError(
            f"Pallas kernels need a TPU or GPU, and this process runs on {platform!r}: pass interpret=True "
            "(tests), use the XLA form (pallas_kernels.select_impl('xla')), or pass backend= to lower for "
            "another platform"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS} (or None: from the platform)")
    return backend


def _check(q, k, v, initial_state, chunk_size, local_kernel, backend, backward, interpret, blocks):
    if isinstance(interpret, pltpu.InterpretParams) and backend != "tpu":
        raise ValueError("interpret=pltpu.InterpretParams(...) is the TPU interpreter: use it with backend='tpu'")
    if local_kernel not in LOCAL_KERNELS:
        raise ValueError(f"local_kernel={local_kernel!r} is not one of {LOCAL_KERNELS}")
    if backward not in BACKWARDS:
        raise ValueError(f"backward={backward!r} is not one of {BACKWARDS}")
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"need q, k [B, T, H, D] and v [B, T, H, Dv]; got q {q.shape}, k {k.shape}, v {v.shape}")
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, _, h, d = q.shape
    if initial_state is not None and initial_state.shape != (b, h, d, v.shape[3]):
        raise ValueError(f"initial_state must be [B, H, D, Dv] = {(b, h, d, v.shape[3])}; got {initial_state.shape}")
    if not isinstance(blocks, BlockSizes):
        raise ValueError(f"blocks={blocks!r} is not a pallas_kernels.BlockSizes")
    _BACKENDS[backend].check_chunk(chunk_size)


def chunked_linear_attention(q, k, v, *, chunk_size, local_kernel, initial_state=None, return_final_state=False,
                             interpret=False, local_scale=1.0, global_scale=1.0, backend=None, backward="pallas",
                             blocks=BlockSizes()):
    """Chunked causal linear attention as Pallas kernels, differentiable (custom_vjp).

    q, k [B, T, H, D], v [B, T, H, Dv], one floating dtype; used as given (feature maps and
    normalising q, k are the caller's job; no denominator: see `chunked_linear_attention_normalized`).
    Token t sits in chunk t // chunk_size; chunks start at t = 0, and initial_state (fp32
    [B, H, D, Dv], default zeros) is the global state before token 0:

        out_t = local_scale * sum_{j <= t, same chunk} kappa(q_t . k_j) v_j + global_scale * q_t S_{chunk(t)}
        S_n   = initial_state + sum_{j < n * chunk_size} k_j^T v_j

    local_kernel "dot": kappa = identity, so with both scales 1 this is plain causal linear
    attention and chunk_size is only a tiling choice; "relu2": kappa(x) = relu(x)^2 (the paper's
    grouped form). local_scale and global_scale may be traced scalars and get gradients.

    Returns out [B, T, H, Dv] in v's dtype; with return_final_state also the fp32 final state
    initial_state + sum over *all* T tokens of k_t^T v_t (the last, partial chunk folded in). It
    continues the sequence exactly when the next call starts on a chunk boundary (T a multiple of
    chunk_size), or anywhere for "dot" with equal scales.

    backend: "tpu" | "gpu" | None (from the platform; the TPU kernels when interpreting on CPU).
    interpret: True runs the kernels in Pallas' generic interpreter (CPU tests); a
    pltpu.InterpretParams runs the TPU kernels in the TPU-semantics interpreter (uninitialised
    memory as NaN, race detection). backward: "pallas" (the kernels) or "xla" (autodiff of
    pallas_kernels.reference.chunked, for debugging). blocks: the kernels' tiling (`BlockSizes`).
    """
    backend = _resolve_backend(backend, interpret)
    _check(q, k, v, initial_state, chunk_size, local_kernel, backend, backward, interpret, blocks)
    b, _, h, d = q.shape
    s0 = jnp.zeros((b, h, d, v.shape[3]), F32) if initial_state is None else initial_state.astype(F32)
    scales = jnp.stack([jnp.asarray(local_scale, F32), jnp.asarray(global_scale, F32)])
    interpret = interpret if isinstance(interpret, pltpu.InterpretParams) else bool(interpret)
    cfg = _Config(chunk=chunk_size, kernel=local_kernel, backend=backend, interpret=interpret, backward=backward,
                  blocks=blocks)
    out, final = _attention(cfg, q, k, v, s0, scales)
    return (out, final) if return_final_state else out


def normalized(attention, q, k, v, *, eps=1e-6, initial_state=None, return_final_state=False, **kwargs):
    """Normalised linear attention (elu+1-style families) on top of an un-normalised `attention`.

    The denominator is fused: one ones column appended to v makes the same scan return
    den_t = local_scale * sum kappa(q_t . k_j) + global_scale * q_t z_{chunk(t)} next to the
    numerator, z being the running sum of k. out = num / (den + eps), as lin_llm.attention.linear
    does. initial_state is (S [B, H, D, Dv], z [B, H, D]) and so is the final state.
    """
    ones = jnp.ones(v.shape[:3] + (1,), v.dtype)
    if initial_state is not None:
        s0, z0 = initial_state
        initial_state = jnp.concatenate([s0.astype(F32), z0.astype(F32)[..., None]], axis=-1)
    res = attention(q, k, jnp.concatenate([v, ones], axis=-1), initial_state=initial_state,
                    return_final_state=return_final_state, **kwargs)
    out, final = res if return_final_state else (res, None)
    num, den = out[..., :-1].astype(F32), out[..., -1:].astype(F32)
    out = (num / (den + eps)).astype(v.dtype)
    return (out, (final[..., :-1], final[..., -1])) if return_final_state else out


def chunked_linear_attention_normalized(q, k, v, *, chunk_size, local_kernel="dot", eps=1e-6, initial_state=None,
                                        return_final_state=False, interpret=False, local_scale=1.0,
                                        global_scale=1.0, backend=None, backward="pallas", blocks=BlockSizes()):
    """`chunked_linear_attention` divided by its own sum of scores (see `normalized`); v gets one extra
    column, which costs a padded value block when Dv is already a multiple of the tile (e.g. 128)."""
    return normalized(chunked_linear_attention, q, k, v, eps=eps, initial_state=initial_state,
                      return_final_state=return_final_state, chunk_size=chunk_size, local_kernel=local_kernel,
                      interpret=interpret, local_scale=local_scale, global_scale=global_scale, backend=backend,
                      backward=backward, blocks=blocks)
