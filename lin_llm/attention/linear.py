"""Grouped causal linear attention in four forms that agree: reference, chunked, step, verify.

All forms take features already mapped (qf = phi(q), kf = phi(k), [B, T, H, F]) and values
v [B, T, H, Dv]. Token t sits in group g(t) = t // G of its absolute position. With weights
lam (local) and alpha (global):

    local_t  = sum_{j <= t, g(j) = g(t)} kappa(c qf_t . kf_j + b(t - j)) v_j   (kappa: dot, relu2, yoso, laplace)
    global_t = qf_t . S_{g(t)},   S_g = sum_{j : g(j) < g} kf_j^T v_j  (exclusive over groups)
    out_t    = lam * local_t + alpha * a * global_t                   [ / the same sums of scores ]

c = spec.score_scale and a = spec.global_scale are 1 except for FLASH (1/G each); the bias b
[H, G] by lag is FLASH's relative-position bias (absent elsewhere). With spec.split, features
are [local part | global part]: the local term scores the first `split` features, the global term
and the state S the rest (FLASH's separate quadratic and linear q/k).

The normalised families (elu+1, Performer, ...) use kappa = dot, so local + global is exactly
causal linear attention and G is only the chunk size. The paper's layer uses relu2 on
L2-normalised q, k and no normaliser, and then G matters. States accumulate in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lin_llm.attention.feature_maps import LOCAL_KERNELS
from lin_llm.attention.state import LinearState

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """The static shape of one layer's linear attention (hashable, so it can be a jit static)."""

    group_size: int
    local_kernel: str | None  # "dot", "relu2", "yoso", "laplace", or None for no local term
    use_global: bool
    normalize: bool
    eps: float = 1e-6  # added to the normaliser
    score_scale: float = 1.0  # c: FLASH's local kernel reads q.k / G
    global_scale: float = 1.0  # a: FLASH divides its linear part by G as well
    split: int | None = None  # features are [local part (split) | global part]; None: both use all

    def kappa(self, score, bias=None):
        score = score * self.score_scale if self.score_scale != 1.0 else score
        return LOCAL_KERNELS[self.local_kernel](score if bias is None else score + bias)

    def local_part(self, x):
        return x if self.split is None else x[..., : self.split]

    def global_part(self, x):
        return x if self.split is None else x[..., self.split :]


def lag_bias(bias, lag):
    """A relative-position bias [H, G] by lag read at lags (any shape): [H, *lag.shape], or None.
    Lags outside 0..G-1 are clipped: only pairs in one group (masked in every form) read them."""
    return None if bias is None else bias[:, jnp.clip(lag, 0, bias.shape[1] - 1)]


def _combine(spec: LinearSpec, lam, alpha, local_num, local_den, global_num, global_den):
    """lam * local + alpha * global, divided by the matching sum of scores if normalised.

    The *_den arguments are only read when spec.normalize.
    """
    terms = []
    if spec.local_kernel is not None:
        terms.append((lam, local_num, local_den))
    if spec.use_global:
        terms.append((alpha * spec.global_scale if spec.global_scale != 1.0 else alpha, global_num, global_den))
    num = sum(weight * n for weight, n, _ in terms)
    if not spec.normalize:
        return num
    den = sum(weight * d for weight, _, d in terms)
    return num / (den[..., None] + spec.eps)


def init_state(spec: LinearSpec, batch: int, heads: int, feat: int, dv: int) -> LinearState:
    global_feat = feat if spec.split is None else feat - spec.split
    return LinearState(
        s=jnp.zeros((batch, heads, global_feat, dv), F32),
        z=jnp.zeros((batch, heads, global_feat if spec.normalize else 0), F32),
        k_group=jnp.zeros((batch, spec.group_size, heads, feat), F32),
        v_group=jnp.zeros((batch, spec.group_size, heads, dv), F32),
    )


# --------------------------------------------------------------------------- reference


