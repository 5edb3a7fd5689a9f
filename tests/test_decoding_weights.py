"""Decoding with bf16 weights: the products XLA runs fast, and their results against fp32.

The shapes are pinned (a lone row against a bf16 matrix is computed as two rows on CPU, see
lin_llm.model.matmul), the values bounded against an fp32 reference of the same weights.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lin_llm
from lin_llm.decoding import generate
from lin_llm.model import matmul

BF16 = jnp.bfloat16


def _dot_lhs_shapes(fn, *args):
    return [eqn.invars[0].aval.shape for eqn in jax.make_jaxpr(fn)(*args).eqns if eqn.primitive.name == "dot_general"]


@pytest.mark.parametrize("w_contract", [0, 1])
def test_a_lone_bf16_row_is_multiplied_as_two_rows(w_contract):
    keys = jax.random.split(jax.random.key(0), 2)
    w = jax.random.normal(keys[0], (48, 40) if w_contract == 0 else (40, 48)).astype(BF16)
    x = jax.random.normal(keys[1], (1, 1, 48)).astype(BF16)
    if jax.default_backend() == "cpu":
        assert _dot_lhs_shapes(lambda x, w: matmul(x, w, w_contract), x, w) == [(2, 48)]
        assert _dot_lhs_shapes(lambda x, w: matmul(x, w, w_contract), x.astype(jnp.float32), w.astype(jnp.float32)) == [
            (1, 48)
        ]  # fp32 keeps its one-row kernel
    assert _dot_lhs_shapes(lambda x, w: matmul(x, w, w_contract), jnp.concatenate([x, x], 1), w) == [(2, 48)]
    got = matmul(x, w, w_contract, jnp.float32)
    w32 = w.astype(jnp.float32) if w_contract == 0 else w.astype(jnp.float32).T
    want = x.astype(jnp.float32) @ w32  # bf16 products are exact in fp32: only the summation order differs
    assert got.shape == (1, 1, 40) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@functools.cache
def _models():
    """The same weights as a bf16 model (bf16 compute) and as an fp32 model."""
    overrides = ["model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
                 "model.vocab_size=97", "model.max_seq_len=64", "train.seq_len=64", "model.init_std=0.1"]
    cfg = lin_llm.load_config(None, overrides + ["model.param_dtype=bfloat16", "model.compute_dtype=bfloat16"]).model
    bf16 = lin_llm.build_model(cfg, seed=0)
    fp32 = lin_llm.build_model(lin_llm.load_config(None, overrides).model, seed=0)
    graph, _ = nnx.split(fp32)
    params = jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(bf16))
    return bf16, nnx.merge(graph, params)


def test_bf16_decoding_matches_its_forward_and_stays_near_fp32():
    bf16, fp32 = _models()
    prompt = jnp.asarray(np.random.RandomState(0).randint(0, 97, size=(1, 6)))
    new = generate(bf16, prompt, 10)
    ids = jnp.concatenate([prompt, new], axis=1)
    logits = bf16(ids)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(jnp.argmax(logits[:, 5:-1], axis=-1)))
    reference = fp32(ids)
    # bf16 activations carry 8 bits of mantissa through 2 layers: logits within 3% of their range
    assert float(jnp.max(jnp.abs(logits - reference)) / jnp.max(jnp.abs(reference))) < 0.03
