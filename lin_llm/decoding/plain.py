"""Plain decoding: a chunked prefill, then the whole token loop in one jitted ``lax.while_loop``.

Prompts of different lengths are right-padded: padding never enters a decoding state (see
``LlamaModel.prefill``), and each row continues from its own position.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lin_llm.decoding.common import check_request, emit, finish_at_eos, last_logits, pad_prompts
from lin_llm.decoding.sampling import check_sampling, sample


@functools.partial(
    jax.jit, static_argnames=("max_new_tokens", "max_len", "temperature", "top_k", "top_p", "eos_id", "stream")
)
def _generate(model, ids, lengths, key, *, max_new_tokens, max_len, temperature, top_k, top_p, eos_id, stream):
    batch = ids.shape[0]
    draw = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
    logits, state = model.prefill(ids, model.init_state(batch, max_len), lengths)
    key, sub = jax.random.split(key)
    token = draw(last_logits(logits, lengths), sub)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
    done = token == eos_id if eos_id is not None else jnp.zeros((batch,), bool)
    emit(stream, token[:, None], jnp.ones((batch,), jnp.int32))

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, state, out, done, key = carry
        logits, state = model.step(token, state)
        key, sub = jax.random.split(key)
        token = draw(logits, sub)
        emit(stream, token[:, None], (~done).astype(jnp.int32))
        if eos_id is not None:
            done = done | (token == eos_id)
        return i + 1, token, state, out.at[:, i].set(token), done, key

    i, _, _, out, _, _ = jax.lax.while_loop(cond, body, (1, token, state, out, done, key))
    out = jnp.where(jnp.arange(max_new_tokens)[None, :] < i, out, eos_id if eos_id is not None else 0)
    return finish_at_eos(out, eos_id)


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
    stream=None,
) -> jax.Array:
    """New tokens [B, max_new_tokens] continuing each prompt.

    prompt_ids: a [B, T] array, or a list of token lists of different lengths. After a row
    emits ``eos_id`` the rest of it is ``eos_id``. Softmax models keep a KV cache; linear
    attention models an O(1) state. ``stream(tokens [B, k], counts [B])``, if given, is called
    on the host as tokens are generated (the first counts[r] tokens of row r are new).
    """
    ids, lengths = pad_prompts(prompt_ids)
    check_request(model, ids, lengths, max_new_tokens, 0)
    check_sampling(temperature, top_k, top_p, model.cfg.vocab_size)
    return _generate(
        model, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(seed),
        max_new_tokens=max_new_tokens, max_len=int(lengths.max()) + max_new_tokens, temperature=float(temperature),
        top_k=top_k, top_p=top_p, eos_id=eos_id, stream=stream,
    )
