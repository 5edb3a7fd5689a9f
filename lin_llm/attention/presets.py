"""The attention presets selectable as ``model.attention=NAME``, and each layer's extra params.

Paper presets (L2-normalised q, k; local kernel relu2 or yoso from ``model.la.local_kernel``;
identity global features, no normaliser; alpha learnable (init 0), lambda learnable (init 1) only
with ``model.la.learn_lambda``, else the constant 1 as in the published run):
  local, global, local_global, local_conv, aug (= local + global + conv, the paper's method).
Families (normalised causal linear attention, kappa = phi(q) . phi(k), fixed weights):
  elu (Katharopoulos), relu, performer (FAVOR+), cosformer, hedgehog;
  yoso: local_global with the YOSO local kernel.
Two the original code defines its own way, computed as it does:
  castling (llama_attn_replace.py, USE_CASTLING): out = lambda local + alpha global as for aug,
           then c = 0.5 v + out / pi, c / ||c|| (L2 over the head dimension), plus the causal conv
           of v (its branch always adds the conv).
  flash (flash_pytorch.FLASH with train-hf.py's Laplace attention function): per head, offset-
           scaled copies gamma_i q + beta_i (i = quadratic / linear part, and the same for k) taken
           before RoPE; local = sum over the group, j <= t, of laplace(qq_t . qk_j / G + b_h(t - j)) v_j
           with b_h T5's causal relative-position bias (32 buckets, max distance 128, times
           sqrt(d)); global = lq_t . sum over earlier groups of lk^T v, divided by G; out = local
           + global. Its gating unit, shared SiLU q/k projection and partial rotary do not fit a
           LLaMA block, so q, k, v are the LLaMA's (see README).
LoLCATs (HazyResearch/lolcats, linear_window_attention_tk.py; the math in window.py):
  lolcats: softmax exp(q.k/sqrt(d) - m) over the current and the previous group (m: the max over
         that window), plus linear attention with LoLCATs' Hedgehog maps (per-head W [H, d, f],
         f = model.la.feature_dim, [softmax(xW), softmax(-xW)] clamped at 1e-12, after RoPE,
         W Kaiming-uniform from (model.la.seed, layer)) over all earlier groups; one normaliser;
         the window part weighted by sigmoid(window_factor) per head (init sigmoid = 0.1), the
         linear part by 1 (their affine_attention_factors=false). Differences from LoLCATs: groups
         align to position 0 (theirs align to the sequence's end, so a token's window depended
         on how many tokens follow it), and decoding keeps the same blocked window (theirs
         decodes with a sliding window of 64, unlike its training form).
Every other preset without a conv also exists as NAME+conv (e.g. hedgehog+conv, flash+conv).
Linformer is excluded: it mixes the length axis and has no causal form (see feature_maps.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lin_llm.attention.feature_maps import lolcats_map_init


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    feature: str  # l2 | elu | relu | performer | cosformer | hedgehog | flash | lolcats
    local: str | None  # "paper" (model.la.local_kernel), dot, relu2, yoso, laplace, softmax (window only), or None
    use_global: bool
    normalize: bool
    learned_mix: bool  # alpha (and lambda, with model.la.learn_lambda) are parameters rather than 1
    alpha_init: float = 0.0
    conv: bool = False
    castling: bool = False  # the output becomes (0.5 v + out / pi) / ||.|| before the conv
    window: bool = False  # LoLCATs: softmax window + linear attention, its own forms (window.py)


_BASE = {
    p.name: p
    for p in (
        Preset("local", "l2", "paper", False, False, True),
        # alpha starts at 1 here: with no local term, alpha = 0 would switch the layer off
        Preset("global", "l2", None, True, False, True, alpha_init=1.0),
        Preset("local_global", "l2", "paper", True, False, True),
        Preset("local_conv", "l2", "paper", False, False, True, conv=True),
        Preset("aug", "l2", "paper", True, False, True, conv=True),
        Preset("elu", "elu", "dot", True, True, False),
        Preset("relu", "relu", "dot", True, True, False),
        Preset("performer", "performer", "dot", True, True, False),
        Preset("cosformer", "cosformer", "dot", True, True, False),
        Preset("hedgehog", "hedgehog", "dot", True, True, False),
        Preset("castling", "l2", "paper", True, False, True, conv=True, castling=True),
        Preset("flash", "flash", "laplace", True, False, False),
        Preset("yoso", "l2", "yoso", True, False, True),
        Preset("lolcats", "lolcats", "softmax", True, True, False, window=True),
    )
}
PRESETS = dict(_BASE)
# local+conv and local_global+conv would be aliases of local_conv and aug
PRESETS.update(
    {
        f"{p.name}+conv": dataclasses.replace(p, name=f"{p.name}+conv", conv=True)
        for p in _BASE.values()
        if p.name not in ("local", "local_global") and not p.conv
    }
)
NAMES = ("softmax",) + tuple(PRESETS)


def get(name: str) -> Preset | None:
    """The preset of a linear attention name; None for softmax (config validation has checked
    the name against NAMES)."""
    if name not in NAMES:
        raise KeyError(f"unknown attention preset {name!r}; choose one of: {', '.join(NAMES)}")
    return PRESETS.get(name)


def feature_dim(preset: Preset, head_dim: int, performer_features: int) -> int:
    return {
        "performer": performer_features,
        "cosformer": 2 * head_dim,
        "hedgehog": 2 * head_dim,
        "flash": 2 * head_dim,  # [quadratic part | linear part]
        "lolcats": 2 * performer_features,
    }.get(preset.feature, head_dim)


# FLASH's relative-position bias table: T5RelativePositionBias' defaults
REL_POS_BUCKETS, REL_POS_MAX_DISTANCE = 32, 128
# LoLCATs' init_window_factor: sigmoid(-2.197...) = 0.1 on the window part
LOLCATS_WINDOW_FACTOR = float(np.log(0.1 / 0.9))


def init_params(preset: Preset, n_heads: int, head_dim: int, conv_kernel_size: int, conv_per_channel: bool, *,
                learn_lambda: bool = False, feature_dim: int = 64, seed: int = 0, layer: int = 0):
    """The layer's extra parameters, by name, at their initial values (the original's init).

    One source for both a fresh model and a softmax checkpoint being linearised. FLASH's and
    lolcats' random inits are drawn from (seed, layer), so they are deterministic too;
    feature_dim is the width of lolcats' Hedgehog maps.
    """
    params = {}
    if preset.learned_mix and preset.local is not None and preset.use_global and learn_lambda:
        # lambda (LOCAL_FACTOR's local_factor, which the original applies only next to a global term)
        params["mix_local"] = np.ones((), np.float32)
    if preset.learned_mix and preset.use_global:
        params["mix_global"] = np.full((), preset.alpha_init, np.float32)  # alpha (GLOBAL_FACTOR's global_factor)
    if preset.conv:  # zero (ZERO_CONV, as every published conv run): fine-tuning starts from the attention
        shape = (n_heads, conv_kernel_size, head_dim) if conv_per_channel else (n_heads, conv_kernel_size)
        params["conv"] = np.zeros(shape, np.float32)
    if preset.feature == "hedgehog":
        eye = np.broadcast_to(np.eye(head_dim, dtype=np.float32), (n_heads, head_dim, head_dim))
        params["hedgehog_q"] = eye.copy()
        params["hedgehog_k"] = eye.copy()
    if preset.feature == "flash":
        rng = np.random.default_rng([seed, layer, 0xF1A5])
        # OffsetScale(heads=4): gamma ~ N(0, 0.02), beta = 0, parts (quad q, lin q, quad k, lin k)
        params["flash_gamma"] = (0.02 * rng.standard_normal((4, n_heads, head_dim))).astype(np.float32)
        params["flash_beta"] = np.zeros((4, n_heads, head_dim), np.float32)
        # nn.Embedding(num_buckets, 1) per head: N(0, 1)
        params["flash_rel_bias"] = rng.standard_normal((n_heads, REL_POS_BUCKETS)).astype(np.float32)
    if preset.feature == "lolcats":
        params["hedgehog_q"], params["hedgehog_k"] = lolcats_map_init(seed, layer, n_heads, head_dim, feature_dim)
        params["window_factor"] = np.full((n_heads,), LOLCATS_WINDOW_FACTOR, np.float32)
    return params