def reference(spec: LinearSpec, qf, kf, v, lam=1.0, alpha=1.0, bias=None):
    """The O(T^2) masked formula, positions 0..T-1. For tests only."""
    t = qf.shape[1]
    pos = jnp.arange(t)
    causal = pos[:, None] >= pos[None, :]
    same = (pos[:, None] // spec.group_size) == (pos[None, :] // spec.group_size)
    scores = lambda a, b: jnp.einsum("bihf,bjhf->bhij", a.astype(F32), b.astype(F32), precision="highest")
    score = scores(spec.local_part(qf), spec.local_part(kf))
    local_bias = lag_bias(bias, pos[:, None] - pos[None, :])
    local_w = jnp.zeros_like(score)
    if spec.local_kernel:
        local_w = jnp.where(causal & same, spec.kappa(score, local_bias), 0.0)
    global_score = score if spec.split is None else scores(spec.global_part(qf), spec.global_part(kf))
    global_w = jnp.where(causal & ~same, global_score, 0.0)
    v = v.astype(F32)
    mix = lambda w: jnp.einsum("bhij,bjhd->bihd", w, v, precision="highest")
    den = lambda w: jnp.einsum("bhij->bih", w)
    return _combine(spec, lam, alpha, mix(local_w), den(local_w), mix(global_w), den(global_w))


# --------------------------------------------------------------------------- chunked


# Chunks are laid out [B, H, N, G, *] (heads outside the chunk axis): XLA's batched matmuls
# over (B, H, N) then read contiguous [G, F] tiles; the [B, N, G, H, *] layout measured ~8x
# slower per einsum on CPU.


def _prefix_states(spec: LinearSpec, kc, vc, s0, z0):
    """States before each chunk of kc/vc [B, H, N, G, *], starting from s0/z0 (fp32)."""
    kc = spec.global_part(kc)
    kv = jnp.einsum("bhngf,bhngd->bhnfd", kc.astype(F32), vc.astype(F32))
    s_excl = _exclusive_cumsum(kv, s0)
    if not spec.normalize:
        return s_excl, None
    return s_excl, _exclusive_cumsum(jnp.sum(kc.astype(F32), axis=3), z0)


def _exclusive_cumsum(x, initial):
    """initial + sum of x over the chunks before each chunk (axis 2).

    Shifted rather than cumsum(x) - x: that subtraction cancels catastrophically in the
    backward pass when one chunk's cotangent is huge (a normaliser near zero), leaking
    rounding noise of the size of that cotangent into earlier chunks' gradients.
    """
    shifted = jnp.concatenate([jnp.zeros_like(x[:, :, :1]), x[:, :, :-1]], axis=2)
    return initial[:, :, None] + jnp.cumsum(shifted, axis=2)


def _chunk_outputs(spec: LinearSpec, qc, kc, vc, s_excl, z_excl, lam, alpha, bias=None):
    """Outputs [B, H, N, G, Dv] of aligned chunks given the state before each chunk."""
    g = qc.shape[3]
    local_num = local_den = global_num = global_den = None
    if spec.local_kernel is not None:
        score = jnp.einsum("bhnif,bhnjf->bhnij", spec.local_part(qc), spec.local_part(kc), preferred_element_type=F32)
        lags = jnp.arange(g)[:, None] - jnp.arange(g)[None, :]
        local_bias = None if bias is None else lag_bias(bias, lags)[None, :, None]  # [1, H, 1, G, G]
        w = jnp.where(jnp.tril(jnp.ones((g, g), bool)), spec.kappa(score, local_bias), 0.0)
        local_num = jnp.einsum("bhnij,bhnjd->bhnid", w.astype(vc.dtype), vc, preferred_element_type=F32)
        local_den = jnp.sum(w, axis=-1)
    if spec.use_global:
        q_global = spec.global_part(qc).astype(F32)
        global_num = jnp.einsum("bhnif,bhnfd->bhnid", q_global, s_excl)
        if spec.normalize:
            global_den = jnp.einsum("bhnif,bhnf->bhni", q_global, z_excl)
    return _combine(spec, lam, alpha, local_num, local_den, global_num, global_den)


def _to_chunks(x, g):
    """[B, T, H, F] -> [B, H, T // g, g, F]."""
    b, t, h, f = x.shape
    return x.reshape(b, t // g, g, h, f).transpose(0, 3, 1, 2, 4)


def _from_chunks(x):
    """[B, H, N, G, F] -> [B, N * G, H, F]."""
    b, h, n, g, f = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(b, n * g, h, f)


def chunked(spec: LinearSpec, qf, kf, v, lam=1.0, alpha=1.0, bias=None):
    """The O(T) training form from an empty state, positions 0..T-1 (any T)."""
    b, t, h, _ = qf.shape
    g = spec.group_size
    pad = (-t) % g
    qc, kc, vc = (_to_chunks(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))), g) for x in (qf, kf, v))
    global_feat = spec.global_part(kf).shape[-1]
    s0 = jnp.zeros((b, h, global_feat, v.shape[-1]), F32)
    z0 = jnp.zeros((b, h, global_feat), F32)
    s_excl, z_excl = _prefix_states(spec, kc, vc, s0, z0)
    return _from_chunks(_chunk_outputs(spec, qc, kc, vc, s_excl, z_excl, lam, alpha, bias))[:, :t]


