"""Pallas chunked linear-attention kernels: interpret mode on CPU against the library's reference,
and lowering for TPU (Mosaic) and GPU (Triton) at LLaMA-2-7B layer shapes.

LIN_LLM_PALLAS_COMPILED=1 (`make gpu-check`) runs every kernel case compiled for this machine's
GPU instead of in the interpreter, and refuses to start without a GPU rather than skip.

Oracle: lin_llm.attention.linear.reference (the O(T^2) masked formula) plus the initial state's
term global_scale * q S_0; the final state is S_0 + sum_t k_t^T v_t. Errors are measured relative
to the largest magnitude of the compared quantity.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from lin_llm.attention import feature_maps
from lin_llm.attention import linear as lin
from pallas_kernels import reference

F32 = jnp.float32
COMPILED = os.environ.get("LIN_LLM_PALLAS_COMPILED", "") == "1"
if COMPILED:
    if jax.default_backend() != "gpu":
        raise RuntimeError(f"LIN_LLM_PALLAS_COMPILED=1 needs a GPU, and JAX runs on {jax.default_backend()!r}")
    # Triton takes fp32 dots as TF32 unless told otherwise; the fp32 cases check the kernels' math
    # against the fp32 oracle, so they run at full precision (bf16 cases are unaffected).
    jax.config.update("jax_default_matmul_precision", "highest")


def _run(backend):
    """How a kernel case runs: the case's kernels in the interpreter, or compiled on the GPU."""
    return dict(interpret=False, backend="gpu") if COMPILED else dict(interpret=True, backend=backend)


# fp32: products are exact-ish and sums run over <= 1000 terms in a different order than the
# oracle's; sqrt(1000) * 2^-24 ~ 2e-6 typical, and bugs show up as O(1) relative errors.
FP32_TOL = 2e-5


def _inputs(seed, t, d, dv, dtype, b=1, h=2, with_state=True):
    """q, k with q . k ~ N(0, 1) (so relu^2 neither vanishes nor explodes), v ~ N(0, 1), and S_0."""
    ks = jax.random.split(jax.random.key(seed), 6)
    q = (jax.random.normal(ks[0], (b, t, h, d)) * d**-0.25).astype(dtype)
    k = (jax.random.normal(ks[1], (b, t, h, d)) * d**-0.25).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, h, dv)).astype(dtype)
    s0 = jax.random.normal(ks[3], (b, h, d, dv)) if with_state else None
    d_out = jax.random.normal(ks[4], (b, t, h, dv))
    d_state = jax.random.normal(ks[5], (b, h, d, dv))
    return q, k, v, s0, d_out, d_state


def oracle(q, k, v, s0, ls, gs, *, chunk_size, local_kernel):
    """(out, final state) in fp32 from the library's O(T^2) reference."""
    q, k, v = (x.astype(F32) for x in (q, k, v))
    spec = lin.LinearSpec(group_size=chunk_size, local_kernel=local_kernel, use_global=True, normalize=False)
    out = lin.reference(spec, q, k, v, ls, gs)
    final = jnp.einsum("bthf,bthd->bhfd", k, v, precision="highest")
    if s0 is not None:
        out = out + gs * jnp.einsum("bthf,bhfd->bthd", q, s0, precision="highest")
        final = final + s0
    return out, final


def _loss(fn, d_out, d_state):
    """A scalar touching every output, with random cotangents (sum() would hide sign errors)."""
    def loss(q, k, v, s0, ls, gs):
        out, final = fn(q, k, v, s0, ls, gs)
        return jnp.sum(out.astype(F32) * d_out) + jnp.sum(final * d_state)
    return loss


def _value_and_grads(fn, args, d_out, d_state):
    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    outs = jax.jit(fn)(*args)
    grads = jax.jit(jax.grad(_loss(fn, d_out, d_state), argnums=argnums))(*args)
    return outs, dict(zip(argnums, grads))


def _kernel_fn(chunk_size, local_kernel, backend, backward="pallas", blocks=pallas_kernels.BlockSizes()):
    def fn(q, k, v, s0, ls, gs):
        return pallas_kernels.chunked_linear_attention(
            q, k, v, chunk_size=chunk_size, local_kernel=local_kernel, initial_state=s0, return_final_state=True,
            local_scale=ls, global_scale=gs, backward=backward, blocks=blocks, **_run(backend))
    return fn


