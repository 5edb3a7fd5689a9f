"""Sampling and the jitted generation loop (prefill, then one ``lax.while_loop`` over tokens)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


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


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id")
)
def _generate(graphdef, params, prompt_ids, key, *, max_new_tokens, temperature, top_k, top_p, eos_id):
    model = nnx.merge(graphdef, params)
    batch, prompt_len = prompt_ids.shape
    draw = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
    state = model.init_state(batch, prompt_len + max_new_tokens)
    logits, state = model.prefill(prompt_ids, state)
    key, sub = jax.random.split(key)
    token = draw(logits[:, -1], sub)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
    done = token == eos_id if eos_id is not None else jnp.zeros((batch,), bool)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, state, out, done, key = carry
        logits, state = model.step(token, state)
        key, sub = jax.random.split(key)
        token = draw(logits, sub)
        if eos_id is not None:  # rows that finished keep emitting EOS
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        return i + 1, token, state, out.at[:, i].set(token), done, key

    i, *_, out, done, _ = jax.lax.while_loop(cond, body, (1, token, state, out, done, key))
    if eos_id is not None:  # positions never reached because every row had stopped
        out = jnp.where(jnp.arange(max_new_tokens)[None, :] >= i, eos_id, out)
    return out


def generate(
    model,
    prompt_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int = 0,
) -> jax.Array:
    """New tokens [B, max_new_tokens] continuing prompt_ids [B, T] (rows of equal length).

    After a row emits ``eos_id`` it is filled with ``eos_id``.
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must have shape [batch, length >= 1], got {prompt_ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    total = prompt_ids.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"the model's max_seq_len={model.cfg.max_seq_len}"
        )
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    graphdef, params = nnx.split(model)
    return _generate(
        graphdef,
        params,
        prompt_ids,
        jax.random.key(seed),
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
    )
