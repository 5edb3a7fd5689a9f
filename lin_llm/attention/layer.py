"""One linear-attention layer's math: feature maps + grouped linear attention + causal conv.

Pure functions of (static LayerMath, params dict, q, k, v, positions[, state]). q, k, v are
[B, T, H, d] after RoPE, with k and v already repeated to the H query heads. The forms:
  forward(..., form="chunked" | "reference")   training (XLA or Pallas kernels) / the O(T^2) reference
  extend(...)                                  prefill from a state
  step(...)                                    one token from a state, O(1)
  verify(...) + commit(...)                    m candidates (chain or tree) in one pass
lolcats (preset.window) takes window.py's forms, which also read the raw q and k.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lin_llm.attention import conv, feature_maps, linear, window
from lin_llm.attention.presets import Preset, feature_dim
from lin_llm.attention.state import LinearLayerState
from pallas_kernels import Impl


@dataclasses.dataclass(frozen=True)
class LayerMath:
    """Everything static about one layer's linear attention (hashable)."""

    preset: Preset
    spec: linear.LinearSpec
    head_dim: int
    eps: float
    max_len: int  # cosFormer's horizon M
    performer_features: int
    seed: int
    layer: int
    impl: Impl = Impl("xla", None)  # the training form's implementation (pallas_kernels.select_impl)

    @property
    def feature_dim(self) -> int:
        return feature_dim(self.preset, self.head_dim, self.performer_features)


def layer_math(
    preset: Preset, *, group_size, local_kernel, head_dim, eps, max_len, performer_features, seed, layer, impl=Impl("xla", None)
):
    kernel = local_kernel if preset.local == "paper" else preset.local
    spec = linear.LinearSpec(
        group_size=group_size,
        local_kernel=kernel,
        use_global=preset.use_global,
        normalize=preset.normalize,
        local_scale=1.0 / group_size if preset.flash else 1.0,
    )
    return LayerMath(preset, spec, head_dim, eps, max_len, performer_features, seed, layer, impl)


@functools.lru_cache(maxsize=None)
def _projection(seed, layer, n_features, head_dim):
    return feature_maps.favor_projection(seed, layer, n_features, head_dim)


def features(lm: LayerMath, params: dict, x, positions, is_query: bool):
    """phi(x) [B, T, H, F] in float32."""
    kind = lm.preset.feature
    if kind == "l2":
        return feature_maps.l2_normalize(x, lm.eps)
    if kind == "elu":
        return feature_maps.elu_plus_one(x)
    if kind == "relu":
        return feature_maps.relu(x)
    if kind == "scaled":
        return feature_maps.scaled(x)
    if kind == "castling":
        return feature_maps.castling(x, lm.eps)
    if kind == "cosformer":
        return feature_maps.cosformer(x, positions, lm.max_len)
    if kind == "hedgehog":
        return feature_maps.hedgehog(x, params["hedgehog_q" if is_query else "hedgehog_k"])
    if kind == "lolcats":
        return feature_maps.lolcats_hedgehog(x, params["hedgehog_q" if is_query else "hedgehog_k"])
    if kind == "performer":
        return feature_maps.favor_plus(x, _projection(lm.seed, lm.layer, lm.performer_features, lm.head_dim), is_query)
    raise ValueError(f"unknown feature map {kind!r}")  # presets are validated at config load


def _mix(params):
    return params.get("mix_local", 1.0), params.get("mix_global", 1.0)


def _window_weight(params):
    """LoLCATs' sigmoid(window factor) [H] on the softmax window."""
    return jax.nn.sigmoid(params["window_factor"])


def _featurise(lm, params, q, k, positions):
    return features(lm, params, q, positions, True), features(lm, params, k, positions, False)


def _kernel(lm: LayerMath, qf, kf, v, lam, alpha):
    """The chunked scan through the Pallas kernels (every local kernel but YOSO's)."""
    spec = lm.spec
    kwargs = dict(
        chunk_size=spec.group_size,
        local_kernel=spec.local_kernel or "dot",
        local_scale=lam * spec.local_scale if spec.local_kernel else 0.0,
        global_scale=alpha if spec.use_global else 0.0,
    )
    if spec.normalize:
        return lm.impl.normalized(qf, kf, v, eps=spec.eps, **kwargs).astype(jnp.float32)
    return lm.impl(qf, kf, v, **kwargs).astype(jnp.float32)


