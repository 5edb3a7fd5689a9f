"""Sampling, the jitted generation loop, and speculative decoding.

Everything after the prefill runs inside one jitted ``lax.while_loop`` with fixed shapes.
Prompts of different lengths are right-padded: padding never enters a decoding state (see
``LlamaModel.prefill``), and each row continues from its own position.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from lin_llm.attention.state import DecodeState, KVCache


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


# --------------------------------------------------------------------------- prompts


def pad_prompts(prompts, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad a batch of prompts: a [B, T] array (all full length) or a list of token lists.

    Returns ids [B, T_max] and lengths [B].
    """
    if isinstance(prompts, (np.ndarray, jax.Array)):
        ids = np.asarray(prompts)
        if ids.ndim != 2:
            raise ValueError(f"prompt_ids must have shape [batch, length], got {ids.shape}")
        rows = list(ids)
    else:
        rows = [np.asarray(row).reshape(-1) for row in prompts]
    if not rows:
        raise ValueError("no prompts given")
    lengths = np.array([len(row) for row in rows], np.int32)
    if lengths.min() < 1:
        raise ValueError(f"prompt {int(np.argmin(lengths))} is empty: every prompt needs length >= 1")
    ids = np.full((len(rows), lengths.max()), pad_id, np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids, lengths


def _check_request(model, lengths: np.ndarray, max_new_tokens: int, extra: int, temperature: float):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    total = int(lengths.max()) + max_new_tokens + extra
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens})"
            + (f" + {extra} speculative slots" if extra else "")
            + f" = {total} exceeds the model's max_seq_len={model.cfg.max_seq_len}"
        )


def _last_logits(logits, lengths):
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


def _finish(out, eos_id):
    """Everything after a row's first EOS becomes EOS."""
    if eos_id is None:
        return out
    seen = jnp.cumsum(out == eos_id, axis=1) - (out == eos_id) > 0
    return jnp.where(seen, eos_id, out)


def _speculative_output(full, n_out, max_new_tokens, eos_id):
    """The first max_new_tokens of each row's output buffer, EOS-filled past a row that stopped
    (its buffer holds n_out real tokens) and past its first EOS."""
    out = full[:, :max_new_tokens]
    if eos_id is not None:
        out = jnp.where(jnp.arange(max_new_tokens)[None, :] < n_out[:, None], out, eos_id)
    return _finish(out, eos_id)


def _append_accepted(out, n_out, done, active, proposed, n_acc, new_last, *, stream, max_new_tokens, eos_id):
    """One speculative round's output: each active row gains its first n_acc proposed tokens
    [B, k], then new_last (the target's own token), written at its position n_out and streamed.
    Returns the new (out, n_out, done): a row is done once one of those tokens is EOS."""
    rows = jnp.arange(out.shape[0])
    tokens = jnp.concatenate([proposed, jnp.zeros_like(proposed[:, :1])], axis=1).at[rows, n_acc].set(new_last)
    write = jax.vmap(lambda o, t, at: jax.lax.dynamic_update_slice_in_dim(o, t, at, axis=0))
    out = jnp.where(active[:, None], write(out, tokens, n_out), out)
    _emit(stream, tokens, jnp.where(active, jnp.minimum(n_acc + 1, max_new_tokens - n_out), 0))
    if eos_id is not None:
        new_eos = jnp.any((tokens == eos_id) & (jnp.arange(tokens.shape[1])[None, :] <= n_acc[:, None]), axis=1)
        done = done | (active & new_eos)
    return out, n_out + jnp.where(active, n_acc + 1, 0), done


# --------------------------------------------------------------------------- plain decoding


def _emit(stream, tokens, counts):
    """Hand tokens [B, k] (the first counts[r] of row r are new) to the host, in order."""
    if stream is not None:
        io_callback(stream, None, tokens, counts, ordered=True)


@functools.partial(
    jax.jit, static_argnames=("max_new_tokens", "max_len", "temperature", "top_k", "top_p", "eos_id", "stream")
)
def _generate(model, ids, lengths, key, *, max_new_tokens, max_len, temperature, top_k, top_p, eos_id, stream):
    batch = ids.shape[0]
    draw = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
    logits, state = model.prefill(ids, model.init_state(batch, max_len), lengths)
    key, sub = jax.random.split(key)
    token = draw(_last_logits(logits, lengths), sub)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
    done = token == eos_id if eos_id is not None else jnp.zeros((batch,), bool)
    _emit(stream, token[:, None], jnp.ones((batch,), jnp.int32))

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, state, out, done, key = carry
        logits, state = model.step(token, state)
        key, sub = jax.random.split(key)
        token = draw(logits, sub)
        _emit(stream, token[:, None], (~done).astype(jnp.int32))
        if eos_id is not None:
            done = done | (token == eos_id)
        return i + 1, token, state, out.at[:, i].set(token), done, key

    i, _, _, out, _, _ = jax.lax.while_loop(cond, body, (1, token, state, out, done, key))
    out = jnp.where(jnp.arange(max_new_tokens)[None, :] < i, out, eos_id if eos_id is not None else 0)
    return _finish(out, eos_id)


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
    _check_request(model, lengths, max_new_tokens, 0, temperature)
    return _generate(
        model, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(seed),
        max_new_tokens=max_new_tokens, max_len=int(lengths.max()) + max_new_tokens, temperature=float(temperature),
        top_k=top_k, top_p=top_p, eos_id=eos_id, stream=stream,
    )


# --------------------------------------------------------------------------- speculative decoding


def _select_states(states: Sequence[DecodeState], index: jax.Array) -> DecodeState:
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


