"""Rotary position embeddings (half-split layout, as Hugging Face LLaMA) with its scalings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lin_llm.config import RopeConfig


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> np.ndarray:
    """The per-pair rotation frequencies, float64 numpy, after the configured scaling."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        # LLaMA 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
        # them interpolated smoothly.
        low_freq_wavelen = rope.original_max_len / rope.low_freq_factor
        high_freq_wavelen = rope.original_max_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate x [B, T, H, D] by its positions [B, T]; computed in fp32, returned in x's dtype."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
