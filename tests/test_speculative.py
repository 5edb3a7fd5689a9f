"""Plain and speculative decoding: exact greedy equality, exact sampling distribution, batching."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import lin_llm
from lin_llm.decoding import build_tree, generate, medusa_generate, medusa_loss, process_logits, speculative_generate
from models import attention_overrides, tiny_model
from state_utils import assert_states_close

GROUP = 4


def _model(attention, seed, n_layers=2, vocab=64):
    """A model of a preset, or a hybrid ("hybrid-aug": five layers, softmax in 0, 2 and 4, every
    parameter perturbed)."""
    return tiny_model(f"model.n_layers={n_layers}", *attention_overrides(attention), f"model.la.group_size={GROUP}",
                      f"model.vocab_size={vocab}", seed=seed, norms=attention.startswith("hybrid-"))


PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7]]  # ragged, right-padded inside


_step = nnx.jit(lambda model, ids, state: model.step(ids, state)[1])


def _step_state(model, prompt, tokens):
    """The state of feeding prompt + tokens one call at a time (plain decoding's state)."""
    state = model.init_state(1, 96)
    _, state = model.prefill(jnp.asarray([prompt]), state)
    for token in tokens:
        state = _step(model, jnp.asarray([token]), state)
    return state


def _greedy_cases():
    """Every target with an often-wrong and an always-right draft; castling, flash, the second hybrid
    and lolcats' perfect-draft case with the slow tests (their verify and commit forms are checked
    against steps in test_linear_attention, and the speculative loop does not depend on the preset)."""
    slow_ones = ("castling", "flash", "hybrid-hedgehog+conv")
    for attention in ("softmax", "aug", "hedgehog+conv", "hybrid-aug", "lolcats+conv", *slow_ones):
        for draft_kind in ("random", "target"):
            slow = attention in slow_ones or (attention == "lolcats+conv" and draft_kind == "target")
            yield pytest.param(attention, draft_kind, id=f"{draft_kind}-{attention}",
                               marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("attention, draft_kind", list(_greedy_cases()))
def test_greedy_speculative_equals_greedy_plain(attention, draft_kind):
    target = _model(attention, 1)
    draft = target if draft_kind == "target" else _model("elu", 2, n_layers=1)  # often wrong
    plain = np.asarray(generate(target, PROMPTS, 30))
    spec, summary, states = speculative_generate(target, draft, PROMPTS, 30, gamma=3, return_states=True)
    np.testing.assert_array_equal(np.asarray(spec), plain)
    if draft_kind == "target":
        assert summary["acceptance_rate"] == 1.0 and summary["mean_tokens_per_target_call"] > 3
    else:
        assert summary["acceptance_rate"] < 0.5
    # the final states are those of feeding the same tokens one by one (30 tokens: 7 groups)
    tokens, n_tokens = np.asarray(states["tokens"]), np.asarray(states["n_tokens"])
    for row, prompt in enumerate(PROMPTS):
        consumed = tokens[row, : n_tokens[row] - 1]
        np.testing.assert_array_equal(consumed[:30], plain[row, : len(consumed)])
        one_row = jax.tree.map(lambda x: x[row : row + 1], states["target"])
        assert_states_close(one_row, _step_state(target, prompt, consumed), rtol=1e-4)
        one_row = jax.tree.map(lambda x: x[row : row + 1], states["draft"])
        assert_states_close(one_row, _step_state(draft, prompt, consumed), rtol=1e-4)


@pytest.mark.parametrize("attention", ["softmax", "aug", "lolcats"])
def test_batched_generation_equals_each_row_alone(attention):
    model = _model(attention, 3)
    batched = np.asarray(generate(model, PROMPTS, 12, temperature=0.0))
    for row, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(np.asarray(generate(model, [prompt], 12))[0], batched[row])


@pytest.mark.parametrize("attention", ["aug", "lolcats"])
def test_padding_is_never_attended(attention):
    model = _model(attention, 3)
    prompt = [[3, 5, 8]]
    ids, lengths = jnp.asarray([[3, 5, 8, 0, 0, 0, 0]]), jnp.asarray([3])
    other = ids.at[:, 3:].set(jnp.asarray([9, 9, 9, 9]))
    state_a = model.prefill(ids, model.init_state(1, 32), lengths)[1]
    state_b = model.prefill(other, model.init_state(1, 32), lengths)[1]
    assert_states_close(state_a, state_b, rtol=0)
    assert_states_close(state_a, model.prefill(jnp.asarray(prompt), model.init_state(1, 32))[1])


# --------------------------------------------------------------------------- exact sampling

VOCAB = 6


def _exact_joint(model, prompt, n_tokens, temperature, top_k):
    """P(x_1..x_n | prompt) of the target under the same temperature/top-k, by enumeration."""
    seqs = np.array(list(itertools.product(range(VOCAB), repeat=n_tokens)), np.int32)
    ids = jnp.asarray(np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1))
    logp = process_logits(model(ids), temperature, top_k, None)  # [S, T, V]
    start = len(prompt) - 1
    steps = [logp[np.arange(len(seqs)), start + i, seqs[:, i]] for i in range(n_tokens)]
    return seqs, np.exp(np.asarray(sum(steps), np.float64))


@pytest.mark.parametrize(
    "target_kind, gamma, temperature, top_k",
    [("aug", 1, 1.0, None), pytest.param("aug", 2, 1.0, None, marks=pytest.mark.slow), ("aug", 2, 1.0, 3),
     pytest.param("aug", 3, 0.7, 4, marks=pytest.mark.slow), ("hybrid-aug", 2, 1.0, 3),
     pytest.param("hybrid-hedgehog+conv", 3, 0.7, 4, marks=pytest.mark.slow)],
)
def test_speculative_sampling_matches_the_target_distribution(target_kind, gamma, temperature, top_k):
    target = _model(target_kind, 4, vocab=VOCAB)
    draft = _model("softmax", 5, n_layers=1, vocab=VOCAB)  # a different distribution q
    prompt, n_tokens, n_samples = [1, 3, 2, 5], 3, 6000
    tokens, summary = speculative_generate(
        target, draft, [prompt] * n_samples, n_tokens, gamma=gamma, temperature=temperature, top_k=top_k, seed=11
    )
    assert 0.1 < summary["acceptance_rate"] < 0.95  # both accepting and rejecting are exercised
    seqs, probs = _exact_joint(target, np.array(prompt), n_tokens, temperature, top_k)
    index = {tuple(s): i for i, s in enumerate(seqs)}
    observed = np.bincount([index[tuple(row)] for row in np.asarray(tokens)], minlength=len(seqs))
    assert observed[probs == 0].sum() == 0  # nothing outside the top-k support
    keep = probs > 0
    result = stats.chisquare(observed[keep], probs[keep] / probs[keep].sum() * n_samples)
    assert result.pvalue > 1e-3, result


# --------------------------------------------------------------------------- Medusa


@functools.lru_cache(maxsize=None)
def _medusa_model(attention, head_scale):
    model = tiny_model(*attention_overrides(attention), f"model.la.group_size={GROUP}", "model.medusa_heads=3",
                       seed=6, perturb=0.0)
    model = nnx.clone(model)  # the heads are set below: keep the cached model as built
    for i, head in enumerate(model.medusa):  # scale 0: every head copies the next-token head
        head.kernel[...] = head_scale * jax.random.normal(jax.random.key(i), head.kernel[...].shape)
    return model


@pytest.mark.parametrize(
    "attention, head_scale",
    [("softmax", 0.0), ("softmax", 0.5), ("aug", 0.0), ("aug", 0.5), ("castling", 0.5), ("flash", 0.5),
     ("hybrid-aug", 0.5)],
)
def test_medusa_greedy_equals_plain_greedy(attention, head_scale):
    model = _medusa_model(attention, head_scale)
    plain = np.asarray(generate(model, PROMPTS, 30))
    out, summary = medusa_generate(model, PROMPTS, 30, topk=(3, 2, 2))
    np.testing.assert_array_equal(np.asarray(out), plain)
    assert summary["tree_nodes"] == 1 + 3 + 6 + 12
    print(attention, head_scale, summary)


def test_medusa_tree_verification_equals_stepping_each_path():
    model = _medusa_model("aug", 0.5)
    tree = build_tree((3, 2, 2))
    depth, ancestors, paths = tree.arrays()
    state = model.prefill(jnp.asarray([PROMPTS[0]]), model.init_state(1, 96))[1]  # position 7: boundary at 8
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, size=(1, tree.size)))
    logits, _ = model.verify(tokens, state, jnp.asarray(ancestors), jnp.asarray(depth))
    for node in range(tree.size):
        s = state
        for j in paths[node, : depth[node] + 1]:
            step_logits, s = model.step(tokens[:, j], s)
        np.testing.assert_allclose(np.asarray(logits[:, node]), np.asarray(step_logits), rtol=0, atol=1e-4)


