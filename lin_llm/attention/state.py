"""Decoding-state pytrees. Fixed shapes, so every decoding function jits once."""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated softmax KV cache of one layer: [B, n_kv_heads, max_len, head_dim]."""

    k: jax.Array
    v: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The whole model's decoding state: one entry per layer plus each row's next position."""

    layers: tuple
    pos: jax.Array  # [B] int32: tokens consumed so far by each row


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LinearState:
    """Linear-attention state of one layer, all float32.

    s        [B, H, F, Dv]  sum of phi(k)^T v over the *complete* groups
    z        [B, H, F]      sum of phi(k) over them (the normaliser; F = 0 if the family has none)
    k_group  [B, G, H, F]   phi(k) of the current, incomplete group (slots >= pos % G are stale)
    v_group  [B, G, H, Dv]  v of the current group
    The count of buffered tokens is pos % G, derived from the model state's position.
    """

    s: jax.Array
    z: jax.Array
    k_group: jax.Array
    v_group: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class WindowState:
    """LoLCATs' state of one layer (window.py), all float32.

    s   [B, H, F, Dv]  sum of phi(k)^T v over the groups before the previous one (linear part)
    z   [B, H, F]      sum of phi(k) over them
    k   [B, 2G, H, d]  raw keys for the softmax window: slots 0..G-1 the previous group (unused
                       while pos < G), slots G..2G-1 the current group (first pos % G in use)
    kf  [B, 2G, H, F]  their phi(k), folded into s, z when the previous group leaves the window
    v   [B, 2G, H, Dv]
    """

    s: jax.Array
    z: jax.Array
    k: jax.Array
    kf: jax.Array
    v: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LinearLayerState:
    """A linear-attention layer's state: the attention sums and the conv's last K_eff-1 values of v
    ([B, K_eff-1, H, Dv], oldest first; K_eff-1 = 0 without a conv)."""

    attn: LinearState  # WindowState for lolcats
    conv: jax.Array
