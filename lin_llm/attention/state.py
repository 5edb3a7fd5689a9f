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
class LinearLayerState:
    """A linear-attention layer's state: the attention sums and the conv's last K_eff-1 values of v
    ([B, K_eff-1, H, Dv], oldest first; K_eff-1 = 0 without a conv)."""

    attn: LinearState
    conv: jax.Array
