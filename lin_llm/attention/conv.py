"""The causal depthwise convolution over v that augments linear attention, in its four forms.

conv_t = sum_{s=0}^{K_eff-1} w[s] * v_{t-s}. The parameter is a centred kernel of
`kernel_size` = 2 K_eff - 1 taps, as in the original; its future half is masked functionally
(multiplied by zero), so those taps never act and get zero gradient. Weights are per head
[H, kernel_size] (shared over the head's channels, as the original) or per channel
[H, kernel_size, Dv]. History before position 0 is zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def causal_taps(weight: jax.Array) -> jax.Array:
    """Taps by lag s = 0..K_eff-1 as [K_eff, H, 1 or Dv] from the centred kernel parameter."""
    size = weight.shape[1]
    centre = size // 2
    mask = (jnp.arange(size) <= centre).astype(weight.dtype)  # taps at or before the current token
    w = weight * (mask[None, :, None] if weight.ndim == 3 else mask[None, :])
    w = w[:, : centre + 1][:, ::-1]  # lag s = centre - tap index
    w = w if w.ndim == 3 else w[..., None]
    return jnp.moveaxis(w, 1, 0).astype(F32)


def history_len(kernel_size: int) -> int:
    """Past values of v that decoding must keep: K_eff - 1."""
    return kernel_size // 2


def conv(v: jax.Array, weight: jax.Array, history: jax.Array | None = None) -> jax.Array:
    """Full (and prefill) form: v [B, T, H, Dv] after `history` [B, K_eff-1, H, Dv] (zeros if None)."""
    taps = causal_taps(weight)  # [K, H, 1 or Dv]
    k_eff = taps.shape[0]
    b, t, h, dv = v.shape
    if history is None:
        history = jnp.zeros((b, k_eff - 1, h, dv), F32)
    x = jnp.concatenate([history.astype(F32), v.astype(F32)], axis=1)
    if weight.ndim == 2:
        return _toeplitz_conv(x, taps[..., 0])[:, k_eff - 1 :]
    # per channel: a depthwise convolution; lax convolutions correlate, so lags go in time order
    kernel = taps[::-1].reshape(k_eff, 1, h * dv)
    out = jax.lax.conv_general_dilated(
        x.reshape(b, t + k_eff - 1, h * dv), kernel, window_strides=(1,), padding="VALID",
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=h * dv, precision="highest",
    )
    return out.reshape(b, t, h, dv)


def _toeplitz_conv(x: jax.Array, taps: jax.Array) -> jax.Array:
    """Causal conv of x [B, T, H, D] (zero before 0) with per-head taps [K, H], as two banded
    [L, L] matmuls per block of L >= K tokens (this block and the one before): matmul-shaped
    work runs several times faster than a grouped convolution on CPU and maps to the MXU."""
    k_eff = taps.shape[0]
    b, t, h, d = x.shape
    block = max(64, k_eff)
    pad = (-t) % block
    xb = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, (t + pad) // block, block, h, d)
    previous = jnp.concatenate([jnp.zeros_like(xb[:, :1]), xb[:, :-1]], axis=1)
    lag = jnp.arange(block)[:, None] - jnp.arange(block)[None, :]  # output i minus input j

    def band(extra_lag):  # [H, L, L]: taps[lag + extra_lag] where that is a tap
        index = lag + extra_lag
        inside = (index >= 0) & (index < k_eff)
        return jnp.where(inside[None], jnp.moveaxis(taps[jnp.clip(index, 0, k_eff - 1)], -1, 0), 0.0)

    out = jnp.einsum("hij,bnjhd->bnihd", band(0), xb, precision="highest") + jnp.einsum(
        "hij,bnjhd->bnihd", band(block), previous, precision="highest"
    )
    return out.reshape(b, t + pad, h, d)[:, :t]


def new_history(history: jax.Array, v: jax.Array, n_valid: jax.Array | None = None) -> jax.Array:
    """The last K_eff-1 values after appending v [B, m, H, Dv] (only its first n_valid per row)."""
    k1, m = history.shape[1], v.shape[1]
    window = jnp.concatenate([history, v.astype(history.dtype)], axis=1)
    if n_valid is None:
        return window[:, m:]
    return jax.vmap(lambda w, n: jax.lax.dynamic_slice_in_dim(w, n, k1, axis=0))(window, n_valid)


def step(v: jax.Array, weight: jax.Array, history: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token per row: v [B, H, Dv] -> output [B, H, Dv] and the updated history."""
    taps = causal_taps(weight)
    window = jnp.concatenate([history, v[:, None].astype(history.dtype)], axis=1)  # oldest first
    # the taps reversed to the window's order (loop-invariant work, unlike reversing the window)
    out = _mix(taps[::-1][None], window)[:, 0]
    return out, window[:, 1:]


def unfolded(v: jax.Array, weight: jax.Array, history: jax.Array, ancestors: jax.Array, depths: jax.Array):
    """Verify form: candidates v [B, m, H, Dv] in a tree (ancestors [m, m] incl. self, depths [m]).

    Each candidate convolves its own root-to-node path, then the shared history, so siblings
    never see each other. The taps are first folded into small mixing matrices (candidate i
    from candidate j: [m, m, H, C]; from history row r: [m, K_eff-1, H, C]), so the [m, K_eff]
    windows are never built.
    """
    taps = causal_taps(weight)  # [K, H, C]
    k_eff = taps.shape[0]
    # path[i, s, j]: candidate j is s steps back from i along i's path
    lag_of = depths[:, None] - depths[None, :]  # [m, m]: how far back j is from i
    path = ancestors[:, None, :] & (lag_of[:, None, :] == jnp.arange(k_eff)[None, :, None])  # [m, K, m]
    out = _mix(jnp.einsum("isj,shc->ijhc", path.astype(F32), taps), v)
    k1 = history.shape[1]
    if k1:  # history row r (oldest first) is depths[i] + k1 - r steps back from candidate i
        lag = depths[:, None] + k1 - jnp.arange(k1)[None, :]  # [m, K_eff-1]
        from_history = jnp.where((lag < k_eff)[:, :, None, None], taps[jnp.minimum(lag, k_eff - 1)], 0.0)
        out = out + _mix(from_history, history)
    return out


def _mix(weights: jax.Array, x: jax.Array) -> jax.Array:
    """out[b, i] = sum_j weights[i, j] * x[b, j]: weights [m, n, H, 1 or Dv], x [B, n, H, Dv]."""
    if weights.shape[-1] == 1:
        return jnp.einsum("ijh,bjhd->bihd", weights[..., 0], x.astype(F32))
    return jnp.einsum("ijhd,bjhd->bihd", weights, x.astype(F32))
