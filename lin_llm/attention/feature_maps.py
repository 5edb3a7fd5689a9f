"""Feature maps phi of the linear-attention families, and the local (in-group) kernels.

Every map takes x [B, T, H, d] (after RoPE) and returns features [B, T, H, F] in float32.
Linear attention then scores a pair as phi(q_t) . phi(k_j), so a family is fully described by
its phi, by whether it normalises (divides by the summed scores) and by its local kernel.

Linformer is not here on purpose: it projects the *length* axis (E K with E of shape [k, T]),
so every output mixes all positions, future ones included. It has no causal form and cannot
decode autoregressively; faking one would not be Linformer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / (||x|| + eps): eps keeps zero vectors (padding) at zero instead of NaN."""
    x = x.astype(jnp.float32)
    square = jnp.sum(x * x, axis=-1, keepdims=True)
    # the norm's gradient x / ||x|| is 0/0 at zero: route zero vectors through a safe branch
    norm = jnp.where(square > 0, jnp.sqrt(jnp.where(square > 0, square, 1.0)), 0.0)
    return x / (norm + eps)


def elu_plus_one(x: jax.Array) -> jax.Array:
    """Katharopoulos et al.'s linear transformer."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def relu(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x.astype(jnp.float32))


def cosformer(x: jax.Array, positions: jax.Array, max_len: int) -> jax.Array:
    """cosFormer: relu features re-weighted by cos(pi/2 (t - j) / M), split as
    cos(a_t)cos(a_j) + sin(a_t)sin(a_j) with a_t = pi t / (2M); M = the model's max length keeps
    it causal and decodable (the original uses the sequence length, which peeks at the future)."""
    angle = (jnp.pi / 2) * positions.astype(jnp.float32)[:, :, None, None] / max_len  # [B, T, 1, 1]
    r = relu(x)
    return jnp.concatenate([r * jnp.cos(angle), r * jnp.sin(angle)], axis=-1)


def hedgehog(x: jax.Array, weight: jax.Array) -> jax.Array:
    """Hedgehog: learned per-head map [softmax(x W), softmax(-x W)] (two softmaxes over d, as in
    the paper), W [H, d, d] initialised to the identity."""
    xw = jnp.einsum("bthd,hde->bthe", x.astype(jnp.float32), weight.astype(jnp.float32))
    return jnp.concatenate([jax.nn.softmax(xw, axis=-1), jax.nn.softmax(-xw, axis=-1)], axis=-1)


def lolcats_hedgehog(x: jax.Array, weight: jax.Array, floor: float = 1e-12) -> jax.Array:
    """LoLCATs' Hedgehog map (feature_map.py, SoftmaxDim + FeatureMapMLP without bias):
    [softmax(x W), softmax(-x W)] clamped below at 1e-12 as theirs, W [H, d, f] (F = 2 f)."""
    return jnp.maximum(hedgehog(x, weight), floor)


def lolcats_map_init(seed: int, layer: int, n_heads: int, head_dim: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """LoLCATs' init of the q and k maps (zero_init false): torch's kaiming_uniform_ of a
    [H, d, f] tensor, U(-b, b) with b = sqrt(6 / (d f)) (its fan-in counts d f). Drawn from
    (seed, layer) so that every layer differs and a model is reproducible."""
    bound = math.sqrt(6.0 / (head_dim * width))
    rng = np.random.default_rng([seed, layer, 0x10CA7])
    q, k = (rng.uniform(-bound, bound, (n_heads, head_dim, width)).astype(np.float32) for _ in range(2))
    return q, k


def favor_projection(seed: int, layer: int, n_features: int, head_dim: int) -> np.ndarray:
    """Performer's orthogonal Gaussian random features [n_features, head_dim], fixed per layer.

    Blocks of head_dim orthonormal rows (QR of a Gaussian matrix), each row rescaled to the norm
    of a Gaussian vector, so rows are marginally Gaussian but mutually orthogonal within a block.
    """
    rng = np.random.default_rng([seed, layer])
    blocks = []
    for _ in range(-(-n_features // head_dim)):
        q, _ = np.linalg.qr(rng.standard_normal((head_dim, head_dim)))
        blocks.append(q.T)
    rows = np.concatenate(blocks)[:n_features]
    norms = np.linalg.norm(rng.standard_normal((n_features, head_dim)), axis=1, keepdims=True)
    return (rows * norms).astype(np.float32)


def favor_plus(x: jax.Array, projection: np.ndarray, is_query: bool) -> jax.Array:
    """Performer FAVOR+ positive random features exp(w . x' - |x'|^2 / 2) / sqrt(m), x' = x d^-1/4.

    Queries subtract their own max for stability: a per-query constant factor cancels between
    numerator and normaliser. Keys cannot (a shared max would differ between prefill and step).
    """
    x = x.astype(jnp.float32) * x.shape[-1] ** -0.25
    proj = jnp.einsum("bthd,md->bthm", x, jnp.asarray(projection))
    log_features = proj - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
    if is_query:
        log_features = log_features - jax.lax.stop_gradient(jnp.max(log_features, axis=-1, keepdims=True))
    return jnp.exp(log_features) / math.sqrt(projection.shape[0])


# ------------------------------------------------------------------ local (in-group) kernels


def dot_kernel(score: jax.Array) -> jax.Array:
    return score


def relu2_kernel(score: jax.Array) -> jax.Array:
    """The paper's local kernel relu(q_hat . k_hat)^2."""
    return jnp.square(jax.nn.relu(score))