def _behind_group(group_buf, new, offset, length):
    """One row: the current group's buffer [G, ...], then `new` written from `offset` = pos % G."""
    seq = jnp.zeros((length,) + new.shape[1:], F32).at[: group_buf.shape[0]].set(group_buf)
    return jax.lax.dynamic_update_slice_in_dim(seq, new.astype(F32), offset, axis=0)


def _continue(spec: LinearSpec, state: LinearState, kf, v, pos, n_valid):
    """Chunks that continue the sequence in `state` with the first n_valid of kf/v (per row).

    The buffered tokens of the current group go back in front of the new ones, so the chunks
    align with absolute group boundaries. Returns the aligned chunks, the state before each
    chunk, the new state (complete groups folded into S, the last incomplete one buffered) and
    each row's offset of the new tokens.
    """
    g = spec.group_size
    length = -(-(g + kf.shape[1]) // g) * g
    offset = pos % g
    behind = jax.vmap(_behind_group, in_axes=(0, 0, 0, None))
    valid = (jnp.arange(length)[None, :] < (offset + n_valid)[:, None])[:, :, None, None]
    kc = _to_chunks(jnp.where(valid, behind(state.k_group, kf, offset, length), 0.0), g)
    vc = _to_chunks(jnp.where(valid, behind(state.v_group, v, offset, length), 0.0), g)
    s_excl, z_excl = _prefix_states(spec, kc, vc, state.s, state.z)
    n_complete = (offset + n_valid) // g  # < number of chunks, by the choice of `length`
    rows = jnp.arange(kf.shape[0])
    new_state = LinearState(  # (rows, :, n_complete) indexing puts the batch axis first
        s=s_excl[rows, :, n_complete],
        z=z_excl[rows, :, n_complete] if spec.normalize else state.z,
        k_group=kc[rows, :, n_complete].transpose(0, 2, 1, 3),
        v_group=vc[rows, :, n_complete].transpose(0, 2, 1, 3),
    )
    return kc, vc, s_excl, z_excl, new_state, offset


def extend(spec: LinearSpec, qf, kf, v, state: LinearState, pos, lam=1.0, alpha=1.0, n_valid=None, bias=None):
    """Prefill: consume T tokens after what `state` holds (row r continues at position pos[r]).

    n_valid [B] (default T): row r's tokens past n_valid[r] are right padding; they never enter
    the state, and their outputs are meaningless.
    """
    b, t = qf.shape[:2]
    n_valid = jnp.full((b,), t, jnp.int32) if n_valid is None else n_valid
    kc, vc, s_excl, z_excl, new_state, offset = _continue(spec, state, kf, v, pos, n_valid)
    length = kc.shape[2] * spec.group_size
    q_seq = jax.vmap(_behind_group, in_axes=(0, 0, 0, None))(
        jnp.zeros(state.k_group.shape[:-1] + qf.shape[-1:], F32), qf, offset, length
    )
    qc = _to_chunks(q_seq, spec.group_size)
    out = _chunk_outputs(
        spec, qc.astype(qf.dtype), kc.astype(kf.dtype), vc.astype(v.dtype), s_excl, z_excl, lam, alpha, bias
    )
    take = jax.vmap(lambda o, off: jax.lax.dynamic_slice_in_dim(o, off, t, axis=0))
    return take(_from_chunks(out), offset), new_state


def commit(spec: LinearSpec, state: LinearState, kf, v, pos, n_accepted):
    """The state after the first n_accepted tokens of kf/v [B, m, H, *] (per row), as n steps would.

    With m <= G (every speculative use) at most one group completes, so this folds at most one
    buffer into S: O(G) work per row instead of rebuilding the chunks as extend does.
    """
    g, m = spec.group_size, kf.shape[1]
    if m > g:
        return _continue(spec, state, kf, v, pos, n_accepted)[4]
    slot = pos % g
    filled = slot + n_accepted  # buffer slots in use after the commit, <= 2G - 1
    live = (jnp.arange(g + m)[None, :] < filled[:, None])[:, :, None, None]
    behind = jax.vmap(_behind_group, in_axes=(0, 0, 0, None))
    k_seq = jnp.where(live, behind(state.k_group, kf, slot, g + m), 0.0)  # [B, G + m, H, F]
    v_seq = jnp.where(live, behind(state.v_group, v, slot, g + m), 0.0)
    completed = filled >= g
    fold_group, keep = _fold_branches(spec.normalize)
    s, z = jax.lax.cond(
        jnp.any(completed), fold_group, keep, state.s, state.z, spec.global_part(k_seq[:, :g]), v_seq[:, :g], completed
    )
    fold = completed[:, None, None, None]

    def next_buffer(seq):  # the completed group's overflow starts the next buffer
        overflow = jnp.pad(seq[:, g:], ((0, 0), (0, g - m), (0, 0), (0, 0)))
        return jnp.where(fold, overflow, seq[:, :g])

    return LinearState(s=s, z=z, k_group=next_buffer(k_seq), v_group=next_buffer(v_seq))


# --------------------------------------------------------------------------- step


def step(spec: LinearSpec, qf, kf, v, state: LinearState, pos, lam=1.0, alpha=1.0, bias=None):
    """Decode one token per row: qf/kf [B, H, F], v [B, H, Dv] at positions pos [B]. O(1) in pos."""
    g = spec.group_size
    slot = pos % g
    write = jax.vmap(lambda buf, x, i: jax.lax.dynamic_update_slice_in_dim(buf, x[None].astype(F32), i, axis=0))
    k_group = write(state.k_group, kf, slot)
    v_group = write(state.v_group, v, slot)
    in_group = (jnp.arange(g)[None, :] <= slot[:, None])[:, :, None]  # [B, G, 1]
    q32 = qf.astype(F32)
    local_num = local_den = global_num = global_den = None
    if spec.local_kernel is not None:
        score = jnp.einsum("bhf,bghf->bgh", spec.local_part(q32), spec.local_part(k_group))
        lags = slot[:, None] - jnp.arange(g)[None, :]  # [B, G]
        local_bias = None if bias is None else jnp.moveaxis(lag_bias(bias, lags), 0, -1)  # [B, G, H]
        w = jnp.where(in_group, spec.kappa(score, local_bias), 0.0)
        local_num = jnp.einsum("bgh,bghd->bhd", w, v_group)
        local_den = jnp.sum(w, axis=1)
    if spec.use_global:
        global_num = jnp.einsum("bhf,bhfd->bhd", spec.global_part(q32), state.s)
        if spec.normalize:
            global_den = jnp.einsum("bhf,bhf->bh", q32, state.z)
    out = _combine(spec, lam, alpha, local_num, local_den, global_num, global_den)
    # The token that completes a group folds the whole group into S (and z).
    full = slot == g - 1
    # A group completes once every G steps: skip the [G, F] x [G, Dv] products the other steps.
    # (The same branch functions every call, operands passed: eager calls reuse one compiled cond.)
    fold, keep = _fold_branches(spec.normalize)
    s, z = jax.lax.cond(jnp.any(full), fold, keep, state.s, state.z, spec.global_part(k_group), v_group, full)
    return out, LinearState(s=s, z=z, k_group=k_group, v_group=v_group)


@functools.cache
def _fold_branches(normalize: bool):
    def fold(s, z, k_group, v_group, full):  # add the groups of the rows where full [B] to s, z
        rows = full[:, None, None, None]
        s = s + jnp.where(rows, jnp.einsum("bghf,bghd->bhfd", k_group, v_group), 0.0)
        z = z + jnp.where(rows[..., 0], jnp.sum(k_group, axis=1), 0.0) if normalize else z
        return s, z

    return fold, lambda s, z, *_: (s, z)


# --------------------------------------------------------------------------- verify


def verify(spec: LinearSpec, qf, kf, v, state: LinearState, pos, ancestors, depths, lam=1.0, alpha=1.0, bias=None):
    """Outputs for m candidate tokens [B, m, ...] read from `state` without changing it.

    ancestors [m, m] bool: candidate i sees candidate j (itself included); a lower-triangular
    matrix is a chain, anything else a tree. depths [m]: i's distance from the state, so it sits
    at absolute position pos + depths[i]. Each candidate sees exactly its own causal history:
    the state, then its ancestors, split into local and global terms by their own groups.
    """
    g = spec.group_size
    group_now = pos // g  # [B]
    slot = pos % g
    group_i = (pos[:, None] + depths[None, :]) // g  # [B, m]
    q32, k32, v32 = qf.astype(F32), kf.astype(F32), v.astype(F32)

    def scores(part):  # against the buffered tokens of the current group [B, H, m, G] and the candidates [B, H, m, m]
        q = part(q32)
        return jnp.einsum("bihf,bjhf->bhij", q, part(state.k_group)), jnp.einsum("bihf,bjhf->bhij", q, part(k32))

    local_scores = scores(spec.local_part)  # (unused ones are dropped by jit)
    global_scores = local_scores if spec.split is None else scores(spec.global_part)
    buffered = jnp.arange(g)[None, None, :] < slot[:, None, None]  # [B, 1, G]
    buf_same = (buffered & (group_i == group_now[:, None])[:, :, None])[:, None]  # [B, 1, m, G]
    buf_earlier = (buffered & (group_i > group_now[:, None])[:, :, None])[:, None]
    cand_same = (ancestors[None] & (group_i[:, :, None] == group_i[:, None, :]))[:, None]  # [B, 1, m, m]
    cand_earlier = (ancestors[None] & (group_i[:, None, :] < group_i[:, :, None]))[:, None]

    def mix(w_buf, w_cand):
        num = jnp.einsum("bhij,bjhd->bihd", w_buf, state.v_group) + jnp.einsum("bhij,bjhd->bihd", w_cand, v32)
        den = jnp.einsum("bhij->bih", w_buf) + jnp.einsum("bhij->bih", w_cand)
        return num, den

    local_num = local_den = global_num = global_den = None
    if spec.local_kernel is not None:
        buf_score, cand_score = local_scores
        # lags: buffered slot s sits at group start + s, candidate i at pos + depths[i]
        buf_lag = slot[:, None, None] + depths[None, :, None] - jnp.arange(g)[None, None, :]  # [B, m, G]
        buf_bias = None if bias is None else jnp.swapaxes(lag_bias(bias, buf_lag), 0, 1)  # [B, H, m, G]
        cand_bias = lag_bias(bias, depths[:, None] - depths[None, :])  # [H, m, m]
        local_num, local_den = mix(
            jnp.where(buf_same, spec.kappa(buf_score, buf_bias), 0.0),
            jnp.where(cand_same, spec.kappa(cand_score, cand_bias), 0.0),
        )
    if spec.use_global:
        buf_score, cand_score = global_scores
        global_num, global_den = mix(jnp.where(buf_earlier, buf_score, 0.0), jnp.where(cand_earlier, cand_score, 0.0))
        global_num = global_num + jnp.einsum("bihf,bhfd->bihd", spec.global_part(q32), state.s)
        if spec.normalize:
            global_den = global_den + jnp.einsum("bihf,bhf->bih", q32, state.z)
    return _combine(spec, lam, alpha, local_num, local_den, global_num, global_den)
