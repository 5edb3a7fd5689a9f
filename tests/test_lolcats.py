"""The lolcats preset against LoLCATs' own formulas, re-implemented here in torch (float64).

From HazyResearch/lolcats: get_masks and hybrid_attention_quadratic
(src/model/linear_attention/linear_window_attention_tk.py), FeatureMapMLP + SoftmaxDim
(src/model/feature_map.py), window_factors through a sigmoid and linear_factors = 1
(affine_attention_factors: false in configs/model/*_wtk64_*.yaml), kaiming_uniform_ init.
The forms' agreement with each other is in test_linear_attention.py; this checks that they
compute LoLCATs' attention.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lin_llm.attention import layer, presets
from lin_llm.attention.layer import layer_math
from lin_llm.attention.state import DecodeState
from state_utils import assert_states_close

G, H, D, F = 8, 3, 8, 16


def get_masks(window_size, q_len, k_len, align_end=True):
    """LoLCATs' window / linear masks; align_end=False crops the first rows and columns instead
    of the last (groups from position 0, as lin_llm: theirs align the groups to the sequence's end)."""
    size = window_size
    m = math.ceil(max(q_len, k_len) / window_size)
    mask = torch.block_diag(*[torch.ones((size, size))] * m)
    mask += torch.roll(mask, -size, -1)  # the terracing: the previous block too
    mask = mask[-q_len:, -k_len:] if align_end else mask[:q_len, :k_len]
    mask = mask[None, None]
    return torch.tril(mask).to(int), torch.tril(1 - mask).to(int)


def feature_map(x, weight, eps=1e-12):
    x = torch.einsum("hdf,bhld->bhlf", weight, x)
    return torch.cat([torch.softmax(x, dim=-1), torch.softmax(-x, dim=-1)], dim=-1).clamp(min=eps)


def hybrid_attention_quadratic(q, k, f_q, f_k, v, window_factor, linear_factor, window_size, align_end,
                               mask_value=-1e8):
    mask_window, mask_linear = get_masks(window_size, q.shape[-2], k.shape[-2], align_end)
    a_sm = torch.einsum("bhmd,bhnd->bhmn", q, k) * (k.shape[-1] ** -0.5)
    a_sm = a_sm.masked_fill(~mask_window.bool(), mask_value)
    a_sm_max = torch.amax(a_sm, dim=-1, keepdim=True)
    a_sm = window_factor * torch.exp(a_sm - a_sm_max)
    sum_sm = a_sm.sum(dim=-1, keepdim=True)
    a_ln = torch.einsum("bhmd,bhnd->bhmn", f_q, f_k)
    a_ln = linear_factor * a_ln.masked_fill(~mask_linear.bool(), 0)
    sum_ln = a_ln.sum(dim=-1, keepdim=True)
    y = torch.einsum("bhmn,bhnd->bhmd", a_sm + a_ln, v)
    return y / (sum_sm + sum_ln)


def lolcats_attention(q, k, v, params, align_end):
    """LoLCATs' layer on [B, T, H, d] numpy arrays (q, k after RoPE): its output [B, T, H, d] and
    the torch leaves, for gradients."""
    leaves = {name: torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
              for name, x in dict(q=q, k=k, v=v, **params).items()}
    heads_first = {name: leaves[name].permute(0, 2, 1, 3) for name in ("q", "k", "v")}
    q_t, k_t, v_t = heads_first["q"], heads_first["k"], heads_first["v"]
    beta = torch.sigmoid(leaves["window_factor"])[None, :, None, None]
    y = hybrid_attention_quadratic(q_t, k_t, feature_map(q_t, leaves["hedgehog_q"]),
                                   feature_map(k_t, leaves["hedgehog_k"]), v_t, beta, 1, G, align_end)
    return y.permute(0, 2, 1, 3), leaves


def _case(t, seed=0):
    preset = presets.get("lolcats")
    lm = layer_math(preset, group_size=G, local_kernel="relu2", head_dim=D, eps=1e-6, max_len=64,
                    performer_features=F, seed=0, layer=0)
    init = presets.init_params(preset, H, D, 7, False, feature_dim=F, seed=3, layer=2)
    rng = np.random.default_rng(seed)
    params = {  # trained-looking maps and per-head weights, away from the init
        "hedgehog_q": init["hedgehog_q"] + 0.4 * rng.standard_normal(init["hedgehog_q"].shape),
        "hedgehog_k": init["hedgehog_k"] + 0.4 * rng.standard_normal(init["hedgehog_k"].shape),
        "window_factor": init["window_factor"] + rng.standard_normal(H),
    }
    params = {name: np.asarray(x, np.float32) for name, x in params.items()}
    q, k, v = (rng.standard_normal((2, t, H, D)).astype(np.float32) * 1.5 for _ in range(3))
    return lm, params, q, k, v


@functools.partial(jax.jit, static_argnums=0)
def _forward(lm, params, q, k, v):
    positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return layer.forward(lm, params, q, k, v, positions)


_extend = jax.jit(layer.extend, static_argnums=0)
_verify = jax.jit(layer.verify, static_argnums=0)
_commit = jax.jit(layer.commit, static_argnums=0)


@pytest.mark.parametrize("t, align_end", [(29, False), (32, True)], ids=["not_multiple", "multiple-their_mask"])
def test_chunked_equals_lolcats_formula_with_gradients(t, align_end):
    """At T a multiple of G their mask (groups aligned to the end) is ours; at any T, ours is
    theirs with the groups counted from position 0."""
    lm, params, q, k, v = _case(t)
    expected, leaves = lolcats_attention(q, k, v, params, align_end)
    cotangent = np.random.default_rng(1).standard_normal(expected.shape)
    (expected * torch.tensor(cotangent)).sum().backward()

    def loss(params, q, k, v):
        return jnp.sum(_forward(lm, params, q, k, v) * cotangent.astype(np.float32))

    out = _forward(lm, params, q, k, v)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(params, q, k, v)
    flat = dict(grads[0], q=grads[1], k=grads[2], v=grads[3])
    scale = lambda x: np.abs(x).max()
    assert scale(np.asarray(out) - expected.detach().numpy()) <= 1e-5 * scale(expected.detach().numpy())
    for name, grad in flat.items():
        truth = leaves[name].grad.numpy()
        assert scale(np.asarray(grad) - truth) <= 1e-5 * scale(truth), name


def test_their_end_aligned_groups_make_a_token_depend_on_the_sequence_length():
    """Why lin_llm counts groups from position 0: with theirs, the first 20 tokens' outputs
    change when 9 more tokens follow (so prefill and decoding could not agree)."""
    _, params, q, k, v = _case(29)
    alone = lolcats_attention(q[:, :20], k[:, :20], v[:, :20], params, align_end=True)[0].detach().numpy()
    longer = lolcats_attention(q, k, v, params, align_end=True)[0].detach().numpy()[:, :20]
    ours = lolcats_attention(q, k, v, params, align_end=False)[0].detach().numpy()[:, :20]
    assert np.abs(alone - longer).max() > 1e-3
    ours_alone = lolcats_attention(q[:, :20], k[:, :20], v[:, :20], params, align_end=False)[0].detach().numpy()
    np.testing.assert_allclose(ours, ours_alone, rtol=1e-12)


def test_init_is_lolcats_kaiming_uniform_and_window_weight():
    params = presets.init_params(presets.get("lolcats"), 4, 16, 7, False, feature_dim=32, seed=0, layer=5)
    reference = torch.empty(4, 16, 32, dtype=torch.float64)
    torch.nn.init.kaiming_uniform_(reference)  # LoLCATs' FeatureMapMLP.init_weights_
    fan_in = torch.nn.init._calculate_fan_in_and_fan_out(reference)[0]
    bound = torch.nn.init.calculate_gain("leaky_relu", 0) * math.sqrt(3.0 / fan_in)
    assert abs(float(reference.abs().max()) - bound) < 0.02 * bound  # torch's draws fill [-bound, bound]
    for name in ("hedgehog_q", "hedgehog_k"):
        w = params[name]
        assert w.shape == (4, 16, 32) and w.dtype == np.float32
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.98 * bound
        assert abs(float(w.std()) - float(reference.std())) < 0.05 * float(reference.std())
    assert not np.array_equal(params["hedgehog_q"], params["hedgehog_k"])
    other_layer = presets.init_params(presets.get("lolcats"), 4, 16, 7, False, feature_dim=32, seed=0, layer=6)
    assert not np.array_equal(params["hedgehog_q"], other_layer["hedgehog_q"])
    np.testing.assert_allclose(1 / (1 + np.exp(-params["window_factor"])), 0.1, rtol=1e-6)  # init_window_factor


def test_verify_and_commit_equal_steps_with_a_linear_part():
    """From a state that already holds a linear part (S over groups 0-1 at position 13, G = 4),
    candidates across the boundary at 16 (where group 2 leaves the window for S): a chain and a
    tree verify to the steps along each path, and commit gives the steps' state."""
    lm = layer_math(presets.get("lolcats+conv"), group_size=4, local_kernel="relu2", head_dim=D, eps=1e-6,
                    max_len=64, performer_features=F, seed=0, layer=0)
    _, params, q, k, v = _case(19)
    params["conv"] = 0.3 * np.random.default_rng(2).standard_normal((H, 7)).astype(np.float32)
    positions = jnp.broadcast_to(jnp.arange(19), (2, 19))
    prefix = 13
    state0 = _extend(lm, params, q[:, :prefix], k[:, :prefix], v[:, :prefix], positions[:, :prefix],
                          layer.init_state(lm, 2, H, D, 7), jnp.zeros(2, jnp.int32))[1]
    pos0 = jnp.full((2,), prefix, jnp.int32)

    def walk(nodes):  # outputs and states of stepping through candidates `nodes` from state0
        state, outs, states = state0, [], []
        for depth, node in enumerate(nodes):
            i = prefix + node
            out, state = _extend(lm, params, q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1],
                                      positions[:, i:i + 1], state, pos0 + depth)
            outs.append(out[:, 0])
            states.append(DecodeState(layers=(state,), pos=pos0 + depth + 1))
        return jnp.stack(outs, 1), states

    cand = slice(prefix, prefix + 6)
    chain_anc, chain_depth = jnp.tril(jnp.ones((6, 6), bool)), jnp.arange(6)
    out, pending = _verify(lm, params, q[:, cand], k[:, cand], v[:, cand], positions[:, cand], state0, pos0,
                                chain_anc, chain_depth)
    stepped, states = walk(range(6))
    np.testing.assert_allclose(np.asarray(out), np.asarray(stepped), rtol=1e-5, atol=1e-6)
    path = jnp.broadcast_to(jnp.arange(6), (2, 6))
    for n in (1, 3, 4, 6):  # before, at and past the boundary
        committed = _commit(lm, state0, pending, pos0, path, jnp.full((2,), n, jnp.int32))
        assert_states_close(DecodeState(layers=(committed,), pos=pos0 + n), states[n - 1])
    parent = [-1, 0, 1, 2, 2, 4]  # 0 -> 1 -> 2 -> 3 and 2 -> 4 -> 5: siblings 3 and 4 sit at position 16
    paths = []
    for node in range(6):
        chain = [node]
        while parent[chain[0]] >= 0:
            chain.insert(0, parent[chain[0]])
        paths.append(chain)
    anc = np.zeros((6, 6), bool)
    for node, chain in enumerate(paths):
        anc[node, chain] = True
    depth = jnp.asarray([len(chain) - 1 for chain in paths])
    out, pending = _verify(lm, params, q[:, cand], k[:, cand], v[:, cand], positions[:, cand], state0, pos0,
                                jnp.asarray(anc), depth)
    for node, chain in enumerate(paths):
        np.testing.assert_allclose(np.asarray(out[:, node]), np.asarray(walk(chain)[0][:, -1]), rtol=1e-5, atol=1e-6)
    branch = jnp.broadcast_to(jnp.asarray(paths[5] + [0]), (2, 6))  # 0 -> 1 -> 2 -> 4 -> 5
    committed = _commit(lm, state0, pending, pos0, branch, jnp.full((2,), 5, jnp.int32))
    assert_states_close(DecodeState(layers=(committed,), pos=pos0 + 5), walk(paths[5])[1][-1])