def yoso_kernel(score: jax.Array) -> jax.Array:
    """YOSO's expected LSH collision (1 - arccos(0.98 x) / pi)^8; 0.98 keeps arccos' gradient finite."""
    return jnp.power(1.0 - jnp.arccos(0.98 * jnp.clip(score, -1.0, 1.0)) / jnp.pi, 8)


def laplace_kernel(score: jax.Array) -> jax.Array:
    """FLASH's Laplace attention function (1 + erf((x - mu) / (std sqrt 2))) / 2, mu = sqrt(1/2),
    std = (4 pi)^-1/2 (flash_pytorch.LaplacianAttnFn, which train-hf.py selects)."""
    mu, std = math.sqrt(0.5), math.sqrt(1.0 / (4.0 * math.pi))
    return 0.5 * (1.0 + jax.lax.erf((score - mu) / (std * math.sqrt(2.0))))


LOCAL_KERNELS = {"dot": dot_kernel, "relu2": relu2_kernel, "yoso": yoso_kernel, "laplace": laplace_kernel}


# ------------------------------------------------------------------ FLASH's extra parts


def offset_scale(x: jax.Array, gamma: jax.Array, beta: jax.Array) -> jax.Array:
    """FLASH's OffsetScale per head: x [B, T, H, d], gamma and beta [P, H, d] -> [B, T, H * P, d],
    part p of head h at h * P + p (so a reshape to [B, T, H, P * d] puts the parts side by side)."""
    b, t, h, d = x.shape
    out = x.astype(jnp.float32)[:, :, :, None, :] * jnp.swapaxes(gamma, 0, 1) + jnp.swapaxes(beta, 0, 1)
    return out.reshape(b, t, h * gamma.shape[0], d)


def t5_causal_buckets(n_lags: int, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """T5's causal relative-position bucket of each lag i - j = 0..n_lags-1 (flash_pytorch's
    T5RelativePositionBias with causal=True): exact below num_buckets / 2, logarithmic up to
    max_distance, then the last bucket. float32 logs, as the original's torch code."""
    n = np.arange(n_lags)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        log_ratio = np.log(n.astype(np.float32) / max_exact) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + np.nan_to_num(log_ratio * (num_buckets - max_exact), neginf=0.0).astype(np.int64)
    return np.where(n < max_exact, n, np.minimum(large, num_buckets - 1))