def _rel(a, b, scale=None):
    """max |a - b| relative to `scale`, by default the largest |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b)) if scale is None else scale
    return float(np.max(np.abs(a - b)) / max(scale, 1e-30))


def _grad_scales(args, d_out, chunk_size, local_kernel):
    """Error scales of the gradients: max |.| for tensors; for the two scale gradients, which are
    sums of dO * local (dO * global) over every output element and cancel heavily under a random
    dO, the sum of the terms' magnitudes (the natural error scale of a long dot product)."""
    q, k, v, s0 = (x.astype(F32) if x is not None else None for x in args[:4])
    local = oracle(q, k, v, None, 1.0, 0.0, chunk_size=chunk_size, local_kernel=local_kernel)[0]
    glob = oracle(q, k, v, s0, 0.0, 1.0, chunk_size=chunk_size, local_kernel=local_kernel)[0]
    return {4: float(jnp.sum(jnp.abs(d_out * local))), 5: float(jnp.sum(jnp.abs(d_out * glob)))}


NAMES = {0: "q", 1: "k", 2: "v", 3: "initial_state", 4: "local_scale", 5: "global_scale"}

# (T, head dim, chunk, local kernel, initial state?, backend, value dim): every T x head dim x
# chunk combination once, kernels / state / backends spread over them.
FP32_CASES = [
    (63, 60, 64, "relu2", True, "tpu", 60),
    (63, 64, 64, "dot", False, "gpu", 64),
    (63, 60, 128, "dot", True, "gpu", 60),
    (63, 64, 128, "relu2", False, "tpu", 64),
    (500, 60, 64, "dot", False, "tpu", 60),
    (500, 64, 64, "relu2", True, "gpu", 64),
    (500, 60, 128, "relu2", False, "gpu", 60),
    (500, 64, 128, "dot", True, "tpu", 64),
    (1000, 60, 64, "relu2", False, "tpu", 60),
    (1000, 64, 64, "dot", True, "tpu", 64),
    (1000, 60, 128, "relu2", True, "tpu", 60),
    (1000, 64, 128, "dot", False, "gpu", 64),
    # a value dim != head dim, split into two value blocks by the GPU kernels
    (500, 64, 64, "relu2", True, "gpu", 96),
]


@pytest.mark.parametrize("t,d,chunk,kind,with_state,backend,dv", FP32_CASES)
def test_forward_and_gradients_fp32(t, d, chunk, kind, with_state, backend, dv):
    q, k, v, s0, d_out, d_state = _inputs(t + d + chunk, t, d, dv, F32, with_state=with_state)
    # gs = 0 is the paper's init of alpha: its gradient must still flow
    ls, gs = jnp.float32(0.7), jnp.float32(0.0 if kind == "relu2" and not with_state else 1.3)
    args = (q, k, v, s0, ls, gs)
    got, got_grads = _value_and_grads(_kernel_fn(chunk, kind, backend), args, d_out, d_state)
    want, want_grads = _value_and_grads(
        lambda *a: oracle(*a, chunk_size=chunk, local_kernel=kind), args, d_out, d_state)
    assert got[0].shape == (1, t, 2, dv) and got[0].dtype == F32
    assert _rel(got[0], want[0]) < FP32_TOL, "out"
    assert _rel(got[1], want[1]) < FP32_TOL, "final state"
    assert set(got_grads) == set(want_grads)
    scales = _grad_scales(args, d_out, chunk, kind)
    for i in got_grads:
        assert got_grads[i].shape == want_grads[i].shape, NAMES[i]
        assert _rel(got_grads[i], want_grads[i], scales.get(i)) < FP32_TOL, NAMES[i]


