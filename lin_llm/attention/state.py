"""Decoding-state pytrees. Fixed shapes, so every decoding function jits once."""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated softmax KV cache of one layer: [B, max_len, n_kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The whole model's decoding state: one entry per layer plus each row's next position."""

    layers: tuple
    pos: jax.Array  # [B] int32: tokens consumed so far by each row

    @property
    def max_len(self) -> int:
        return self.layers[0].k.shape[1]
