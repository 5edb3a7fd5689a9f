"""Medusa decoding: the target's own extra heads propose a token tree, verified in one pass.

Head i (see ``LlamaModel.medusa_logits``) guesses the token i + 2 places ahead. From the
top-k of each head, a static tree of candidates is built (every combination: with top-k
(3, 2), 3 nodes at depth 1 and 6 at depth 2). The target scores all nodes at once with its
verify form (tree mask; for linear attention the conv unfolded along each root-to-node path),
greedily accepts the longest path on which every token is the target's own argmax, commits
that path's state and continues from its last node: the output equals plain greedy decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lin_llm.decoding.common import (
    append_accepted,
    check_request,
    emit,
    generated_counts,
    last_logits,
    pad_prompts,
    speculative_output,
)
from lin_llm.errors import DecodeError


@dataclasses.dataclass(frozen=True)
class Tree:
    """A static candidate tree; node 0 is the root (the token already chosen)."""

    choices: tuple  # per node, the top-k rank chosen at each depth: () for the root
    topk: tuple

    @property
    def size(self) -> int:
        return len(self.choices)

    def arrays(self):
        depth = np.array([len(c) for c in self.choices], np.int32)
        index = {c: i for i, c in enumerate(self.choices)}
        ancestors = np.zeros((self.size, self.size), bool)
        paths = np.zeros((self.size, len(self.topk) + 1), np.int32)  # root-first node indices
        for i, c in enumerate(self.choices):
            for d in range(len(c) + 1):
                ancestors[i, index[c[:d]]] = True
                paths[i, d] = index[c[:d]]
        return depth, ancestors, paths


def build_tree(topk: tuple[int, ...]) -> Tree:
    """Every combination of the top-k[d] guesses of head d, breadth first."""
    if not topk or min(topk) < 1:
        raise DecodeError(f"medusa top-k per head must be a non-empty list of positive ints, got {topk}")
    choices = [()]
    for depth in range(1, len(topk) + 1):
        choices += list(itertools.product(*(range(k) for k in topk[:depth])))
    return Tree(tuple(choices), tuple(topk))


def _candidates(tree: Tree, last, head_logits):
    """Tokens [B, nodes]: the root is `last`; a node at depth d takes head d-1's rank c_d guess."""
    guesses = [jax.lax.top_k(head_logits[:, d], k)[1] for d, k in enumerate(tree.topk)]  # [B, k_d] each
    columns = [last] + [guesses[len(c) - 1][:, c[-1]] for c in tree.choices[1:]]
    return jnp.stack(columns, axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("tree", "max_new_tokens", "max_len", "eos_id", "stream"))
