"""Softmax attention: the baseline and the teacher of the linearised models.

Shapes: q [B, T, H, D]; k, v [B, S, H_kv, D] with H a multiple of H_kv (grouped-query).
Both forms use ``jax.nn.dot_product_attention`` (fp32 logits and softmax whatever the input
dtype; cuDNN on GPU when it applies).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lin_llm.attention.state import KVCache


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Full causal attention over a whole sequence (training and the reference)."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def init_cache(batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype) -> KVCache:
    shape = (batch, max_len, n_kv_heads, head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def _write(cache: jax.Array, new: jax.Array, pos: jax.Array) -> jax.Array:
    """Write new [B, T, ...] into cache [B, S, ...] at each row's own start position."""
    write_row = lambda c, n, p: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), p, axis=0)
    return jax.vmap(write_row)(cache, new, pos)


def cached_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, pos: jax.Array
) -> tuple[jax.Array, KVCache]:
    """Append T new tokens at positions pos..pos+T-1 (per row) and attend causally over the cache.

    Serves prefill (T = prompt length) and step (T = 1). The caller guarantees
    pos + T <= max_len: dynamic_update_slice would otherwise clamp the write.
    """
    cache = KVCache(k=_write(cache.k, k, pos), v=_write(cache.v, v, pos))
    t, s = q.shape[1], cache.k.shape[1]
    query_pos = pos[:, None] + jnp.arange(t)[None, :]  # [B, T]
    mask = jnp.arange(s)[None, None, :] <= query_pos[:, :, None]  # [B, T, S]
    out = jax.nn.dot_product_attention(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), mask=mask[:, None])
    return out, cache


def verify(q, k, v, cache: KVCache, pos, ancestors):
    """Attend m candidates [B, m, ...] to the cache (positions < pos) and to their own ancestors
    (ancestors [m, m], self included; lower-triangular for a chain). The cache is not changed;
    the candidates' k, v are returned for ``commit``."""
    s = cache.k.shape[1]
    keys = jnp.concatenate([cache.k.astype(q.dtype), k.astype(q.dtype)], axis=1)
    values = jnp.concatenate([cache.v.astype(q.dtype), v.astype(q.dtype)], axis=1)
    past = jnp.broadcast_to(jnp.arange(s)[None, None, :] < pos[:, None, None], (q.shape[0], q.shape[1], s))
    mask = jnp.concatenate([past, jnp.broadcast_to(ancestors[None], (q.shape[0],) + ancestors.shape)], axis=-1)
    return jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None]), (k, v)


def commit(cache: KVCache, pending, pos, path) -> KVCache:
    """Write the candidates along `path` [B, m] (root first) at positions pos, pos+1, ...

    Slots past the accepted ones receive rejected candidates; they lie beyond the row's new
    position, so they are masked until overwritten. The caller keeps pos + m <= max_len.
    """
    k, v = (jnp.take_along_axis(x, path[:, :, None, None], axis=1) for x in pending)
    return KVCache(k=_write(cache.k, k, pos), v=_write(cache.v, v, pos))