def test_tpu_semantics_interpreter():
    """The TPU kernels under the TPU-semantics interpreter, where fresh buffers start as NaN: a
    state or accumulator read before it is initialised, or an output block left unwritten, shows."""
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, s0, d_out, d_state = _inputs(19, 200, 60, 60, F32)
    args = (q, k, v, s0, jnp.float32(0.7), jnp.float32(1.3))
    params = pltpu.InterpretParams(uninitialized_memory="nan")

    def fn(q, k, v, s0, ls, gs):
        return pallas_kernels.chunked_linear_attention(
            q, k, v, chunk_size=64, local_kernel="relu2", initial_state=s0, return_final_state=True,
            interpret=params, local_scale=ls, global_scale=gs, backend="tpu")

    got, got_grads = _value_and_grads(fn, args, d_out, d_state)
    want, want_grads = _value_and_grads(lambda *a: oracle(*a, chunk_size=64, local_kernel="relu2"), args, d_out,
                                        d_state)
    assert _rel(got[0], want[0]) < FP32_TOL and _rel(got[1], want[1]) < FP32_TOL
    scales = _grad_scales(args, d_out, 64, "relu2")
    for i in want_grads:
        assert _rel(got_grads[i], want_grads[i], scales.get(i)) < FP32_TOL, NAMES[i]
    with pytest.raises(ValueError, match="TPU interpreter"):
        pallas_kernels.chunked_linear_attention(q, k, v, chunk_size=64, local_kernel="dot", interpret=params,
                                                backend="gpu")


def test_xla_chunked_matches_oracle():
    """The XLA form (CPU implementation and debug backward) against the same oracle."""
    q, k, v, s0, d_out, d_state = _inputs(7, 200, 60, 48, F32)
    args = (q, k, v, s0, jnp.float32(0.5), jnp.float32(2.0))

    def xla(*a):
        return reference.chunked(*a[:3], chunk_size=64, local_kernel="relu2", initial_state=a[3], local_scale=a[4],
                                 global_scale=a[5])

    got, got_grads = _value_and_grads(xla, args, d_out, d_state)
    want, want_grads = _value_and_grads(lambda *a: oracle(*a, chunk_size=64, local_kernel="relu2"), args, d_out,
                                        d_state)
    assert _rel(got[0], want[0]) < FP32_TOL and _rel(got[1], want[1]) < FP32_TOL
    scales = _grad_scales(args, d_out, 64, "relu2")
    for i in want_grads:
        assert _rel(got_grads[i], want_grads[i], scales.get(i)) < FP32_TOL, NAMES[i]


def test_xla_debug_backward_matches_pallas_backward():
    q, k, v, s0, d_out, d_state = _inputs(3, 150, 64, 64, F32)
    args = (q, k, v, s0, jnp.float32(0.9), jnp.float32(1.1))
    _, pallas_grads = _value_and_grads(_kernel_fn(64, "relu2", "tpu"), args, d_out, d_state)
    _, xla_grads = _value_and_grads(_kernel_fn(64, "relu2", "tpu", backward="xla"), args, d_out, d_state)
    scales = _grad_scales(args, d_out, 64, "relu2")
    for i in pallas_grads:
        assert _rel(pallas_grads[i], xla_grads[i], scales.get(i)) < FP32_TOL, NAMES[i]


# bf16: the kernel rounds where the library's chunked form does (local weights to bf16 before
# they meet v, outputs and input gradients to bf16; states and their products fp32), so it must
# be about as close to the fp32 truth (the oracle on the same bf16-rounded inputs) as that XLA
# form run in bf16: at most 2x its error plus one bf16 ulp (2^-8, a different summation order
# rounding to the neighbouring bf16 value). Independently, no error may exceed 4 ulps: output
# rounding is half an ulp and the rounded local weights add about one more.
BF16_ULP = 2.0**-8
BF16_CASES = [
    (63, 60, 64, "relu2", True, "tpu"),
    (500, 64, 128, "dot", False, "gpu"),
    (1000, 64, 64, "relu2", False, "tpu"),
    (1000, 60, 128, "relu2", True, "gpu"),
]


