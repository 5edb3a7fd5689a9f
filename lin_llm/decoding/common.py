"""What plain, speculative and Medusa decoding share: prompts, request checks, the output buffer,
streaming to the host."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from lin_llm.errors import DecodeError


def pad_prompts(prompts, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad a batch of prompts: a [B, T] array (all full length) or a list of token lists.

    Returns ids [B, T_max] and lengths [B].
    """
    if isinstance(prompts, (np.ndarray, jax.Array)):
        ids = np.asarray(prompts)
        if ids.ndim != 2:
            raise DecodeError(f"prompt_ids must have shape [batch, length], got {ids.shape}")
        rows = list(ids)
    else:
        rows = [np.asarray(row).reshape(-1) for row in prompts]
    for i, row in enumerate(rows):
        if row.size and not np.issubdtype(row.dtype, np.integer):
            raise DecodeError(f"prompt {i} holds {row.dtype} values, not token ids (integers)")
        if row.size and not (np.iinfo(np.int32).min <= row.min() and row.max() <= np.iinfo(np.int32).max):
            value = row.max() if row.max() > 0 else row.min()
            raise DecodeError(f"prompt {i} has the value {value}, which is no token id (ids are below 2**31)")
    if not rows:
        raise DecodeError("no prompts given")
    lengths = np.array([len(row) for row in rows], np.int32)
    if lengths.min() < 1:
        raise DecodeError(f"prompt {int(np.argmin(lengths))} is empty: every prompt needs length >= 1")
    ids = np.full((len(rows), lengths.max()), pad_id, np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids, lengths


def check_request(model, ids: np.ndarray, lengths: np.ndarray, max_new_tokens: int, extra: int) -> None:
    """Refuse a request the model cannot serve: no new tokens, a token id outside its vocabulary, or
    more tokens in all than its max_seq_len. ``ids``/``lengths`` as pad_prompts returns them."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens={max_new_tokens!r} (--max-new-tokens) must be an integer >= 1")
    vocab = model.cfg.vocab_size
    real = np.arange(ids.shape[1])[None, :] < lengths[:, None]  # padding is not the caller's
    bad = real & ((ids < 0) | (ids >= vocab))
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise DecodeError(
            f"prompt {row} has token id {int(ids[row, col])} at position {col}, outside the model's vocabulary "
            f"[0, {vocab}): it was encoded with another tokenizer, or is not a token id"
        )
    total = int(lengths.max()) + max_new_tokens + extra
    if total > model.cfg.max_seq_len:
        raise DecodeError(
            f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens})"
            + (f" + {extra} speculative slots" if extra else "")
            + f" = {total} exceeds the model's max_seq_len={model.cfg.max_seq_len}"
        )


def last_logits(logits, lengths):
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


def finish_at_eos(out, eos_id):
    """Everything after a row's first EOS becomes EOS."""
    if eos_id is None:
        return out
    seen = jnp.cumsum(out == eos_id, axis=1) - (out == eos_id) > 0
    return jnp.where(seen, eos_id, out)


def speculative_output(full, n_out, max_new_tokens, eos_id):
    """The first max_new_tokens of each row's output buffer, EOS-filled past a row that stopped
    (its buffer holds n_out real tokens) and past its first EOS."""
    out = full[:, :max_new_tokens]
    if eos_id is not None:
        out = jnp.where(jnp.arange(max_new_tokens)[None, :] < n_out[:, None], out, eos_id)
    return finish_at_eos(out, eos_id)


def append_accepted(out, n_out, done, active, proposed, n_acc, new_last, *, stream, max_new_tokens, eos_id):
    """One speculative round's output: each active row gains its first n_acc proposed tokens
    [B, k], then new_last (the target's own token), written at its position n_out and streamed.
    Returns the new (out, n_out, done): a row is done once one of those tokens is EOS."""
    rows = jnp.arange(out.shape[0])
    tokens = jnp.concatenate([proposed, jnp.zeros_like(proposed[:, :1])], axis=1).at[rows, n_acc].set(new_last)
    write = jax.vmap(lambda o, t, at: jax.lax.dynamic_update_slice_in_dim(o, t, at, axis=0))
    out = jnp.where(active[:, None], write(out, tokens, n_out), out)
    emit(stream, tokens, jnp.where(active, jnp.minimum(n_acc + 1, max_new_tokens - n_out), 0))
    if eos_id is not None:
        new_eos = jnp.any((tokens == eos_id) & (jnp.arange(tokens.shape[1])[None, :] <= n_acc[:, None]), axis=1)
        done = done | (active & new_eos)
    return out, n_out + jnp.where(active, n_acc + 1, 0), done


def emit(stream, tokens, counts):
    """Hand tokens [B, k] (the first counts[r] of row r are new) to the host, in order."""
    if stream is not None:
        io_callback(stream, None, tokens, counts, ordered=True)


def generated_counts(out, eos_id, max_new_tokens):
    if eos_id is None:
        return jnp.full((out.shape[0],), max_new_tokens)
    first = jnp.argmax(out == eos_id, axis=1)
    return jnp.where(jnp.any(out == eos_id, axis=1), first + 1, max_new_tokens)
