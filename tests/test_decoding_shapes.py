"""Decoding across attention shapes: MHA (a KV head per query head), GQA and MQA (one KV head).

Every form (prefill, step, verify) must give the full forward's logits whatever the number of
KV heads, for softmax and linear presets alike, and the one-token step must keep the shape that
XLA runs fast (see lin_llm.attention.softmax): these tests pin shapes, not timings.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lin_llm
from lin_llm.attention import softmax
from lin_llm.decoding.plain import _generate
from lin_llm.decoding.speculative import _speculative

SHAPES = {"mha": 4, "gqa": 2, "mqa": 1}  # KV heads for 4 query heads
GROUP = 4


@functools.cache
def _model(attention, kv_heads, n_layers=1, dtype="float32"):
    cfg = lin_llm.load_config(None, [f"model.param_dtype={dtype}", f"model.compute_dtype={dtype}",
        f"model.n_layers={n_layers}", "model.dim=32", "model.n_heads=4", f"model.n_kv_heads={kv_heads}",
        "model.ffn_dim=64", "model.vocab_size=50", "model.max_seq_len=64", "train.seq_len=64", "model.init_std=0.3",
        f"model.attention={attention}", f"model.la.group_size={GROUP}", "model.la.conv_kernel_size=7",
    ]).model
    model = lin_llm.build_model(cfg, seed=kv_heads)
    for block in model.layers:  # the conv and alpha start at zero: make them act
        for i, name in enumerate(block.attn.extra):
            param = getattr(block.attn, name)
            param[...] = param[...] + 0.3 * jax.random.normal(jax.random.key(i), param[...].shape)
    return model


_full = nnx.jit(lambda model, ids: model(ids))
_prefill = nnx.jit(lambda model, ids, state: model.prefill(ids, state))
_step = nnx.jit(lambda model, ids, state: model.step(ids, state))
_verify = nnx.jit(lambda model, ids, state: model.verify(ids, state))
IDS = jnp.asarray(np.random.RandomState(7).randint(0, 50, size=(2, 14)))  # 14 tokens: 3 group boundaries


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# Linear attention repeats k and v to the query heads, so past the projections its shapes do not
# depend on the KV heads: MHA and MQA here (GQA is in test_linear_attention), softmax on all three.
FORM_CASES = [
    ("softmax", "mha"), ("softmax", "gqa"), ("softmax", "mqa"), ("aug", "mha"), ("aug", "mqa"), ("elu", "mqa"),
]


@pytest.mark.parametrize("attention,shape", FORM_CASES)
def test_every_form_equals_the_full_forward(attention, shape):
    model = _model(attention, SHAPES[shape])
    full = _full(model, IDS)
    state = model.init_state(2, 64)
    logits, state = _prefill(model, IDS[:, :3], state)
    outs = [logits]
    for t in range(3, 9):
        step_logits, state = _step(model, IDS[:, t], state)
        outs.append(step_logits[:, None])
    verified, _ = _verify(model, IDS[:, 9:], state)  # the last 5 tokens as one chain of candidates
    outs.append(verified)
    assert _rel(jnp.concatenate(outs, axis=1), full) < 1e-5


def _contraction_shapes(n_kv, rep, s=16, d=8):
    """Shapes of the multiplies in one cached softmax step with n_kv KV heads of rep query heads."""
    q = jnp.zeros((1, 1, n_kv * rep, d))
    k = v = jnp.zeros((1, 1, n_kv, d))
    cache = softmax.init_cache(1, s, n_kv, d, jnp.float32)
    jaxpr = jax.make_jaxpr(softmax.cached_attention)(q, k, v, cache, jnp.zeros((1,), jnp.int32))
    return {eqn.outvars[0].aval.shape for eqn in jaxpr.eqns if eqn.primitive.name == "mul"}


@pytest.mark.parametrize("n_kv,rep", [(4, 1), (2, 2), (1, 4)])
def test_one_token_contractions_keep_a_group_axis(n_kv, rep):
    """The step multiplies q against the whole cache with a group axis of >= 2 query rows (a zero
    row pads MHA's group of one): with a size-1 axis XLA CPU drops it and runs the contraction as
    an elementwise product plus a reduction, several times slower than GQA's."""
    group = max(rep, 2)
    shapes = _contraction_shapes(n_kv, rep)
    assert (1, n_kv, group, 16, 8) in shapes  # scores: q x K over [S, D]
    assert all(shape[2] == group for shape in shapes if len(shape) == 5 and shape[3:] == (16, 8))


def _loop_body(hlo: str) -> str:
    """The text of the compiled program's (single) while loop body."""
    body = re.search(r"body=%([\w.\-]+)", hlo).group(1)
    start = hlo.index(f"%{body} ")
    return hlo[start : hlo.index("\n}\n", start)]


def _arrays_like(body: str, n_elements: int):
    """(name, opcode) of every fp32 array of n_elements that the loop body makes."""
    found = []
    for name, dims, opcode in re.findall(r"^\s*(\S+) = f32\[([\d,]*)\]\S* ([\w\-]+)\(", body, re.MULTILINE):
        if dims and int(np.prod([int(x) for x in dims.split(",")])) == n_elements:
            found.append((name, opcode))
    return found


@pytest.mark.parametrize("shape,dtype", [("mha", "float32"), ("gqa", "float32"), ("mqa", "float32"),
                                         ("gqa", "bfloat16")])
def test_decode_loop_updates_the_cache_in_place(shape, dtype):
    """Inside the compiled generate loop nothing copies or transposes a KV cache: each step writes
    its token into the loop-carried cache and reads it where it lies (any array the size of a
    cache, in any layout, is the cache itself or its in-place update). With bf16 compute the
    cache is fp32 on CPU, where XLA would convert and copy a bf16 one in full every step."""
    model = _model("softmax", SHAPES[shape], dtype=dtype)
    ids, lengths = jnp.zeros((1, 5), jnp.int32), jnp.array([5], jnp.int32)
    max_len = 29  # no other array of the test model has the cache's size
    hlo = _generate.lower(
        model, ids, lengths, jax.random.key(0), max_new_tokens=max_len - 5, max_len=max_len, temperature=0.0,
        top_k=None, top_p=None, eos_id=None, stream=None,
    ).compile().as_text()
    arrays = _arrays_like(_loop_body(hlo), SHAPES[shape] * max_len * 8)
    made = [(name, op) for name, op in arrays if op not in ("get-tuple-element", "bitcast")]
    assert len(made) == 2, arrays  # the K and the V cache's update
    assert all(op == "fusion" and "dynamic-update-slice" in name for name, op in made), made


@pytest.mark.parametrize("attention", ["softmax", "aug"])
def test_decoding_lowers_for_gpu(attention):
    """The whole generate loop (sampling, EOS, a ragged batch) and the speculative loop lower for
    CUDA from this CPU machine: nothing in them is CPU-only (`make gpu-check` runs them there)."""
    model = _model(attention, 2)
    ids, lengths = jnp.zeros((2, 5), jnp.int32), jnp.array([5, 3], jnp.int32)
    sampling = dict(temperature=0.7, top_k=5, top_p=0.9, eos_id=3, stream=None)
    plain = _generate.trace(model, ids, lengths, jax.random.key(0), max_new_tokens=8, max_len=13, **sampling)
    spec = _speculative.trace(model, model, ids, lengths, jax.random.key(0), max_new_tokens=8, max_len=17, gamma=3,
                              **sampling)
    for traced in (plain, spec):
        assert "stablehlo.while" in traced.lower(lowering_platforms=("cuda",)).as_text()