@pytest.mark.parametrize("t,d,chunk,kind,with_state,backend", BF16_CASES)
def test_forward_and_gradients_bf16(t, d, chunk, kind, with_state, backend):
    q, k, v, s0, d_out, d_state = _inputs(t + d + chunk + 1, t, d, d, jnp.bfloat16, with_state=with_state)
    args = (q, k, v, s0, jnp.float32(0.7), jnp.float32(1.3))
    args32 = tuple(x.astype(F32) if x is not None else None for x in args[:3]) + args[3:]
    got, got_grads = _value_and_grads(_kernel_fn(chunk, kind, backend), args, d_out, d_state)

    def xla(*a):
        return reference.chunked_linear_attention(*a[:3], chunk_size=chunk, local_kernel=kind, initial_state=a[3],
                                                  return_final_state=True, local_scale=a[4], global_scale=a[5])

    base, base_grads = _value_and_grads(xla, args, d_out, d_state)
    truth, truth_grads = _value_and_grads(lambda *a: oracle(*a, chunk_size=chunk, local_kernel=kind), args32,
                                          d_out, d_state)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == F32
    scales = _grad_scales(args, d_out, chunk, kind)
    for name, g, b_, w, scale in [("out", got[0], base[0], truth[0], None),
                                  ("final state", got[1], base[1], truth[1], None)] + [
        (NAMES[i], got_grads[i], base_grads[i], truth_grads[i], scales.get(i)) for i in truth_grads
    ]:
        assert g.dtype == b_.dtype, name
        err, base_err = _rel(g, w, scale), _rel(b_, w, scale)
        assert err <= 2 * base_err + BF16_ULP, f"{name}: kernel {err:.2e} vs XLA bf16 {base_err:.2e}"
        assert err < 4 * BF16_ULP, f"{name}: {err:.2e}"


@pytest.mark.parametrize("kind,split", [("relu2", 128), ("dot", 37)])
def test_split_resume(kind, split):
    """A prefix's final state fed back as initial_state == one call. relu2 needs a chunk-aligned
    split; "dot" with equal scales is plain causal LA, where any split works."""
    q, k, v, s0, _, _ = _inputs(11, 200, 64, 64, F32)
    run = lambda q, k, v, s: pallas_kernels.chunked_linear_attention(
        q, k, v, chunk_size=64, local_kernel=kind, initial_state=s, return_final_state=True, **_run("tpu"))
    whole, whole_state = run(q, k, v, s0)
    first, mid_state = run(q[:, :split], k[:, :split], v[:, :split], s0)
    second, end_state = run(q[:, split:], k[:, split:], v[:, split:], mid_state)
    assert _rel(jnp.concatenate([first, second], axis=1), whole) < FP32_TOL
    assert _rel(end_state, whole_state) < FP32_TOL


def test_normalized_matches_library():
    """Fused normaliser (ones column in v) == lin_llm's normalised reference, values and grads."""
    b, t, h, d = 1, 150, 2, 32
    keys = jax.random.split(jax.random.key(5), 4)
    x_q, x_k = (jax.random.normal(kk, (b, t, h, d)) for kk in keys[:2])
    v = jax.random.normal(keys[2], (b, t, h, d))
    d_out = jax.random.normal(keys[3], (b, t, h, d))
    spec = lin.LinearSpec(group_size=64, local_kernel="dot", use_global=True, normalize=True, eps=1e-6)

    def lib(x_q, x_k, v, ls, gs):
        return lin.reference(spec, feature_maps.elu_plus_one(x_q), feature_maps.elu_plus_one(x_k), v, ls, gs)

    def ours(x_q, x_k, v, ls, gs):
        return pallas_kernels.chunked_linear_attention_normalized(
            feature_maps.elu_plus_one(x_q), feature_maps.elu_plus_one(x_k), v, chunk_size=64, local_kernel="dot",
            eps=1e-6, local_scale=ls, global_scale=gs, **_run("tpu"))

    args = (x_q, x_k, v, jnp.float32(0.8), jnp.float32(1.2))
    assert _rel(jax.jit(ours)(*args), lib(*args)) < FP32_TOL
    loss = lambda fn: (lambda *a: jnp.sum(fn(*a) * d_out))
    got = jax.jit(jax.grad(loss(ours), argnums=range(5)))(*args)
    want = jax.grad(loss(lib), argnums=range(5))(*args)
    for i, (g, w) in enumerate(zip(got, want)):
        assert _rel(g, w) < FP32_TOL, i


def test_normalized_state_resume():
    """(S, z) from a prefix continues the normalised form exactly (dot: any split point)."""
    q, k, v, _, _, _ = _inputs(13, 130, 32, 16, F32)
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    run = lambda q, k, v, s: pallas_kernels.chunked_linear_attention_normalized(
        q, k, v, chunk_size=64, initial_state=s, return_final_state=True, **_run("gpu"))
    whole, (s_whole, z_whole) = run(q, k, v, None)
    first, state = run(q[:, :45], k[:, :45], v[:, :45], None)
    second, (s_end, z_end) = run(q[:, 45:], k[:, 45:], v[:, 45:], state)
    assert state[0].shape == (1, 2, 32, 16) and state[1].shape == (1, 2, 32)
    assert _rel(jnp.concatenate([first, second], axis=1), whole) < FP32_TOL
    assert _rel(s_end, s_whole) < FP32_TOL and _rel(z_end, z_whole) < FP32_TOL
    assert _rel(z_whole, jnp.sum(k, axis=1)) < FP32_TOL


