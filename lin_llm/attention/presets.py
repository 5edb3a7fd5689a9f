"""The attention presets selectable as ``model.attention=NAME``, and each layer's extra params.

Paper presets (L2-normalised q, k; local kernel relu2 or yoso from ``model.la.local_kernel``;
identity global features, no normaliser; learnable lambda (init 1) and alpha (init 0)):
  local, global, local_global, local_conv, aug (= local + global + conv, the paper's method).
Families (normalised causal linear attention, kappa = phi(q) . phi(k), fixed weights):
  elu (Katharopoulos), relu, performer (FAVOR+), cosformer, hedgehog, castling;
  flash: FLASH's mixed-chunk attention (relu2 local / G + linear global, no normaliser). Its
         gating unit replaces the MLP in FLASH and does not fit a LLaMA block, so only the
         attention is taken;
  yoso: local_global with the YOSO local kernel.
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
Every other preset without a conv also exists as NAME+conv (e.g. hedgehog+conv, global+conv). Linformer is excluded: it mixes the length
axis and has no causal form (see feature_maps.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lin_llm.attention.feature_maps import lolcats_map_init
from lin_llm.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    feature: str  # l2 | elu | relu | performer | cosformer | hedgehog | castling | scaled | lolcats
    local: str | None  # "paper" (model.la.local_kernel), dot, relu2, yoso, softmax (window only), or None
    use_global: bool
    normalize: bool
    learned_mix: bool  # lambda and alpha are parameters (the paper's layer) rather than 1
    alpha_init: float = 0.0
    conv: bool = False
    flash: bool = False  # the local term is divided by the group size
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
        Preset("castling", "castling", "dot", True, True, False),
        Preset("flash", "scaled", "relu2", True, False, False, flash=True),
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


def validate_name(name: str) -> None:
    if name not in NAMES:
        raise ConfigError(f"model.attention={name!r} is not a known preset; choose one of: {', '.join(NAMES)}")


def get(name: str) -> Preset | None:
    """The preset of a linear attention name; None for softmax."""
    validate_name(name)
    return PRESETS.get(name)


def feature_dim(preset: Preset, head_dim: int, performer_features: int) -> int:
    return {
        "performer": performer_features,
        "cosformer": 2 * head_dim,
        "hedgehog": 2 * head_dim,
        "castling": head_dim + 1,
        "lolcats": 2 * performer_features,
    }.get(preset.feature, head_dim)


# LoLCATs' init_window_factor: sigmoid(-2.197...) = 0.1 on the window part
LOLCATS_WINDOW_FACTOR = float(np.log(0.1 / 0.9))


def init_params(preset: Preset, n_heads: int, head_dim: int, conv_kernel_size: int, conv_per_channel: bool,
                *, feature_dim: int = 64, seed: int = 0, layer: int = 0):
    """The layer's extra parameters, by name, at their (deterministic) initial values.

    One source for both a fresh model and a softmax checkpoint being linearised. feature_dim,
    seed and layer are read by lolcats only (its Hedgehog maps are drawn at random, as LoLCATs').
    """
    params = {}
    if preset.learned_mix and preset.local is not None:
        params["mix_local"] = np.ones((), np.float32)  # lambda
    if preset.learned_mix and preset.use_global:
        params["mix_global"] = np.full((), preset.alpha_init, np.float32)  # alpha
    if preset.conv:  # zero: fine-tuning starts from the attention alone
        shape = (n_heads, conv_kernel_size, head_dim) if conv_per_channel else (n_heads, conv_kernel_size)
        params["conv"] = np.zeros(shape, np.float32)
    if preset.feature == "hedgehog":
        eye = np.broadcast_to(np.eye(head_dim, dtype=np.float32), (n_heads, head_dim, head_dim))
        params["hedgehog_q"] = eye.copy()
        params["hedgehog_k"] = eye.copy()
    if preset.feature == "lolcats":
        params["hedgehog_q"], params["hedgehog_k"] = lolcats_map_init(seed, layer, n_heads, head_dim, feature_dim)
        params["window_factor"] = np.full((n_heads,), LOLCATS_WINDOW_FACTOR, np.float32)
    return params
