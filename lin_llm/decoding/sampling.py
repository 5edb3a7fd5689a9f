"""Sampling: temperature, top-k and top-p (nucleus) filtering, greedy at temperature 0."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from lin_llm.errors import DecodeError


def check_sampling(temperature, top_k, top_p, vocab_size: int, greedy_only: str | None = None) -> None:
    """Refuse sampling arguments that would sample from NaNs, be silently ignored or mean nothing:
    temperature finite and >= 0 (0 is greedy); top_k an integer in [1, vocab_size] and top_p in
    (0, 1], both only when sampling (temperature > 0); none but greedy decoding for a mode that is
    greedy only (``greedy_only`` names it). None means off for top_k and top_p."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise DecodeError(f"temperature={temperature!r} (--temperature) must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                              or not 1 <= top_k <= vocab_size):
        raise DecodeError(
            f"top_k={top_k!r} (--top-k) must be an integer from 1 to the vocabulary size {vocab_size}: the number "
            "of most likely tokens sampled from; leave it out to sample from all"
        )
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise DecodeError(
            f"top_p={top_p!r} (--top-p) must be a number in (0, 1]: the probability mass sampled from; "
            "leave it out to sample from all"
        )
    used = [name for name, value in (("top_k (--top-k)", top_k), ("top_p (--top-p)", top_p)) if value is not None]
    if greedy_only is not None and (temperature > 0 or used):
        given = ", ".join(([f"temperature={temperature} (--temperature)"] if temperature > 0 else []) + used)
        raise DecodeError(f"{greedy_only} is greedy: it would ignore {given}; leave {'them' if ',' in given else 'it'} "
                          "out, or use plain or speculative decoding to sample")
    if temperature == 0 and used:
        raise DecodeError(
            f"{' and '.join(used)} shape{'s' if len(used) == 1 else ''} sampling, but temperature=0 (--temperature 0, "
            f"the default) decodes greedily and would ignore {'them' if len(used) > 1 else 'it'}: give a temperature "
            f"> 0, or leave {'them' if len(used) > 1 else 'it'} out"
        )


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
