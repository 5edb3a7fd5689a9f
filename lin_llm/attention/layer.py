"""One linear-attention layer's math: feature maps + grouped linear attention + causal conv.

Pure functions of (static LayerMath, params dict, q, k, v, positions[, state]). q, k, v are
[B, T, H, d] with k and v already repeated to the H query heads, and q, k are `before_rope(...)`
of the projections, then rotated (FLASH's offset-scales act before RoPE, so its q, k carry two
parts per head: [B, T, 2H, d]). The forms:
  forward(..., form="chunked" | "reference")   training (XLA or Pallas kernels) / the O(T^2) reference
  extend(...)                                  prefill from a state
  step(...)                                    one token from a state, O(1)
  verify(...) + commit(...)                    m candidates (chain or tree) in one pass
lolcats (preset.window) takes window.py's forms, which also read the raw q and k.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lin_llm.attention import conv, feature_maps, linear, window
from lin_llm.attention.presets import REL_POS_BUCKETS, REL_POS_MAX_DISTANCE, Preset, feature_dim
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
    flash = preset.feature == "flash"  # laplace(q.k / G + bias) in the group, linear part / G, split q/k
    spec = linear.LinearSpec(
        group_size=group_size,
        local_kernel=kernel,
        use_global=preset.use_global,
        normalize=preset.normalize,
        score_scale=1.0 / group_size if flash else 1.0,
        global_scale=1.0 / group_size if flash else 1.0,
        split=head_dim if flash else None,
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
    if kind == "flash":  # the offset-scaled parts [B, T, 2H, d] side by side: [quadratic | linear]
        b, t, h2, d = x.shape
        return x.astype(jnp.float32).reshape(b, t, h2 // 2, 2 * d)
    if kind == "cosformer":
        return feature_maps.cosformer(x, positions, lm.max_len)
    if kind == "hedgehog":
        return feature_maps.hedgehog(x, params["hedgehog_q" if is_query else "hedgehog_k"])
    if kind == "lolcats":
        return feature_maps.lolcats_hedgehog(x, params["hedgehog_q" if is_query else "hedgehog_k"])
    if kind == "performer":
        return feature_maps.favor_plus(x, _projection(lm.seed, lm.layer, lm.performer_features, lm.head_dim), is_query)
    raise ValueError(f"unknown feature map {kind!r}")  # presets are validated at config load


def before_rope(lm: LayerMath, params: dict, q, k):
    """What acts on the projections before RoPE: FLASH's OffsetScale, q -> (quadratic, linear) q
    and k -> (quadratic, linear) k as [B, T, 2H, d]; the identity for every other preset."""
    if lm.preset.feature != "flash":
        return q, k
    gamma, beta = params["flash_gamma"], params["flash_beta"]
    q2 = feature_maps.offset_scale(q, gamma[:2], beta[:2])
    return q2.astype(q.dtype), feature_maps.offset_scale(k, gamma[2:], beta[2:]).astype(k.dtype)


def _mix(params):
    return params.get("mix_local", 1.0), params.get("mix_global", 1.0)


def _lag_bias(lm: LayerMath, params: dict):
    """FLASH's relative-position bias by lag [H, G]: the T5 table [H, 32] at each lag's bucket,
    times sqrt(d) (T5RelativePositionBias' scale); None for every other preset."""
    if lm.preset.feature != "flash":
        return None
    buckets = feature_maps.t5_causal_buckets(lm.spec.group_size, REL_POS_BUCKETS, REL_POS_MAX_DISTANCE)
    return params["flash_rel_bias"].astype(jnp.float32)[:, np.asarray(buckets)] * math.sqrt(lm.head_dim)


def _finish(lm: LayerMath, out, v):
    """Castling's output transform (0.5 v + out / pi) / ||.|| (L2 over the head dimension; eps
    keeps zero rows at zero), before the conv is added; the identity for every other preset."""
    if not lm.preset.castling:
        return out
    return feature_maps.l2_normalize(0.5 * v.astype(jnp.float32) + out / math.pi, lm.eps)


def _window_weight(params):
    """LoLCATs' sigmoid(window factor) [H] on the softmax window."""
    return jax.nn.sigmoid(params["window_factor"])


def _featurise(lm, params, q, k, positions):
    return features(lm, params, q, positions, True), features(lm, params, k, positions, False)


def _pallas_applies(spec: linear.LinearSpec) -> bool:
    """The kernels take the dot and relu2 local kernels; FLASH's linear part (a plain scan) too."""
    return spec.split is not None or spec.local_kernel in (None, "dot", "relu2")


def _kernel(lm: LayerMath, qf, kf, v, lam, alpha, bias):
    """The chunked scan through the Pallas kernels. FLASH: its linear part only, as the kernels'
    global term; the quadratic part (laplace + relative bias) stays an XLA masked G x G product."""
    spec = lm.spec
    if spec.split is not None:
        local = linear.chunked(dataclasses.replace(spec, use_global=False), qf, kf, v, lam, alpha, bias)
        glob = lm.impl(spec.global_part(qf), spec.global_part(kf), v, chunk_size=spec.group_size, local_kernel="dot",
                       local_scale=0.0, global_scale=alpha * spec.global_scale)
        return local + glob.astype(jnp.float32)
    kwargs = dict(
        chunk_size=spec.group_size,
        local_kernel=spec.local_kernel or "dot",
        local_scale=lam if spec.local_kernel else 0.0,
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
    bias = _lag_bias(lm, params)
    if lm.preset.window:  # XLA only: the Pallas kernels have no softmax window
        forms = {"reference": window.reference, "chunked": window.chunked}
        out = forms[form](lm.spec, q, k, qf, kf, v, _window_weight(params))
    elif form == "reference":
        out = linear.reference(lm.spec, qf, kf, v, lam, alpha, bias)
    elif lm.impl.name != "xla" and _pallas_applies(lm.spec):
        out = _kernel(lm, qf, kf, v.astype(q.dtype), lam, alpha, bias)
    else:
        out = linear.chunked(lm.spec, qf, kf, v, lam, alpha, bias)
    out = _finish(lm, out, v)
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
    bias = _lag_bias(lm, params)
    history = state.conv
    if q.shape[1] == 1 and lengths is None:
        if lm.preset.window:
            out, attn = window.step(lm.spec, q[:, 0], k[:, 0], qf[:, 0], kf[:, 0], v[:, 0], state.attn, pos,
                                    _window_weight(params))
        else:
            out, attn = linear.step(lm.spec, qf[:, 0], kf[:, 0], v[:, 0], state.attn, pos, lam, alpha, bias)
        out = _finish(lm, out, v[:, 0])
        if lm.preset.conv:
            conv_out, history = conv.step(v[:, 0], params["conv"], history)
            out = out + conv_out
        return out[:, None], LinearLayerState(attn=attn, conv=history)
    qf, kf = qf.astype(q.dtype), kf.astype(k.dtype)
    if lm.preset.window:
        out, attn = window.extend(lm.spec, q, k, qf, kf, v, state.attn, pos, _window_weight(params), n_valid=lengths)
    else:
        out, attn = linear.extend(lm.spec, qf, kf, v, state.attn, pos, lam, alpha, n_valid=lengths, bias=bias)
    out = _finish(lm, out, v)
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
        out = linear.verify(lm.spec, qf, kf, v, state.attn, pos, ancestors, depths, lam, alpha, _lag_bias(lm, params))
        pending = (kf,)
    out = _finish(lm, out, v)
    if lm.preset.conv:
        out = out + conv.unfolded(v, params["conv"], state.conv, ancestors, depths)
    return out, pending + (v.astype(jnp.float32),)


def commit(lm: LayerMath, state: LinearLayerState, pending, pos, path, n_accepted):
    """The state after the accepted candidates path[:, :n] (candidate indices, root first)."""
    accepted = tuple(jnp.take_along_axis(x, path[:, :, None, None], axis=1) for x in pending)  # (..., v)
    attn = (window.commit if lm.preset.window else linear.commit)(lm.spec, state.attn, *accepted, pos, n_accepted)
    history = conv.new_history(state.conv, accepted[-1], n_accepted) if lm.preset.conv else state.conv
    return LinearLayerState(attn=attn, conv=history)
