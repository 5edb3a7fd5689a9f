"""Every linear-attention preset in its four forms: reference, chunked, step, verify (+ commit).

Layer-level tests compare the pure functions; model-level tests run a one-layer model through
prefill / step / verify / commit against its own full forward pass, across group boundaries.
Conv weights, alpha, lambda (model.la.learn_lambda on), Hedgehog maps and FLASH's offset-scales and
bias table are randomised so every term is exercised.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lin_llm import CheckpointError, load_checkpoint, save_model
from lin_llm.attention import conv, layer, presets
from lin_llm.attention.layer import layer_math
from models import attention_overrides, tiny_model
from state_utils import assert_states_close

LINEAR = [name for name in presets.NAMES if name != "softmax"]
G, H, D, KSIZE = 8, 2, 8, 7
FEATURES = 16  # Performer's random features; the width of lolcats' Hedgehog maps


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _random_params(preset, key):
    params = presets.init_params(preset, H, D, KSIZE, conv_per_channel=False, learn_lambda=True, feature_dim=FEATURES)
    out = {}
    for i, (name, value) in enumerate(sorted(params.items())):
        noise = jax.random.normal(jax.random.fold_in(key, i), value.shape)
        if name == "conv":
            out[name] = 0.3 * noise
        elif name.startswith("mix"):
            out[name] = jnp.float32(0.6 + 0.1 * i)
        elif name == "flash_gamma":  # scales of order one, so both of FLASH's parts matter
            out[name] = 1.0 + 0.3 * noise
        elif name == "flash_rel_bias":  # times sqrt(d) in the kernel: keep laplace off its plateaus
            out[name] = 0.1 * noise
        elif name == "window_factor":  # lolcats: sigmoid(logit 0.1 + noise) per head
            out[name] = jnp.asarray(value) + 0.5 * noise
        else:  # hedgehog maps: their init (identity; lolcats: Kaiming-uniform) plus noise; FLASH's offsets
            out[name] = jnp.asarray(value) + 0.2 * noise
    return out


def _layer_case(name):
    preset = presets.get(name)
    lm = layer_math(preset, group_size=G, local_kernel="relu2", head_dim=D, eps=1e-6, max_len=64,
                    performer_features=FEATURES, seed=0, layer=1)
    return lm, _random_params(preset, jax.random.key(7))


def _qkv(t, seed=0, b=2, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (b, t, H, D), dtype) for k in keys]


def _forward(lm, params, q, k, v, positions, form="chunked"):
    """The layer from projections q, k [B, T, H, D] (what acts before RoPE included; no RoPE here)."""
    return layer.forward(lm, params, *layer.before_rope(lm, params, q, k), v, positions, form)


@functools.partial(jax.jit, static_argnames=("lm", "form"))
def _forward_and_grads(lm, form, params, q, k, v, cotangent):
    positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])

    def loss(params, q, k, v):
        return jnp.sum(_forward(lm, params, q, k, v, positions, form) * cotangent)

    out = _forward(lm, params, q, k, v, positions, form)
    return out, jax.grad(loss, argnums=(0, 1, 2, 3))(params, q, k, v)


def _grid():
    """Every preset at every length; a +conv preset adds the same conv to both forms, so beyond
    one length its cases run with the slow tests (CI runs them when time allows)."""
    lengths = [(32, "multiple"), (29, "not_multiple"), (5, "shorter"), (1, "one")]
    for name in LINEAR:
        for t, label in lengths:
            slow = name.endswith("+conv") and label != "not_multiple"
            yield pytest.param(name, t, id=f"{name}-{label}", marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("name, t", list(_grid()))
def test_chunked_equals_reference_with_gradients(name, t):
    lm, params = _layer_case(name)
    q, k, v = _qkv(t)
    cot = jax.random.normal(jax.random.key(9), v.shape)
    out_c, grads_c = _forward_and_grads(lm, "chunked", params, q, k, v, cot)
    out_r, grads_r = _forward_and_grads(lm, "reference", params, q, k, v, cot)
    assert rel_err(out_c, out_r) <= 1e-5
    dv_scale = np.abs(np.asarray(grads_r[3])).max()
    for index, name_of in ((0, "params"), (1, "q"), (2, "k"), (3, "v")):
        for path, gc in jax.tree_util.tree_leaves_with_path(grads_c[index]):
            gr = dict(jax.tree_util.tree_leaves_with_path(grads_r[index]))[path]
            assert np.isfinite(np.asarray(gc)).all()
            key = jax.tree_util.keystr(path)
            through_scores_only = name_of in ("q", "k") or "hedgehog" in key or "mix" in key
            # lolcats before group 2 has no linear part: its window weight cancels in the normaliser
            weight_cancels = lm.preset.window and t <= 2 * G and "window_factor" in key
            if (t == 1 and (lm.spec.normalize or lm.preset.castling) and through_scores_only) or weight_cancels:
                # A normalised family's single output is v_0 exactly up to eps (Castling's is
                # v_0 / |v_0| plus the conv): gradients that flow only through the scores (q, k,
                # the feature map's params, the mixing weights) vanish, and what is left is fp32
                # rounding of O(1/score) terms. Both forms must agree they vanish.
                assert np.abs(np.asarray(gc)).max() < 1e-3 * dv_scale
                assert np.abs(np.asarray(gr)).max() < 1e-3 * dv_scale
            else:
                assert rel_err(gc, gr) <= 1e-5, f"d/d{name_of}{jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("name", LINEAR)
def test_zero_vectors_give_finite_outputs_and_gradients(name):
    lm, params = _layer_case(name)
    q, k, v = (jnp.zeros((1, 11, H, D)) for _ in range(3))
    out, grads = _forward_and_grads(lm, "chunked", params, q, k, v, jnp.ones_like(v))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves((out, grads)))
    state = layer.init_state(lm, 1, H, D, KSIZE)
    q1, k1 = layer.before_rope(lm, params, q[:, :1], k[:, :1])
    step_out, state = jax.jit(layer.extend, static_argnums=0)(lm, params, q1, k1, v[:, :1],
                                                             jnp.zeros((1, 1), jnp.int32), state, jnp.zeros(1, jnp.int32))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves((step_out, state)))


@pytest.mark.parametrize("name", ["aug", "elu", "performer", "hedgehog+conv", "lolcats"])
def test_bf16_chunked_error_is_bounded(name, record_property):
    lm, params = _layer_case(name)
    q, k, v = _qkv(64, seed=3)
    reference = _forward_and_grads(lm, "reference", params, q, k, v, v)[0]
    bf16 = _forward_and_grads(lm, "chunked", params, *(x.astype(jnp.bfloat16) for x in (q, k, v)), v)[0]
    err = rel_err(bf16, reference)
    record_property("bf16_rel_err", err)
    print(f"{name}: bf16 chunked vs fp32 reference, max rel. error {err:.2e}")
    assert bf16.dtype == jnp.float32 and err < 2e-2


def test_conv_matches_a_direct_loop_and_masks_the_future():
    rng = np.random.RandomState(0)
    v = jnp.asarray(rng.randn(2, 13, H, D), jnp.float32)
    for weight in (jnp.asarray(rng.randn(H, KSIZE), jnp.float32), jnp.asarray(rng.randn(H, KSIZE, D), jnp.float32)):
        w = np.asarray(weight)
        lags = w[:, : KSIZE // 2 + 1][:, ::-1]  # tap c acts on v_{t + c - KSIZE//2}
        expected = np.zeros(v.shape)
        for t in range(13):
            for s in range(KSIZE // 2 + 1):
                if t >= s:
                    expected[:, t] += (lags[:, s, None] if w.ndim == 2 else lags[:, s]) * np.asarray(v[:, t - s])
        np.testing.assert_allclose(np.asarray(conv.conv(v, weight)), expected, atol=1e-5)
        grad = jax.grad(lambda w: jnp.sum(conv.conv(v, w) ** 2))(weight)
        assert (np.asarray(grad)[:, KSIZE // 2 + 1 :] == 0).all()  # masked future taps never learn
        assert (np.abs(np.asarray(grad)[:, : KSIZE // 2 + 1]) > 0).all()
        # the step form, token by token
        history = jnp.zeros((2, conv.history_len(KSIZE), H, D))
        for t in range(13):
            out, history = conv.step(v[:, t], weight, history)
            np.testing.assert_allclose(np.asarray(out), expected[:, t], atol=1e-5)
        # the verify form after 9 tokens: a chain is the sequence's own continuation; a tree node
        # (root 0; 1, 2 under 0; 3 under 1) convolves its own path only
        history = conv.new_history(jnp.zeros((2, conv.history_len(KSIZE), H, D)), v[:, :9])
        chain = conv.unfolded(v[:, 9:], weight, history, jnp.tril(jnp.ones((4, 4), bool)), jnp.arange(4))
        np.testing.assert_allclose(np.asarray(chain), expected[:, 9:], atol=1e-5)
        ancestors = jnp.asarray([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], bool)
        tree = conv.unfolded(v[:, 9:], weight, history, ancestors, jnp.asarray([0, 1, 1, 2]))
        for node, path in enumerate([[0], [0, 1], [0, 2], [0, 1, 3]]):
            sequence = jnp.concatenate([v[:, :9], v[:, 9:][:, jnp.asarray(path)]], axis=1)
            np.testing.assert_allclose(np.asarray(tree[:, node]), np.asarray(conv.conv(sequence, weight))[:, -1], atol=1e-5)


# --------------------------------------------------------------------------- model level


MODEL_G = 4


def _model(name, compute_dtype="float32"):
    """A one-layer model of a preset, or a hybrid ("hybrid-aug": five layers, softmax in 0, 2 and 4)
    with every parameter perturbed."""
    return tiny_model("model.n_layers=1", "model.vocab_size=50", "model.max_seq_len=64", "train.seq_len=64",
                      *attention_overrides(name), f"model.la.group_size={MODEL_G}", "model.la.feature_dim=16",
                      f"model.compute_dtype={compute_dtype}", seed=1, norms=name.startswith("hybrid-"))


_prefill = nnx.jit(lambda model, ids, state: model.prefill(ids, state))
_step = nnx.jit(lambda model, ids, state: model.step(ids, state))
_verify = nnx.jit(lambda model, ids, state, anc, dep: model.verify(ids, state, anc, dep))
_commit = nnx.jit(lambda model, state, pending, path, n: model.commit(state, pending, path, n))
_full = nnx.jit(lambda model, ids: model(ids))
IDS = jnp.asarray(np.random.RandomState(5).randint(0, 50, size=(2, 19)))  # 19 tokens: 4 group boundaries
# hybrids: five layers, softmax in 0, 2 and 4; the second runs the same per-layer code as the first
MODEL_CASES = ["softmax"] + LINEAR + ["hybrid-aug", pytest.param("hybrid-hedgehog+conv", marks=pytest.mark.slow)]


def _assert_close(a, b, tol=1e-5):
    assert rel_err(a, b) <= tol, rel_err(a, b)


@pytest.mark.parametrize("name", MODEL_CASES)
def test_split_resume_and_steps_equal_full_forward(name):
    model = _model(name)
    full = _full(model, IDS)
    for split in (3, 9):  # inside a group / one past a boundary
        state = model.init_state(2, 64)
        first, state = _prefill(model, IDS[:, :split], state)
        rest, state = _prefill(model, IDS[:, split:], state)
        _assert_close(jnp.concatenate([first, rest], 1), full)
    state = model.init_state(2, 64)
    logits, state = _prefill(model, IDS[:, :1], state)
    outs = [logits]
    for t in range(1, IDS.shape[1]):  # every position, across four group boundaries
        step_logits, state = _step(model, IDS[:, t], state)
        outs.append(step_logits[:, None])
    _assert_close(jnp.concatenate(outs, 1), full)


# A tree of 6 candidates:  0 -> 1 -> 3 -> 5,  0 -> 2 -> 4
PARENT = [-1, 0, 0, 1, 2, 3]


def _tree():
    m = len(PARENT)
    anc = np.eye(m, dtype=bool)
    depth = np.zeros(m, np.int32)
    for i, p in enumerate(PARENT):
        while p >= 0:
            anc[i, p] = True
            depth[i] += 1
            p = PARENT[p]
    return jnp.asarray(anc), jnp.asarray(depth)


@pytest.mark.parametrize("name", MODEL_CASES)
def test_verify_equals_steps_and_commit_equals_steps(name):
    model = _model(name)
    prefix = 2  # candidates at positions 2.. cross the group boundary at 4
    state0 = _prefill(model, IDS[:, :prefix], model.init_state(2, 64))[1]
    cand = IDS[:, prefix : prefix + 6]

    def walk(tokens):  # logits and states of stepping through tokens [B, n]
        state, logits, states = state0, [], []
        for i in range(tokens.shape[1]):
            out, state = _step(model, tokens[:, i], state)
            logits.append(out)
            states.append(state)
        return jnp.stack(logits, 1), states

    # chain
    m = cand.shape[1]
    chain_logits, pending = _verify(model, cand, state0, jnp.tril(jnp.ones((m, m), bool)), jnp.arange(m))
    step_logits, step_states = walk(cand)
    _assert_close(chain_logits, step_logits)
    path = jnp.broadcast_to(jnp.arange(m), (2, m))
    for n in (1, 3):
        committed = _commit(model, state0, pending, path, jnp.full((2,), n, jnp.int32))
        assert_states_close(committed, step_states[n - 1])
    # rows may accept different lengths
    committed = _commit(model, state0, pending, path, jnp.array([2, 5], jnp.int32))
    for row, n in enumerate((2, 5)):
        assert_states_close(committed, step_states[n - 1], row)

    # m <= G takes commit's single-fold path: exactly full (2 + 2 = G), across the boundary, short of it
    short = cand[:, :4]
    _, pending = _verify(model, short, state0, jnp.tril(jnp.ones((4, 4), bool)), jnp.arange(4))
    for accepted in ((2, 2), (3, 1), (4, 0)):
        committed = _commit(model, state0, pending, path[:, :4], jnp.array(accepted, jnp.int32))
        for row, n in enumerate(accepted):
            assert_states_close(committed, step_states[n - 1] if n else state0, row)

    # tree: every node's logits are those of stepping along its own root-to-node path
    anc, depth = _tree()
    tree_logits, pending = _verify(model, cand, state0, anc, depth)
    for node in range(len(PARENT)):
        nodes = [int(j) for j in np.flatnonzero(np.asarray(anc[node]))]  # ancestors, in depth order
        path_logits, path_states = walk(cand[:, nodes])
        _assert_close(tree_logits[:, node], path_logits[:, -1])
    # commit the branch 0 -> 2 -> 4 and continue decoding from it
    branch = jnp.broadcast_to(jnp.array([0, 2, 4, 0, 0, 0]), (2, 6))
    committed = _commit(model, state0, pending, branch, jnp.full((2,), 3, jnp.int32))
    _, branch_states = walk(cand[:, jnp.array([0, 2, 4])])
    assert_states_close(committed, branch_states[-1])
    _assert_close(_step(model, IDS[:, 0], committed)[0], _step(model, IDS[:, 0], branch_states[-1])[0])


@pytest.mark.parametrize("name", MODEL_CASES)
def test_no_position_sees_the_future(name):
    model = _model(name)
    base = _full(model, IDS)
    for t in (2, 3, 7, 12):
        perturbed = IDS.at[:, t + 1].set((IDS[:, t + 1] + 1) % 50)
        out = _full(model, perturbed)
        np.testing.assert_array_equal(np.asarray(out[:, : t + 1]), np.asarray(base[:, : t + 1]))
        assert np.abs(np.asarray(out[:, t + 1]) - np.asarray(base[:, t + 1])).max() > 0


def test_state_is_float32_and_fixed_size_under_bf16_compute():
    model = _model("aug", "bfloat16")
    small, large = model.init_state(2, 16), model.init_state(2, 64)
    for leaf_small, leaf_large in zip(jax.tree_util.tree_leaves(small), jax.tree_util.tree_leaves(large)):
        assert leaf_small.shape == leaf_large.shape  # O(1) in the context length
    state = _prefill(model, IDS, small)[1]
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree_util.tree_leaves(state))
    err = rel_err(_full(model, IDS), _full(_model("aug"), IDS))
    print(f"aug model, bf16 compute vs fp32: max rel. logit error {err:.2e}")
    assert err < 5e-2


def test_linearising_a_softmax_checkpoint(converted, tmp_path):
    softmax_model = load_checkpoint(converted["untied"])
    linear_model = load_checkpoint(converted["untied"], overrides=["attention=aug", "la.group_size=16"])
    attn = linear_model.layers[0].attn
    assert attn.extra == ("mix_global", "conv")  # lambda is the constant 1 unless la.learn_lambda
    assert float(attn.mix_global[...]) == 0.0 and not np.asarray(attn.conv[...]).any()
    learned = load_checkpoint(converted["untied"], overrides=["attention=aug", "la.learn_lambda=true"]).layers[0].attn
    assert float(learned.mix_local[...]) == 1.0
    for name in ("wq", "wk", "wv", "wo"):
        np.testing.assert_array_equal(
            np.asarray(getattr(attn, name).kernel[...]), np.asarray(getattr(softmax_model.layers[0].attn, name).kernel[...])
        )
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, size=(1, 40)))
    assert np.isfinite(np.asarray(linear_model(ids))).all()
    save_model(linear_model, tmp_path / "aug")
    assert load_checkpoint(tmp_path / "aug").cfg.attention == "aug"
    with pytest.raises(CheckpointError, match=r"unexpected \[.*conv"):
        load_checkpoint(tmp_path / "aug", overrides=["attention=softmax"])