def test_medusa_loss_reaches_the_heads():
    model = _medusa_model("softmax", 0.0)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 64, size=(2, 16)))
    grads = nnx.grad(medusa_loss)(model, ids)
    flat = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_leaves_with_path(grads)}
    assert any("medusa" in name and np.abs(np.asarray(g)).max() > 0 for name, g in flat.items())
    assert float(medusa_loss(model, ids)) > 0


# --------------------------------------------------------------------------- decode.py


def test_decode_cli_refuses_bad_requests(tmp_path, capsys):
    import decode

    byte_level = lin_llm.load_config(None, ["model.n_layers=1", "model.max_seq_len=128", "train.seq_len=128"]).model
    lin_llm.save_model(lin_llm.build_model(byte_level), tmp_path / "target")  # vocabulary 260
    lin_llm.save_model(_model("softmax", 1), tmp_path / "draft")  # vocabulary 64
    ckpt = str(tmp_path / "target")
    cases = [
        (["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"], "does not exist"),
        (["--checkpoint", ckpt, "--prompt", ""], "the prompt is empty"),
        (["--checkpoint", ckpt, "--prompt", "x" * 200], "exceeds the model's max_seq_len=128"),
        (["--checkpoint", ckpt, "--prompt", "x", "--draft", str(tmp_path / "draft")], "draft's vocabulary \\(64 tokens\\)"),
        (["--checkpoint", ckpt, "--prompt", "x", "--medusa"], "no Medusa heads"),
    ]
    import re

    for argv, message in cases:
        assert decode.main(argv) == 2
        assert re.search(message, capsys.readouterr().err), argv


def test_compare_decoding_reports_plain_vs_speculative():
    """The benchmark's comparison: same prompt both ways, identical greedy output, sane stats."""
    from lin_llm.benchmarking import compare_decoding

    target = _model("aug", 1)
    result = compare_decoding(target, PROMPTS[0], 30, draft=target, gamma=3, repeats=1)
    assert result["identical_greedy_output"] and result["acceptance_rate"] == 1.0
    assert result["mean_accepted_length"] == 3 and result["speedup"] > 0
    assert result["plain_tokens_per_s"] > 0 and result["speculative_tokens_per_s"] > 0