@pytest.mark.parametrize(
    "flag,platform,name,backend",
    [
        ("auto", "cpu", "xla", None),
        ("auto", "tpu", "pallas", "tpu"),
        ("auto", "gpu", "pallas", "gpu"),
        ("auto", "cuda", "pallas", "gpu"),
        ("xla", "tpu", "xla", None),
        ("pallas", "tpu", "pallas", "tpu"),
        ("pallas", "gpu", "pallas", "gpu"),
        ("pallas_interpret", "cpu", "pallas_interpret", "tpu"),
        ("pallas_interpret", "gpu", "pallas_interpret", "gpu"),
    ],
)
def test_select_impl(flag, platform, name, backend):
    assert pallas_kernels.select_impl(flag, platform) == pallas_kernels.Impl(name, backend)


def test_select_impl_errors_and_default_platform():
    assert pallas_kernels.select_impl("auto").name == ("xla" if jax.default_backend() == "cpu" else "pallas")
    with pytest.raises(ValueError, match="attention_impl='flash' is not one of"):
        pallas_kernels.select_impl("flash")
    with pytest.raises(ValueError, match="needs a TPU or GPU"):
        pallas_kernels.select_impl("pallas", "cpu")
    with pytest.raises(ValueError, match="platform='metal'"):
        pallas_kernels.select_impl("auto", "metal")


def test_impls_agree():
    """xla and pallas_interpret through the one Impl interface, plain and normalised."""
    q, k, v, s0, _, _ = _inputs(17, 100, 64, 64, F32)
    kw = dict(chunk_size=64, local_kernel="relu2", initial_state=s0, return_final_state=True, local_scale=0.5,
              global_scale=2.0)
    xla = pallas_kernels.select_impl("xla")
    interp = pallas_kernels.select_impl("pallas" if COMPILED else "pallas_interpret")
    (a, sa), (b_, sb) = xla(q, k, v, **kw), interp(q, k, v, **kw)
    assert a.dtype == b_.dtype == F32
    assert _rel(a, b_) < FP32_TOL and _rel(sa, sb) < FP32_TOL
    pos = lambda x: jax.nn.elu(x) + 1
    na = xla.normalized(pos(q), pos(k), v, chunk_size=64, local_kernel="dot")
    nb = interp.normalized(pos(q), pos(k), v, chunk_size=64, local_kernel="dot")
    assert _rel(na, nb) < FP32_TOL


def test_argument_errors():
    q = jnp.zeros((1, 16, 2, 8))
    call = lambda **kw: pallas_kernels.chunked_linear_attention(
        q, q, q, **{"chunk_size": 16, "local_kernel": "dot", "interpret": True, **kw})
    with pytest.raises(ValueError, match="local_kernel='yoso'"):
        call(local_kernel="yoso")
    with pytest.raises(ValueError, match="backend='metal'"):
        call(backend="metal")
    with pytest.raises(ValueError, match="backward='numpy'"):
        call(backward="numpy")
    with pytest.raises(ValueError, match="multiple of 16"):
        call(chunk_size=24, backend="tpu")
    with pytest.raises(ValueError, match="power of two"):
        call(chunk_size=48, backend="gpu")
    with pytest.raises(ValueError, match="initial_state must be"):
        call(initial_state=jnp.zeros((1, 2, 8, 4)))
    with pytest.raises(ValueError, match="one floating dtype"):
        pallas_kernels.chunked_linear_attention(q, q, q.astype(jnp.bfloat16), chunk_size=16, local_kernel="dot",
                                                interpret=True)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="need a TPU or GPU"):
            call(interpret=False)


# --------------------------------------------------------------------------- block sizes