def _probs(logits, temperature, top_k, top_p):
    return jnp.exp(process_logits(logits, temperature, top_k, top_p))


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
    greedy = temperature == 0.0
    draw = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

    logits, t_state = target.prefill(ids, target.init_state(batch, max_len), lengths)
    _, d_state = draft.prefill(ids, draft.init_state(batch, max_len), lengths)
    key, sub = jax.random.split(key)
    last = draw(_last_logits(logits, lengths), sub)  # not yet fed to either model
    width = max_new_tokens + gamma + 1
    out = jnp.zeros((batch, width), jnp.int32).at[:, 0].set(last)
    n_out = jnp.ones((batch,), jnp.int32)
    done = last == eos_id if eos_id is not None else jnp.zeros((batch,), bool)
    stats = jnp.zeros((3,), jnp.int32)  # target calls, proposed, accepted (over active rows)
    _emit(stream, last[:, None], jnp.ones((batch,), jnp.int32))

    def cond(carry):
        *_, n_out, done, _, _ = carry
        return jnp.any((n_out < max_new_tokens) & ~done)

    def body(carry):
        t_state, d_state, last, out, n_out, done, key, stats = carry
        active = (n_out < max_new_tokens) & ~done
        # 1. the draft proposes gamma tokens, one step at a time, keeping every state
        d_states, drafts, q_logits, token = [d_state], [], [], last
        for _ in range(gamma + 1):  # the extra step feeds d_gamma, for when all are accepted
            step_logits, d_state = draft.step(token, d_state)
            d_states.append(d_state)
            key, sub = jax.random.split(key)
            token = draw(step_logits, sub)
            q_logits.append(step_logits)
            drafts.append(token)
        drafts = jnp.stack(drafts[:gamma], axis=1)  # [B, gamma]
        q_logits = jnp.stack(q_logits[:gamma], axis=1)  # [B, gamma, V]
        # 2. the target scores last + all drafts in ONE verify pass
        candidates = jnp.concatenate([last[:, None], drafts], axis=1)
        p_logits, pending = target.verify(candidates, t_state)  # p_logits[:, i] predicts candidate i+1
        key, k_accept, k_fix = jax.random.split(key, 3)
        if greedy:
            target_choice = jnp.argmax(p_logits, axis=-1).astype(jnp.int32)  # [B, gamma+1]
            accepted = drafts == target_choice[:, :gamma]
            correction = target_choice
        else:
            p = _probs(p_logits, temperature, top_k, top_p)  # [B, gamma+1, V]
            q = _probs(q_logits, temperature, top_k, top_p)  # [B, gamma, V]
            p_d = jnp.take_along_axis(p[:, :gamma], drafts[..., None], axis=-1)[..., 0]
            q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
            u = jax.random.uniform(k_accept, drafts.shape)
            accepted = u * q_d < p_d  # accept with probability min(1, p/q)
            residual = jnp.maximum(p[:, :gamma] - q, 0.0)
            residual = jnp.concatenate([residual, p[:, gamma:]], axis=1)  # all accepted: the bonus from p
            correction = jax.random.categorical(k_fix, jnp.log(residual)).astype(jnp.int32)
        n_acc = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1)  # leading accepted drafts
        n_acc = jnp.where(active, n_acc, 0)
        new_last = correction[rows, n_acc]
        # 3. outputs: the accepted drafts, then the correction (or bonus) token
        out, n_out, done = _append_accepted(
            out, n_out, done, active, drafts, n_acc, new_last, stream=stream, max_new_tokens=max_new_tokens, eos_id=eos_id
        )
        # 4. commit last + accepted drafts into both states (inactive rows: nothing)
        n_commit = jnp.where(active, n_acc + 1, 0)
        path = jnp.broadcast_to(jnp.arange(gamma + 1), (batch, gamma + 1))
        t_state = target.commit(t_state, pending, path, n_commit)
        d_state = _select_states(d_states, n_commit)
        last = jnp.where(active, new_last, last)
        stats = stats + jnp.stack([1, jnp.sum(active) * gamma, jnp.sum(n_acc)]).astype(jnp.int32)
        return t_state, d_state, last, out, n_out, done, key, stats

    carry = (t_state, d_state, last, out, n_out, done, key, stats)
    t_state, d_state, last, full, n_out, done, key, stats = jax.lax.while_loop(cond, body, carry)
    out = _speculative_output(full, n_out, max_new_tokens, eos_id)
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
        raise ValueError(f"gamma={gamma} must be >= 1")
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(
            f"the draft's vocabulary ({draft.cfg.vocab_size}) differs from the target's ({target.cfg.vocab_size}): "
            "they must share a tokenizer"
        )
    ids, lengths = pad_prompts(prompt_ids)
    for model in (target, draft):
        _check_request(model, lengths, max_new_tokens, gamma + 1, temperature)
    out, stats, states = _speculative(
        target, draft, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(seed),
        max_new_tokens=max_new_tokens, max_len=int(lengths.max()) + max_new_tokens + gamma + 1, gamma=gamma,
        temperature=float(temperature), top_k=top_k, top_p=top_p, eos_id=eos_id, stream=stream,
    )
    calls, proposed, accepted = (int(x) for x in stats)
    generated = int(np.sum(np.asarray(_generated_counts(out, eos_id, max_new_tokens))))
    summary = {
        "target_calls": calls + 1,  # + the prefill
        "acceptance_rate": accepted / max(proposed, 1),
        "mean_tokens_per_target_call": generated / ids.shape[0] / (calls + 1),
    }
    return (out, summary, states) if return_states else (out, summary)


def _generated_counts(out, eos_id, max_new_tokens):
    if eos_id is None:
        return jnp.full((out.shape[0],), max_new_tokens)
    first = jnp.argmax(out == eos_id, axis=1)
    return jnp.where(jnp.any(out == eos_id, axis=1), first + 1, max_new_tokens)
