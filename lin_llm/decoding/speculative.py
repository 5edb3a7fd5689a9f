"""Speculative decoding: a draft model proposes gamma tokens, the target checks them in ONE pass.

The acceptance rule makes the output distribution exactly the target's; both models' states are
rolled back to the accepted prefix (the target by committing it, the draft by selection).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lin_llm.attention.state import DecodeState, KVCache
from lin_llm.decoding.common import (
    append_accepted,
    check_request,
    emit,
    generated_counts,
    last_logits,
    pad_prompts,
    speculative_output,
)
from lin_llm.decoding.sampling import check_sampling, probs, sample
from lin_llm.errors import DecodeError


def select_states(states: Sequence[DecodeState], index: jax.Array) -> DecodeState:
    """Row r of the result is row r of states[index[r]]: rollback as a selection.

    A KV cache is append-only, so its newest version serves every earlier position (slots past
    the selected position are masked until overwritten); linear-attention states are selected.
    """
    layers = []
    for per_step in zip(*(s.layers for s in states)):
        if isinstance(per_step[-1], KVCache):
            layers.append(per_step[-1])
        else:
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_step)
            layers.append(jax.tree.map(lambda x: x[index, jnp.arange(x.shape[1])], stacked))
    pos = jnp.stack([s.pos for s in states])[index, jnp.arange(index.shape[0])]
    return DecodeState(layers=tuple(layers), pos=pos)


def _propose(draft, d_state, last, key, gamma: int, draw):
    """gamma draft tokens [B, gamma] and their logits, one step at a time from ``last``, with the
    draft's state after each step (one more step feeds the last draft, for when all are accepted)."""
    d_states, drafts, q_logits, token = [d_state], [], [], last
    for _ in range(gamma + 1):
        step_logits, d_state = draft.step(token, d_state)
        d_states.append(d_state)
        key, sub = jax.random.split(key)
        token = draw(step_logits, sub)
        q_logits.append(step_logits)
        drafts.append(token)
    return jnp.stack(drafts[:gamma], axis=1), jnp.stack(q_logits[:gamma], axis=1), d_states, key


def accept(drafts, q_logits, p_logits, key, temperature, top_k, top_p):
    """The acceptance rule: (number of leading drafts accepted [B], each position's replacement
    token [B, gamma + 1]). p_logits[:, i] is the target's prediction after candidate i.

    Greedy: accept while the draft equals the target's argmax. Sampling: accept with probability
    min(1, p/q); the first rejection resamples from normalize(max(0, p - q)); when all pass, the
    bonus token comes from p. The output distribution is then exactly the target's.
    """
    gamma = drafts.shape[1]
    if temperature == 0.0:
        choice = jnp.argmax(p_logits, axis=-1).astype(jnp.int32)  # [B, gamma+1]
        accepted, correction = drafts == choice[:, :gamma], choice
    else:
        k_accept, k_fix = jax.random.split(key)
        p = probs(p_logits, temperature, top_k, top_p)  # [B, gamma+1, V]
        q = probs(q_logits, temperature, top_k, top_p)  # [B, gamma, V]
        p_d = jnp.take_along_axis(p[:, :gamma], drafts[..., None], axis=-1)[..., 0]
        q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
        accepted = jax.random.uniform(k_accept, drafts.shape) * q_d < p_d
        residual = jnp.concatenate([jnp.maximum(p[:, :gamma] - q, 0.0), p[:, gamma:]], axis=1)
        correction = jax.random.categorical(k_fix, jnp.log(residual)).astype(jnp.int32)
    return jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1), correction