def _pallas_grids(fn, *args):
    """The grids of the pallas_calls fn traces to (a gradient's backward kernels included), in order."""
    from jax.extend import core as jex_core

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                yield eqn.params["grid_mapping"].grid
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if isinstance(sub, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
                        yield from walk(getattr(sub, "jaxpr", sub))

    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


# (backend, value dim, blocks, value blocks with them): the defaults give one value block for both
# value dims (TPU: 200 -> 256 columns, all in one block; GPU: 48 -> 64 columns, one 64-column block).
BLOCK_CASES = [
    ("gpu", 48, pallas_kernels.BlockSizes(gpu_value_block=16, gpu_num_warps=2, gpu_num_stages=1, acc_tile=(2, 16)), 4),
    ("tpu", 200, pallas_kernels.BlockSizes(tpu_value_block=128, acc_tile=(2, 16)), 2),
]


@pytest.mark.parametrize("backend,dv,blocks,n_blocks", BLOCK_CASES)
def test_block_sizes_set_the_grid(backend, dv, blocks, n_blocks):
    q, k, v, s0, d_out, d_state = _inputs(23, 100, 32, dv, F32)
    args = (q, k, v, s0, jnp.float32(0.7), jnp.float32(1.3))
    grad = lambda f: jax.grad(_loss(f, d_out, d_state), argnums=range(6))
    assert [g[0] for g in _pallas_grids(grad(_kernel_fn(64, "relu2", backend)), *args)] == [1, 1, 1]
    assert [g[0] for g in _pallas_grids(grad(_kernel_fn(64, "relu2", backend, blocks=blocks)), *args)] == [n_blocks] * 3


def test_block_sizes_keep_the_results():
    """Two TPU value blocks (dq, dk become partial sums over blocks) and a (2, 16) acc tile (the
    scale-gradient sums move): values and every gradient still match the oracle. Triton value
    blocks are covered by the value dim 96 case of test_forward_and_gradients_fp32."""
    q, k, v, s0, d_out, d_state = _inputs(23, 100, 32, 200, F32)
    args = (q, k, v, s0, jnp.float32(0.7), jnp.float32(1.3))
    got, got_grads = _value_and_grads(_kernel_fn(64, "relu2", "tpu", blocks=BLOCK_CASES[1][2]), args, d_out, d_state)
    want, want_grads = _value_and_grads(lambda *a: oracle(*a, chunk_size=64, local_kernel="relu2"), args, d_out,
                                        d_state)
    assert _rel(got[0], want[0]) < FP32_TOL and _rel(got[1], want[1]) < FP32_TOL
    scales = _grad_scales(args, d_out, 64, "relu2")
    for i in want_grads:
        assert _rel(got_grads[i], want_grads[i], scales.get(i)) < FP32_TOL, NAMES[i]


def test_impl_passes_block_sizes():
    blocks = pallas_kernels.BlockSizes(gpu_value_block=16)
    impl = pallas_kernels.select_impl("pallas_interpret", "gpu", blocks=blocks)
    assert impl == pallas_kernels.Impl("pallas_interpret", "gpu", blocks)
    q, v = jnp.zeros((1, 40, 2, 8)), jnp.zeros((1, 40, 2, 48))
    assert _pallas_grids(lambda q, k, v: impl(q, k, v, chunk_size=16, local_kernel="dot"), q, q, v) == [(4, 1, 2)]
    assert _pallas_grids(lambda q, k, v: impl.normalized(q, k, v, chunk_size=16, local_kernel="dot"), q, q, v) == [(4, 1, 2)]


@pytest.mark.parametrize("field,value", [
    ("tpu_value_block", 64), ("tpu_value_block", 0), ("gpu_value_block", 48), ("gpu_value_block", 8),
    ("gpu_num_warps", 3), ("gpu_num_stages", 0), ("acc_tile", (1, 128)), ("acc_tile", (8, 100)), ("acc_tile", [8, 128]),
])
def test_block_sizes_errors(field, value):
    with pytest.raises(ValueError, match=f"BlockSizes.{field}="):
        pallas_kernels.BlockSizes(**{field: value})


def test_blocks_argument_must_be_block_sizes():
    q = jnp.zeros((1, 16, 2, 8))
    with pytest.raises(ValueError, match="is not a pallas_kernels.BlockSizes"):
        pallas_kernels.chunked_linear_attention(q, q, q, chunk_size=16, local_kernel="dot", interpret=True,
                                                blocks={"gpu_value_block": 16})


# --------------------------------------------------------------------------- lowering (no execution)

LLAMA = dict(b=1, t=4096, h=32, d=128)  # one LLaMA-2-7B attention layer
_CALL_TARGETS = {"tpu": r"custom_call @tpu_custom_call\b", "cuda": r"custom_call @__gpu\$xla\.gpu\.triton\b"}


def _lower(fn, platform, *shapes):
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()


def _kernel_calls(text, platform):
    return len(re.findall(_CALL_TARGETS[platform], text)), sorted(set(re.findall(r"linear_scan_\w+_step", text)))


@pytest.mark.parametrize("kind", ["relu2", "dot"])
@pytest.mark.parametrize("backend,platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_lowers_at_llama_shapes(backend, platform, kind):
    """Forward and backward kernels lower for the hardware at a LLaMA-2-7B layer in bf16; the
    backward must be the two Pallas kernels (plus the recomputed forward), not an XLA fallback."""
    b, t, h, d = LLAMA.values()
    x = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    state = jax.ShapeDtypeStruct((b, h, d, d), F32)
    scalar = jax.ShapeDtypeStruct((), F32)

    def fn(q, k, v, s0, ls, gs):
        return pallas_kernels.chunked_linear_attention(
            q, k, v, chunk_size=64, local_kernel=kind, initial_state=s0, return_final_state=True,
            local_scale=ls, global_scale=gs, backend=backend)

    def loss(*args):
        out, final = fn(*args)
        return jnp.sum(out.astype(F32)) + jnp.sum(final)

    fwd = _lower(fn, platform, x, x, x, state, scalar, scalar)
    assert _kernel_calls(fwd, platform) == (1, ["linear_scan_fwd_step"])
    bwd = _lower(jax.grad(loss, argnums=range(6)), platform, x, x, x, state, scalar, scalar)
    assert _kernel_calls(bwd, platform) == (3, ["linear_scan_dkv_step", "linear_scan_dq_step", "linear_scan_fwd_step"])


@pytest.mark.parametrize("backend,platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_normalized_lowers(backend, platform):
    """The normalised form's extra value column (Dv 128 -> 129, padded) still lowers, fwd and bwd."""
    x = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(pallas_kernels.chunked_linear_attention_normalized(
            q, k, v, chunk_size=64, backend=backend).astype(F32))

    assert _kernel_calls(_lower(jax.grad(loss, argnums=(0, 1, 2)), platform, x, x, x), platform)[0] == 3


@pytest.mark.parametrize("backend,platform,blocks", [
    ("tpu", "tpu", pallas_kernels.BlockSizes(tpu_value_block=128, acc_tile=(16, 128))),
    ("gpu", "cuda", pallas_kernels.BlockSizes(gpu_value_block=32, gpu_num_warps=2, gpu_num_stages=3, acc_tile=(2, 16))),
])
def test_block_sizes_lower(backend, platform, blocks):
    """Non-default tiling lowers too (two TPU value blocks; eight Triton ones, with its warps and stages)."""
    x, xv = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16), jax.ShapeDtypeStruct((1, 256, 2, 256), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(pallas_kernels.chunked_linear_attention(
            q, k, v, chunk_size=64, local_kernel="relu2", backend=backend, blocks=blocks).astype(F32))

    text = _lower(jax.grad(loss, argnums=(0, 1, 2)), platform, x, x, xv)
    assert _kernel_calls(text, platform)[0] == 3
    if platform == "cuda":
        assert text.count("grid_x = 8 : i32") == 3 and text.count("num_warps = 2 : i32") == 3, "Triton launch"
        assert text.count("num_stages = 3 : i32") == 3

def test_tpu_lowering_rejects_untiled_blocks():
    """The lowering checks are real: a block breaking Mosaic's (8, 128) tiling fails to lower, which
    is what the padding of head dims to 128 lanes prevents."""
    from jax.experimental import pallas as pl

    def copy(x):
        return pl.pallas_call(lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...]),
                              out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(2,),
                              in_specs=[pl.BlockSpec((8, 60), lambda i: (i, 0))],
                              out_specs=pl.BlockSpec((8, 60), lambda i: (i, 0)))(x)

    with pytest.raises(Exception, match="divisible by 8 and 128"):
        _lower(copy, "tpu", jax.ShapeDtypeStruct((16, 120), F32))
