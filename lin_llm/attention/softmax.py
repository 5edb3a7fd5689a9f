"""Softmax attention: the baseline and the teacher of the linearised models.

Shapes: q [B, T, H, D]; k, v [B, S, H_kv, D] with H a multiple of H_kv (grouped-query); the KV
cache is [B, H_kv, S, D]. Training uses ``jax.nn.dot_product_attention`` (cuDNN on GPU when it
applies); the cached forms attend in the cache's own layout. Logits and softmax are fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lin_llm.attention.state import KVCache

F32 = jnp.float32


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Full causal attention over a whole sequence (training and the reference)."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def init_cache(batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype) -> KVCache:
    shape = (batch, n_kv_heads, max_len, head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def _write(cache: jax.Array, new: jax.Array, pos: jax.Array) -> jax.Array:
    """Write new [B, T, H_kv, D] into cache [B, H_kv, S, D] at each row's own start position."""
    new = jnp.swapaxes(new, 1, 2).astype(cache.dtype)
    write_row = lambda c, n, p: jax.lax.dynamic_update_slice_in_dim(c, n, p, axis=1)
    return jax.vmap(write_row)(cache, new, pos)


# One decoded token (T = 1) contracts with the cache by a multiply-reduce: XLA CPU fuses it and
# reads the loop-carried cache in place, where a dot transposes the whole cache every step
# (measured 1.5x slower per token on the tiny model). Longer T (prefill, verify) use dots.
# The multiply-reduce is fast only while both operands are broadcasts, which holds when each KV
# head serves >= 2 query heads. With one (MHA), XLA drops the size-1 group axis, the cache is no
# longer broadcast, and XLA CPU runs an elementwise product plus a reduction instead: ~3x slower
# per token on a 4-layer MHA model (8x in the run). So a group of one is padded with a
# zero query row, which keeps the axis, and the extra row is dropped after.


def _one_token_group(x):
    """x [B, H_kv, rep, ...] with the group axis padded to >= 2 (zeros) for the multiply-reduce."""
    if x.shape[2] > 1:
        return x
    return jnp.concatenate([x, jnp.zeros_like(x)], axis=2)


def _scores(q, k):
    """Scaled logits [B, H_kv, rep, T, S] (fp32) of q [B, T, H, D] against k [B, H_kv, S, D]."""
    b, t, h, d = q.shape
    rep = h // k.shape[1]
    grouped = jnp.moveaxis(q.reshape(b, t, k.shape[1], rep, d), 1, 3)  # [B, H_kv, rep, T, D]
    if t == 1:
        padded = _one_token_group(grouped[:, :, :, 0].astype(F32))  # [B, H_kv, >= 2, D]
        logits = jnp.sum(padded[:, :, :, None] * k[:, :, None].astype(F32), axis=-1)[:, :, :rep, None]
    else:
        logits = jnp.einsum("bkgtd,bksd->bkgts", grouped, k.astype(q.dtype), preferred_element_type=F32)
    return logits / jnp.sqrt(F32(d))


def _mix(weights, v):
    """sum_s weights [B, H_kv, rep, T, S] * v [B, H_kv, S, D] -> [B, T, H_kv, rep, D] (fp32)."""
    if weights.shape[3] == 1:
        rep = weights.shape[2]
        padded = _one_token_group(weights[:, :, :, 0].astype(F32))  # [B, H_kv, >= 2, S]
        return jnp.sum(padded[..., None] * v[:, :, None].astype(F32), axis=3)[:, None, :, :rep]
    return jnp.einsum("bkgts,bksd->btkgd", weights.astype(v.dtype), v, preferred_element_type=F32)


def _attend(q, blocks):
    """Softmax attention of q [B, T, H, D] over the concatenation of `blocks`, each (k, v
    [B, H_kv, S_i, D], mask broadcastable to [B, 1, 1, T, S_i]); out [B, T, H, D] in q's dtype."""
    logits = jnp.concatenate([jnp.where(mask, _scores(q, k), -jnp.inf) for k, _, mask in blocks], axis=-1)
    weights = jax.nn.softmax(logits, axis=-1)
    out, start = 0.0, 0
    for k, v, _ in blocks:
        out = out + _mix(weights[..., start : start + k.shape[2]], v)
        start += k.shape[2]
    return out.reshape(q.shape).astype(q.dtype)


def cached_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, pos: jax.Array
) -> tuple[jax.Array, KVCache]:
    """Append T new tokens at positions pos..pos+T-1 (per row) and attend causally over the cache.

    Serves prefill (T = prompt length) and step (T = 1). The caller guarantees
    pos + T <= max_len: dynamic_update_slice would otherwise clamp the write.
    """
    cache = KVCache(k=_write(cache.k, k, pos), v=_write(cache.v, v, pos))
    t, s = q.shape[1], cache.k.shape[2]
    query_pos = pos[:, None] + jnp.arange(t)[None, :]  # [B, T]
    mask = jnp.arange(s)[None, None, :] <= query_pos[:, :, None]  # [B, T, S]
    return _attend(q, [(cache.k, cache.v, mask[:, None, None])]), cache


def verify(q, k, v, cache: KVCache, pos, ancestors):
    """Attend m candidates [B, m, ...] to the cache (positions < pos) and to their own ancestors
    (ancestors [m, m], self included; lower-triangular for a chain). The cache is not changed;
    the candidates' k, v are returned for ``commit``."""
    past = (jnp.arange(cache.k.shape[2])[None, :] < pos[:, None])[:, None, None, None]  # [B, 1, 1, 1, S]
    candidates = (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), ancestors)
    return _attend(q, [(cache.k, cache.v, past), candidates]), (k, v)


def commit(cache: KVCache, pending, pos, path) -> KVCache:
    """Write the candidates along `path` [B, m] (root first) at positions pos, pos+1, ...

    Slots past the accepted ones receive rejected candidates; they lie beyond the row's new
    position, so they are masked until overwritten. The caller keeps pos + m <= max_len.
    """
    k, v = (jnp.take_along_axis(x, path[:, :, None, None], axis=1) for x in pending)
    return KVCache(k=_write(cache.k, k, pos), v=_write(cache.v, v, pos))
