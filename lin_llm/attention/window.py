"""LoLCATs' attention: softmax over a blocked window plus linear attention before it, one normaliser.

After HazyResearch/lolcats, src/model/linear_attention/linear_window_attention_tk.py (the
"terraced" window of its ThunderKittens kernel). Token t sits in group g(t) = t // G. Its
window is the whole previous group and the causal part of its own,
W(t) = {j <= t : g(t) - 1 <= g(j) <= g(t)}; the linear part is L(t) = {j : g(j) < g(t) - 1}.
With raw q, k (after RoPE), s_tj = q_t . k_j / sqrt(d), the in-window max m_t = max_{j in W(t)}
s_tj, features qf = phi_q(q), kf = phi_k(k) and beta = sigmoid(window factor) per head:

    y_t = (beta sum_W exp(s_tj - m_t) v_j + sum_L qf_t . kf_j v_j)
          / (beta sum_W exp(s_tj - m_t) + sum_L qf_t . kf_j)

m_t is more than a stabiliser: the linear terms are not scaled by exp(-m_t), so it sets the
balance of the two parts (as in LoLCATs). Every form therefore takes the max over exactly W(t).
No eps: the window's largest term is beta > 0. States accumulate in float32; all forms are XLA
(the Pallas scan kernels have no softmax window; see pallas_kernels/README.md).

Forms, each taking spec (the layer's LinearSpec: group size G) and beta [H]:
  reference   the O(T^2) masked formula, positions 0..T-1 (tests only)
  chunked     O(T): per group a [G, 2G] window product plus the linear state of the groups before
  extend      prefill from a WindowState;  step: one token, O(1)
  verify      m candidates (chain or tree) read from a state;  commit: the state after a path
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lin_llm.attention.linear import (
    LinearSpec,
    _behind_group,
    _from_chunks,
    _prefix_states,
    _to_chunks,
)
from lin_llm.attention.state import WindowState

F32 = jnp.float32


def _scores(q, k, pattern):
    """q . k / sqrt(d) in float32 (products in the inputs' dtype, fp32 accumulation)."""
    return jnp.einsum(pattern, q, k, preferred_element_type=F32) * q.shape[-1] ** -0.5


def _exp_weights(score, in_window, axis=-1):
    """exp(score - m) on the window, 0 elsewhere; m = the max over the window (never empty)."""
    top = jnp.max(jnp.where(in_window, score, -jnp.inf), axis=axis, keepdims=True)
    return jnp.where(in_window, jnp.exp(jnp.where(in_window, score, top) - top), 0.0)


def _normalise(beta, window_num, window_den, linear_num, linear_den):
    """(beta * window + linear) / (beta * window sum + linear sum). beta is shaped to broadcast
    against the numerators (heads aligned, a trailing 1 for the value axis).

    Written as the window's softmax average weighted by share = beta * window sum, so beta enters
    once: its gradient then sums per-element terms instead of two large sums that cancel (that
    cost ~1e-5 relative in fp32)."""
    share = beta[..., 0] * window_den
    return (share[..., None] * (window_num / window_den[..., None]) + linear_num) / (share + linear_den)[..., None]


def _per_head(beta):
    """beta [H] against [..., H, Dv]."""
    return beta.astype(F32)[:, None]


def init_state(spec: LinearSpec, batch: int, heads: int, head_dim: int, feat: int, dv: int) -> WindowState:
    g2 = 2 * spec.group_size
    return WindowState(
        s=jnp.zeros((batch, heads, feat, dv), F32),
        z=jnp.zeros((batch, heads, feat), F32),
        k=jnp.zeros((batch, g2, heads, head_dim), F32),
        kf=jnp.zeros((batch, g2, heads, feat), F32),
        v=jnp.zeros((batch, g2, heads, dv), F32),
    )


# --------------------------------------------------------------------------- reference


def reference(spec: LinearSpec, q, k, qf, kf, v, beta):
    """The O(T^2) masked formula, positions 0..T-1. For tests only."""
    pos = jnp.arange(q.shape[1])
    group = pos // spec.group_size
    causal = pos[:, None] >= pos[None, :]
    in_window = causal & (group[:, None] - group[None, :] <= 1)
    in_linear = causal & ~in_window
    hp = {"precision": "highest"}
    score = jnp.einsum("bihd,bjhd->bhij", q.astype(F32), k.astype(F32), **hp) * q.shape[-1] ** -0.5
    a = _exp_weights(score, in_window)
    lin = jnp.where(in_linear, jnp.einsum("bihf,bjhf->bhij", qf.astype(F32), kf.astype(F32), **hp), 0.0)
    mix = lambda w: jnp.einsum("bhij,bjhd->bihd", w, v.astype(F32), **hp)
    den = lambda w: jnp.einsum("bhij->bih", w)
    return _normalise(_per_head(beta), mix(a), den(a), mix(lin), den(lin))


# --------------------------------------------------------------------------- chunked


def _window_outputs(qc, kc, qfc, vc, first_prev_valid, s_lin, z_lin, beta):
    """Outputs [B, H, N-1, G, Dv] of query chunks 1..N-1 of aligned chunks [B, H, N, G, *].

    Chunk n's window is chunk n-1 (whole) and chunk n (causal); s_lin/z_lin [B, H, N-1, ...] are
    the linear sums of the groups before chunk n-1. first_prev_valid [B]: whether chunk 0 holds
    real tokens (later chunks' keys are real wherever a valid query can see them).
    """
    g, n = qc.shape[3], qc.shape[2]
    keys = jnp.concatenate([kc[:, :, :-1], kc[:, :, 1:]], axis=3)  # [B, H, N-1, 2G, d]
    values = jnp.concatenate([vc[:, :, :-1], vc[:, :, 1:]], axis=3)
    i, j = jnp.arange(g)[:, None], jnp.arange(2 * g)[None, :]
    prev_valid = (jnp.arange(1, n)[None, :] > 1) | first_prev_valid[:, None]  # [B, N-1]
    in_window = jnp.where(j < g, prev_valid[:, None, :, None, None], j - g <= i)  # [B, 1, N-1, G, 2G]
    a = _exp_weights(_scores(qc[:, :, 1:], keys, "bhnid,bhnjd->bhnij"), in_window)
    window_num = jnp.einsum("bhnij,bhnjd->bhnid", a.astype(values.dtype), values, preferred_element_type=F32)
    q32 = qfc[:, :, 1:].astype(F32)
    linear_num = jnp.einsum("bhnif,bhnfd->bhnid", q32, s_lin)
    linear_den = jnp.einsum("bhnif,bhnf->bhni", q32, z_lin)
    beta = beta.astype(F32)[None, :, None, None, None]  # heads on axis 1 in the chunk layout
    return _normalise(beta, window_num, a.sum(-1), linear_num, linear_den)


def chunked(spec: LinearSpec, q, k, qf, kf, v, beta):
    """The O(T) training form from an empty state, positions 0..T-1 (any T)."""
    b, t, h, _ = q.shape
    g = spec.group_size
    pad = ((0, 0), (g, (-t) % g), (0, 0), (0, 0))  # a zero chunk in front: group 0's "previous group"
    qc, kc, qfc, kfc, vc = (_to_chunks(jnp.pad(x, pad), g) for x in (q, k, qf, kf, v))
    s0 = jnp.zeros((b, h, kf.shape[-1], v.shape[-1]), F32)
    s_excl, z_excl = _prefix_states(spec, kfc, vc, s0, s0[..., 0])  # sums of the chunks before each
    out = _window_outputs(qc, kc, qfc, vc, jnp.zeros((b,), bool), s_excl[:, :, :-1], z_excl[:, :, :-1], beta)
    return _from_chunks(out)[:, :t]


def _continue(spec: LinearSpec, state: WindowState, k, kf, v, pos, n_valid):
    """Aligned chunks [previous group, current group, new tokens...] continuing `state` with the
    first n_valid of k/kf/v per row: the chunks, the linear sums before each chunk's window and
    the new state (the group of the last token and the one before it buffered)."""
    g = spec.group_size
    length = g * (2 + (g - 1 + k.shape[1]) // g)
    offset = g + pos % g
    index = jnp.arange(length)[None, :]
    valid = ((index >= g) | (pos >= g)[:, None]) & (index < (offset + n_valid)[:, None])
    behind = jax.vmap(_behind_group, in_axes=(0, 0, 0, None))
    kc, kfc, vc = (
        _to_chunks(jnp.where(valid[:, :, None, None], behind(buf, x, offset, length), 0.0), g)
        for buf, x in ((state.k, k), (state.kf, kf), (state.v, v))
    )
    s_excl, z_excl = _prefix_states(spec, kfc, vc, state.s, state.z)
    current = 1 + (pos % g + n_valid) // g  # the chunk of the next token's group
    rows = jnp.arange(k.shape[0])

    def window_pair(x):  # chunks current-1 and current as [B, 2G, H, *]
        return jnp.concatenate([x[rows, :, current - 1], x[rows, :, current]], axis=2).transpose(0, 2, 1, 3)

    new_state = WindowState(
        s=s_excl[rows, :, current - 1], z=z_excl[rows, :, current - 1],
        k=window_pair(kc), kf=window_pair(kfc), v=window_pair(vc),
    )
    return kc, vc, s_excl[:, :, :-1], z_excl[:, :, :-1], new_state


def extend(spec: LinearSpec, q, k, qf, kf, v, state: WindowState, pos, beta, n_valid=None):
    """Prefill: T tokens after what `state` holds (row r continues at pos[r]); tokens past
    n_valid[r] are right padding: they never enter the state and their outputs are meaningless."""
    b, t = q.shape[:2]
    g = spec.group_size
    n_valid = jnp.full((b,), t, jnp.int32) if n_valid is None else n_valid
    kc, vc, s_lin, z_lin, new_state = _continue(spec, state, k, kf, v, pos, n_valid)
    length = kc.shape[2] * g
    offset = g + pos % g
    behind = jax.vmap(_behind_group, in_axes=(0, 0, 0, None))
    qc, qfc = (
        _to_chunks(behind(jnp.zeros((b, 2 * g) + x.shape[2:], F32), x, offset, length), g) for x in (q, qf)
    )
    out = _window_outputs(qc.astype(q.dtype), kc.astype(k.dtype), qfc.astype(qf.dtype), vc.astype(v.dtype),
                          pos >= g, s_lin, z_lin, beta)
    take = jax.vmap(lambda o, off: jax.lax.dynamic_slice_in_dim(o, off, t, axis=0))
    return take(_from_chunks(out), pos % g), new_state


def commit(spec: LinearSpec, state: WindowState, k, kf, v, pos, n_accepted):
    """The state after the first n_accepted tokens of k/kf/v [B, m, H, *] (per row), as n steps would."""
    return _continue(spec, state, k, kf, v, pos, n_accepted)[4]


# --------------------------------------------------------------------------- step


def _buffer_slots(spec: LinearSpec, pos):
    """Per row [B, 2G]: which window-buffer slots hold tokens before pos, and their groups."""
    g = spec.group_size
    index = jnp.arange(2 * g)[None, :]
    prev = index < g
    used = jnp.where(prev, (pos >= g)[:, None], index - g < (pos % g)[:, None])
    return used, jnp.where(prev, pos[:, None] // g - 1, pos[:, None] // g)


def step(spec: LinearSpec, q, k, qf, kf, v, state: WindowState, pos, beta):
    """Decode one token per row: q/k [B, H, d], qf/kf [B, H, F], v [B, H, Dv] at pos [B]. O(1)."""
    g = spec.group_size
    slot = g + pos % g
    write = jax.vmap(lambda buf, x, i: jax.lax.dynamic_update_slice_in_dim(buf, x[None].astype(F32), i, axis=0))
    buf = WindowState(state.s, state.z, write(state.k, k, slot), write(state.kf, kf, slot), write(state.v, v, slot))
    used, _ = _buffer_slots(spec, pos)
    in_window = (used | (jnp.arange(2 * g)[None, :] == slot[:, None]))[:, None, :]  # [B, 1, 2G]
    a = _exp_weights(_scores(q.astype(F32), buf.k, "bhd,bjhd->bhj"), in_window)
    q32 = qf.astype(F32)
    out = _normalise(
        _per_head(beta), jnp.einsum("bhj,bjhd->bhd", a, buf.v), a.sum(-1),
        jnp.einsum("bhf,bhfd->bhd", q32, state.s), jnp.einsum("bhf,bhf->bh", q32, state.z),
    )
    # The token that completes a group moves the previous group out of the window into s, z.
    # (module-level branches: eager calls then reuse one compiled cond)
    return out, jax.lax.cond(jnp.any(pos % g == g - 1), _slide, _keep, buf, pos)


def _keep(state: WindowState, pos):
    return state


def _slide(state: WindowState, pos):
    """For rows whose current group is complete: fold the previous group into s, z and make the
    current one the previous (its old slots become free)."""
    g = state.k.shape[1] // 2
    full = pos % g == g - 1
    fold = (full & (pos >= g))[:, None, None]
    s = state.s + jnp.where(fold[..., None], jnp.einsum("bghf,bghd->bhfd", state.kf[:, :g], state.v[:, :g]), 0.0)
    z = state.z + jnp.where(fold, jnp.sum(state.kf[:, :g], axis=1), 0.0)
    shift = lambda x: jnp.where(full[:, None, None, None], jnp.concatenate([x[:, g:], x[:, g:]], axis=1), x)
    return WindowState(s=s, z=z, k=shift(state.k), kf=shift(state.kf), v=shift(state.v))


# --------------------------------------------------------------------------- verify


def verify(spec: LinearSpec, q, k, qf, kf, v, state: WindowState, pos, ancestors, depths, beta):
    """Outputs for m candidates [B, m, ...] read from `state` without changing it.

    ancestors [m, m] bool (candidate i sees j, itself included), depths [m] (i sits at pos +
    depths[i]). Each candidate sees the state and its ancestors, each key in its window or in its
    linear part by the key's own group.
    """
    g = spec.group_size
    group_i = (pos[:, None] + depths[None, :]) // g  # [B, m]
    used, buf_group = _buffer_slots(spec, pos)
    buf_near = group_i[:, :, None] - buf_group[:, None, :] <= 1  # [B, m, 2G]
    cand_near = group_i[:, :, None] - group_i[:, None, :] <= 1  # [B, m, m]
    buf_window, buf_linear = ((used[:, None] & near)[:, None] for near in (buf_near, ~buf_near))
    cand_window, cand_linear = ((ancestors[None] & near)[:, None] for near in (cand_near, ~cand_near))
    q32, k32, qf32, kf32, v32 = (x.astype(F32) for x in (q, k, qf, kf, v))
    # one max over the window's buffered and candidate keys: score them side by side
    score = jnp.concatenate([_scores(q32, state.k, "bihd,bjhd->bhij"), _scores(q32, k32, "bihd,bjhd->bhij")], -1)
    a = _exp_weights(score, jnp.concatenate([buf_window, cand_window], -1))
    lin = jnp.concatenate([
        jnp.where(buf_linear, jnp.einsum("bihf,bjhf->bhij", qf32, state.kf), 0.0),
        jnp.where(cand_linear, jnp.einsum("bihf,bjhf->bhij", qf32, kf32), 0.0),
    ], -1)
    values = jnp.concatenate([state.v, v32], axis=1)  # [B, 2G + m, H, Dv]
    mix = lambda w: jnp.einsum("bhij,bjhd->bihd", w, values)
    den = lambda w: jnp.einsum("bhij->bih", w)
    linear_num = mix(lin) + jnp.einsum("bihf,bhfd->bihd", qf32, state.s)
    linear_den = den(lin) + jnp.einsum("bihf,bhf->bih", qf32, state.z)
    return _normalise(_per_head(beta), mix(a), den(a), linear_num, linear_den)
