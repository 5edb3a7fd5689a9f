"""Comparing decoding states by what decoding reads."""

import jax
import jax.numpy as jnp
import numpy as np


def meaningful(state, used):
    """The parts of a decoding state that decoding reads, stale slots zeroed: KV-cache entries at
    or past a row's position (the cache cropped to `used` slots), group-buffer slots at or past
    pos % G (lolcats: and its previous-group slots while pos < G)."""
    layers = []
    for layer_state in state.layers:
        if hasattr(layer_state, "k"):  # softmax KV cache, cropped to `used`: caches may differ in max_len
            live = (jnp.arange(used)[None, :] < state.pos[:, None])[:, None, :, None]
            layers.append((layer_state.k[:, :, :used] * live, layer_state.v[:, :, :used] * live))
        elif hasattr(layer_state.attn, "kf"):  # lolcats' window buffer: the previous group once pos >= G, the current one
            attn = layer_state.attn
            group = attn.k.shape[1] // 2
            slot = jnp.arange(2 * group)[None, :]
            live = jnp.where(slot < group, (state.pos >= group)[:, None], slot - group < (state.pos % group)[:, None])
            live = live[:, :, None, None]
            layers.append((attn.s, attn.z, attn.k * live, attn.kf * live, attn.v * live, layer_state.conv))
        else:
            attn = layer_state.attn
            group = attn.k_group.shape[1]
            live = (jnp.arange(group)[None, :] < (state.pos % group)[:, None])[:, :, None, None]
            layers.append((attn.s, attn.z, attn.k_group * live, attn.v_group * live, layer_state.conv))
    return layers, state.pos


def assert_states_close(a, b, row=None, rtol=1e-5):
    used = int(max(a.pos.max(), b.pos.max()))
    for x, y in zip(jax.tree_util.tree_leaves(meaningful(a, used)), jax.tree_util.tree_leaves(meaningful(b, used))):
        assert x.shape == y.shape
        if row is not None:
            x, y = x[row], y[row]
        if x.size:
            diff = np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()
            assert diff <= rtol * max(np.abs(np.asarray(y)).max(), 1.0), diff