def _medusa(model, ids, lengths, *, tree, max_new_tokens, max_len, eos_id, stream):
    batch, rows = ids.shape[0], jnp.arange(ids.shape[0])
    depth, ancestors, paths = (jnp.asarray(a) for a in tree.arrays())
    parent = paths[jnp.arange(tree.size), jnp.maximum(depth - 1, 0)]
    max_depth = len(tree.topk)

    hidden, logits, state = model.prefill(ids, model.init_state(batch, max_len), lengths, return_hidden=True)
    last = jnp.argmax(last_logits(logits, lengths), axis=-1).astype(jnp.int32)
    heads = model.medusa_logits(last_logits(hidden, lengths)[:, None])[:, 0]  # [B, k, V]
    width = max_new_tokens + max_depth + 1
    out = jnp.zeros((batch, width), jnp.int32).at[:, 0].set(last)
    n_out = jnp.ones((batch,), jnp.int32)
    done = last == eos_id if eos_id is not None else jnp.zeros((batch,), bool)
    stats = jnp.zeros((2,), jnp.int32)  # target calls, accepted tokens
    emit(stream, last[:, None], jnp.ones((batch,), jnp.int32))

    def cond(carry):
        *_, n_out, done, _ = carry
        return jnp.any((n_out < max_new_tokens) & ~done)

    def body(carry):
        state, last, heads, out, n_out, done, stats = carry
        active = (n_out < max_new_tokens) & ~done
        tokens = _candidates(tree, last, heads)
        hidden, logits, pending = model.verify(tokens, state, ancestors, depth, return_hidden=True)
        choice = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # the target's next token after each node
        match = (tokens == choice[:, parent]).at[:, 0].set(True)  # a node agrees with its parent's argmax
        on_path = jnp.arange(max_depth + 1)[None, :] <= depth[:, None]  # [nodes, depth+1]
        path_ok = jnp.all(jnp.where(on_path[None], match[:, paths], True), axis=2)  # [B, nodes]
        best = jnp.argmax(jnp.where(path_ok, depth[None, :], -1), axis=1)  # deepest accepted (first on ties)
        n_acc = jnp.where(active, depth[best], 0)
        new_last = choice[rows, best]
        path = paths[best]  # [B, depth+1]
        out, n_out, done = append_accepted(
            out, n_out, done, active, tokens[rows[:, None], path[:, 1:]], n_acc, new_last,
            stream=stream, max_new_tokens=max_new_tokens, eos_id=eos_id,
        )
        state = model.commit(state, pending, path, jnp.where(active, n_acc + 1, 0))
        heads = jnp.where(active[:, None, None], model.medusa_logits(hidden[rows, best][:, None])[:, 0], heads)
        last = jnp.where(active, new_last, last)
        stats = stats + jnp.stack([1, jnp.sum(n_acc)]).astype(jnp.int32)
        return state, last, heads, out, n_out, done, stats

    state, last, heads, out, n_out, done, stats = jax.lax.while_loop(
        cond, body, (state, last, heads, out, n_out, done, stats)
    )
    return speculative_output(out, n_out, max_new_tokens, eos_id), stats


def medusa_generate(model, prompt_ids, max_new_tokens: int, *, topk: tuple[int, ...] = (4, 2, 2), eos_id=None, stream=None):
    """Greedy Medusa decoding with the model's own heads; returns (tokens, stats).
    ``stream`` as in lin_llm.decoding.generate."""
    if model.cfg.medusa_heads == 0:
        raise DecodeError("the model has no Medusa heads (model.medusa_heads=0); train some with train.py "
                          "(model.medusa_heads=4 train.objective=medusa) first")
    if model.cfg.medusa_heads < len(topk):
        raise DecodeError(
            f"the tree needs {len(topk)} Medusa heads (top-k {topk}) but the model has model.medusa_heads="
            f"{model.cfg.medusa_heads}: train heads with train.py (train.objective=medusa) or use a shorter --medusa-topk"
        )
    tree = build_tree(tuple(topk))
    ids, lengths = pad_prompts(prompt_ids)
    check_request(model, ids, lengths, max_new_tokens, len(topk) + 1)
    out, stats = _medusa(
        model, jnp.asarray(ids), jnp.asarray(lengths), tree=tree, max_new_tokens=max_new_tokens,
        max_len=int(lengths.max()) + max_new_tokens + len(topk) + 1, eos_id=eos_id, stream=stream,
    )
    calls, accepted = (int(x) for x in stats)
    batch = ids.shape[0]
    generated = int(np.sum(np.asarray(generated_counts(out, eos_id, max_new_tokens))))
    return out, {
        "target_calls": calls + 1,  # + the prefill
        "tree_nodes": tree.size,
        "mean_accepted_length": accepted / max(calls * batch, 1),  # drafts accepted per row and call
        "mean_tokens_per_target_call": generated / batch / (calls + 1),
    }


def medusa_loss(model, input_ids: jax.Array) -> jax.Array:
    """Cross-entropy of every Medusa head on its target (head i at t predicts input t + i + 2)."""
    hidden = model.hidden(input_ids)
    logits = model.medusa_logits(hidden)  # [B, T, k, V]
    losses = []
    for i in range(model.cfg.medusa_heads):
        shift = i + 2
        head_logits = logits[:, :-shift, i]
        losses.append(optax.softmax_cross_entropy_with_integer_labels(head_logits, input_ids[:, shift:]).mean())
    return jnp.mean(jnp.stack(losses))
