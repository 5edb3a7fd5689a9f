"""The jitted generation loop and the sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lin_llm import load_checkpoint
from lin_llm.decoding import generate, process_logits


@pytest.fixture(scope="module")
def model(converted):
    return load_checkpoint(converted["untied"])


def test_greedy_generation_is_the_argmax_of_the_full_forward(model):
    prompt = jnp.asarray(np.random.RandomState(3).randint(0, 97, size=(2, 7)))
    new = generate(model, prompt, 12)
    logits = model(jnp.concatenate([prompt, new], axis=1))
    np.testing.assert_array_equal(np.asarray(new), np.asarray(jnp.argmax(logits[:, 6:-1], axis=-1)))


@pytest.mark.parametrize("attention", ["aug", "castling", "flash"])
def test_linearised_greedy_generation_is_the_argmax_of_the_full_forward(converted, attention):
    """The jitted loop over an LA state (prefill, then steps across group boundaries of G = 4)."""
    model = load_checkpoint(converted["untied"], overrides=[f"attention={attention}", "la.group_size=4",
                                                            "la.learn_lambda=true"])
    for block in model.layers:  # the conv and alpha start at zero: make every term act
        for i, name in enumerate(block.attn.extra):
            param = getattr(block.attn, name)
            param[...] = param[...] + 0.3 * jax.random.normal(jax.random.key(i), param[...].shape)
    prompt = jnp.asarray(np.random.RandomState(5).randint(0, 97, size=(2, 7)))
    new = generate(model, prompt, 12)
    logits = model(jnp.concatenate([prompt, new], axis=1))
    np.testing.assert_array_equal(np.asarray(new), np.asarray(jnp.argmax(logits[:, 6:-1], axis=-1)))


def test_top_k_one_sampling_is_greedy(model):
    prompt = jnp.asarray(np.random.RandomState(4).randint(0, 97, size=(2, 5)))
    np.testing.assert_array_equal(
        np.asarray(generate(model, prompt, 8, temperature=0.7, top_k=1, seed=5)), np.asarray(generate(model, prompt, 8))
    )


def test_rows_stop_at_eos_and_are_filled_with_it(model):
    prompt = jnp.asarray(np.random.RandomState(3).randint(0, 97, size=(2, 7)))
    greedy = np.asarray(generate(model, prompt, 12))
    eos = int(greedy[0, 3])  # make row 0 stop at its 4th token
    out = np.asarray(generate(model, prompt, 12, eos_id=eos))
    first = int(np.argmax(greedy[0] == eos))
    np.testing.assert_array_equal(out[0, : first + 1], greedy[0, : first + 1])
    assert (out[0, first:] == eos).all()
    for row in range(2):  # every row matches greedy up to its first EOS
        stop = np.argmax(greedy[row] == eos) if (greedy[row] == eos).any() else 12
        np.testing.assert_array_equal(out[row, :stop], greedy[row, :stop])


def test_process_logits_filters_like_numpy():
    logits = jnp.asarray(np.random.RandomState(0).randn(3, 11).astype(np.float32))
    probs = np.exp(np.asarray(process_logits(logits, 1.0, None, 0.6)))
    for row, p in zip(np.asarray(jax.nn.softmax(logits)), probs):
        order = np.argsort(-row)
        keep = order[: np.searchsorted(np.cumsum(row[order]), 0.6) + 1]  # smallest prefix reaching 0.6
        expected = np.zeros_like(row)
        expected[keep] = row[keep] / row[keep].sum()
        np.testing.assert_allclose(p, expected, atol=1e-6)
    top2 = np.exp(np.asarray(process_logits(logits, 2.0, 2, None)))
    assert ((top2 > 0).sum(-1) == 2).all()


@pytest.mark.parametrize(
    "prompt, n, message",
    [([[]], 4, "length >= 1"), ([[1, 2]], 0, "max_new_tokens=0"), ([[1] * 120], 20, "exceeds the model's max_seq_len=128")],
)
def test_bad_generation_requests(model, prompt, n, message):
    with pytest.raises(ValueError, match=message):
        generate(model, prompt, n)