def forward(lm: LayerMath, params: dict, q, k, v, positions, form: str = "chunked"):
    """Whole sequences from position 0: out [B, T, H, Dv] (float32). form "chunked" runs
    lm.impl (Pallas kernels where they apply, else XLA); "reference" the O(T^2) formula."""
    qf, kf = _featurise(lm, params, q, k, positions)
    qf, kf = qf.astype(q.dtype), kf.astype(k.dtype)
    lam, alpha = _mix(params)
    if lm.preset.window:  # XLA only: the Pallas kernels have no softmax window
        forms = {"reference": window.reference, "chunked": window.chunked}
        out = forms[form](lm.spec, q, k, qf, kf, v, _window_weight(params))
    elif form == "reference":
        out = linear.reference(lm.spec, qf, kf, v, lam, alpha)
    elif lm.impl.name != "xla" and lm.spec.local_kernel != "yoso":
        out = _kernel(lm, qf, kf, v.astype(q.dtype), lam, alpha)
    else:
        out = linear.chunked(lm.spec, qf, kf, v, lam, alpha)
    if lm.preset.conv:
        out = out + conv.conv(v, params["conv"])
    return out


def init_state(lm: LayerMath, batch: int, heads: int, dv: int, conv_kernel_size: int) -> LinearLayerState:
    k1 = conv.history_len(conv_kernel_size) if lm.preset.conv else 0
    if lm.preset.window:
        attn = window.init_state(lm.spec, batch, heads, lm.head_dim, lm.feature_dim, dv)
    else:
        attn = linear.init_state(lm.spec, batch, heads, lm.feature_dim, dv)
    return LinearLayerState(
        attn=attn,
        conv=jnp.zeros((batch, k1, heads, dv), jnp.float32),
    )


def extend(lm: LayerMath, params: dict, q, k, v, positions, state: LinearLayerState, pos, lengths=None):
    """Prefill T tokens after `state` (rows right-padded past `lengths`); T = 1 takes the O(1)
    step form."""
    qf, kf = _featurise(lm, params, q, k, positions)
    lam, alpha = _mix(params)
    history = state.conv
    if q.shape[1] == 1 and lengths is None:
        if lm.preset.window:
            out, attn = window.step(lm.spec, q[:, 0], k[:, 0], qf[:, 0], kf[:, 0], v[:, 0], state.attn, pos,
                                    _window_weight(params))
        else:
            out, attn = linear.step(lm.spec, qf[:, 0], kf[:, 0], v[:, 0], state.attn, pos, lam, alpha)
        if lm.preset.conv:
            conv_out, history = conv.step(v[:, 0], params["conv"], history)
            out = out + conv_out
        return out[:, None], LinearLayerState(attn=attn, conv=history)
    qf, kf = qf.astype(q.dtype), kf.astype(k.dtype)
    if lm.preset.window:
        out, attn = window.extend(lm.spec, q, k, qf, kf, v, state.attn, pos, _window_weight(params), n_valid=lengths)
    else:
        out, attn = linear.extend(lm.spec, qf, kf, v, state.attn, pos, lam, alpha, n_valid=lengths)
    if lm.preset.conv:
        out = out + conv.conv(v, params["conv"], history)
        history = conv.new_history(history, v, lengths)
    return out, LinearLayerState(attn=attn, conv=history)


def verify(lm: LayerMath, params: dict, q, k, v, positions, state: LinearLayerState, pos, ancestors, depths):
    """Outputs for m candidates, and what commit needs: their features and values (and raw keys
    for lolcats' window)."""
    qf, kf = _featurise(lm, params, q, k, positions)
    lam, alpha = _mix(params)
    if lm.preset.window:
        out = window.verify(lm.spec, q, k, qf, kf, v, state.attn, pos, ancestors, depths, _window_weight(params))
        pending = (k.astype(jnp.float32), kf)
    else:
        out = linear.verify(lm.spec, qf, kf, v, state.attn, pos, ancestors, depths, lam, alpha)
        pending = (kf,)
    if lm.preset.conv:
        out = out + conv.unfolded(v, params["conv"], state.conv, ancestors, depths)
    return out, pending + (v.astype(jnp.float32),)


def commit(lm: LayerMath, state: LinearLayerState, pending, pos, path, n_accepted):
    """The state after the accepted candidates path[:, :n] (candidate indices, root first)."""
    accepted = tuple(jnp.take_along_axis(x, path[:, :, None, None], axis=1) for x in pending)  # (..., v)
    attn = (window.commit if lm.preset.window else linear.commit)(lm.spec, state.attn, *accepted, pos, n_accepted)
    history = conv.new_history(state.conv, accepted[-1], n_accepted) if lm.preset.conv else state.conv
    return LinearLayerState(attn=attn, conv=history)
