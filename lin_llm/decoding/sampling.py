"""Sampling: temperature, top-k and top-p (nucleus) filtering, greedy at temperature 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def process_logits(logits: jax.Array, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    """Log-probabilities after temperature, top-k and top-p (nucleus) filtering; -inf where cut.

    temperature must be > 0 here (greedy decoding takes the argmax of the raw logits).
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < top_p
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.nn.log_softmax(logits, axis=-1)


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k=None, top_p=None) -> jax.Array:
    """One token per row from logits [..., V]; temperature 0 is greedy."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, process_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


def probs(logits, temperature, top_k, top_p):
    return jnp.exp(process_logits(logits, temperature, top_k, top_p))