@functools.partial(
    jax.jit,
    static_argnames=(
        "max_new_tokens", "max_len", "gamma", "temperature", "top_k", "top_p", "eos_id", "stream"
    ),
)
def _speculative(target, draft, ids, lengths, key, *, max_new_tokens, max_len, gamma, temperature, top_k, top_p, eos_id,
                 stream):
    batch = ids.shape[0]
    rows = jnp.arange(batch)
    draw = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

    logits, t_state = target.prefill(ids, target.init_state(batch, max_len), lengths)
    _, d_state = draft.prefill(ids, draft.init_state(batch, max_len), lengths)
    key, sub = jax.random.split(key)
    last = draw(last_logits(logits, lengths), sub)  # not yet fed to either model
    out = jnp.zeros((batch, max_new_tokens + gamma + 1), jnp.int32).at[:, 0].set(last)
    n_out = jnp.ones((batch,), jnp.int32)
    done = last == eos_id if eos_id is not None else jnp.zeros((batch,), bool)
    stats = jnp.zeros((3,), jnp.int32)  # target calls, proposed, accepted (over active rows)
    emit(stream, last[:, None], jnp.ones((batch,), jnp.int32))

    def cond(carry):
        *_, n_out, done, _, _ = carry
        return jnp.any((n_out < max_new_tokens) & ~done)

    def body(carry):
        t_state, d_state, last, out, n_out, done, key, stats = carry
        active = (n_out < max_new_tokens) & ~done
        drafts, q_logits, d_states, key = _propose(draft, d_state, last, key, gamma, draw)
        # the target scores last + all drafts in ONE verify pass
        p_logits, pending = target.verify(jnp.concatenate([last[:, None], drafts], axis=1), t_state)
        key, sub = jax.random.split(key)
        n_acc, correction = accept(drafts, q_logits, p_logits, sub, temperature, top_k, top_p)
        n_acc = jnp.where(active, n_acc, 0)
        new_last = correction[rows, n_acc]
        # outputs: the accepted drafts, then the correction (or bonus) token
        out, n_out, done = append_accepted(
            out, n_out, done, active, drafts, n_acc, new_last, stream=stream, max_new_tokens=max_new_tokens, eos_id=eos_id
        )
        # commit last + accepted drafts into both states (inactive rows: nothing)
        n_commit = jnp.where(active, n_acc + 1, 0)
        t_state = target.commit(t_state, pending, jnp.broadcast_to(jnp.arange(gamma + 1), (batch, gamma + 1)), n_commit)
        d_state = select_states(d_states, n_commit)
        last = jnp.where(active, new_last, last)
        stats = stats + jnp.stack([1, jnp.sum(active) * gamma, jnp.sum(n_acc)]).astype(jnp.int32)
        return t_state, d_state, last, out, n_out, done, key, stats

    carry = (t_state, d_state, last, out, n_out, done, key, stats)
    t_state, d_state, last, full, n_out, done, key, stats = jax.lax.while_loop(cond, body, carry)
    out = speculative_output(full, n_out, max_new_tokens, eos_id)
    return out, stats, {"target": t_state, "draft": d_state, "tokens": full, "n_tokens": n_out}


def speculative_generate(
    target,
    draft,
    prompt_ids,
    max_new_tokens: int,
    *,
    gamma: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int = 0,
    return_states: bool = False,
    stream=None,
):
    """Speculative decoding: ``draft`` proposes gamma tokens, ``target`` checks them in one pass.

    The acceptance rule (accept with probability min(1, p/q), resample from
    normalize(max(0, p - q)) at the first rejection, a bonus token from p when all pass; greedy:
    accept iff the draft equals the target's argmax) makes the output distribution exactly the
    target's. Both models' states are rolled back to the accepted prefix: the target by
    committing it, the draft by selecting its per-position state. ``stream`` as in generate.

    Returns (tokens [B, max_new_tokens], stats) where stats has acceptance_rate,
    mean_tokens_per_target_call, target_calls. With return_states, also a dict of both final
    states and every token generated ("tokens" [B, >= max_new_tokens], "n_tokens" [B]): the
    states have consumed the prompt and tokens[:, :n_tokens - 1].
    """
    if gamma < 1:
        raise DecodeError(f"gamma={gamma} must be >= 1")
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise DecodeError(
            f"the draft's vocabulary ({draft.cfg.vocab_size} tokens) differs from the target's "
            f"({target.cfg.vocab_size}): speculative decoding needs models that share a tokenizer"
        )
    ids, lengths = pad_prompts(prompt_ids)
    for model in (target, draft):
        check_request(model, ids, lengths, max_new_tokens, gamma + 1)
    check_sampling(temperature, top_k, top_p, target.cfg.vocab_size)
    out, stats, states = _speculative(
        target, draft, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(seed),
        max_new_tokens=max_new_tokens, max_len=int(lengths.max()) + max_new_tokens + gamma + 1, gamma=gamma,
        temperature=float(temperature), top_k=top_k, top_p=top_p, eos_id=eos_id, stream=stream,
    )
    calls, proposed, accepted = (int(x) for x in stats)
    generated = int(np.sum(np.asarray(generated_counts(out, eos_id, max_new_tokens))))
    summary = {
        "target_calls": calls + 1,  # + the prefill
        "acceptance_rate": accepted / max(proposed, 1),
        "mean_tokens_per_target_call": generated / ids.shape[0] / (calls + 1),
    }
    return (out, summary, states) if return_states else (out, summary)
