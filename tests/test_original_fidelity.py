"""Our layers against the original code's formulas (tests/original_reference.py, torch, float64):
per layer from the same q, k, v and params, and the logits of a converted LLaMA linearised with
each preset against the transformers model with its attention swapped for the original's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import original_reference as original
from lin_llm import load_checkpoint
from lin_llm.attention import layer, presets
from lin_llm.attention.layer import layer_math
from lin_llm.rope import apply_rope

G, H, D, KSIZE = 8, 2, 8, 63

# our preset -> the original's switches (llama_attn_replace.py's environment variables, or FLASH)
ORIGINAL_FLAGS = {
    "local": dict(use_global=False, add_conv=False),
    "local_global": dict(use_global=True, add_conv=False),
    "local_conv": dict(use_global=False, add_conv=True),
    "aug": dict(use_global=True, add_conv=True),
    "yoso": dict(use_global=True, add_conv=False, use_yoso=True),
    "castling": dict(use_global=True, add_conv=False, use_castling=True),
    "flash": dict(flash=True),
    "flash+conv": dict(flash=True, add_conv=True),
}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _random_params(preset, key, n_heads, head_dim):
    """Every extra param away from its init (alpha, lambda, conv taps, FLASH's offset-scales and
    bias table), at scales where each term matters."""
    init = presets.init_params(preset, n_heads, head_dim, KSIZE, False, learn_lambda=True)
    scales = {"mix_local": (0.8, 0.0), "mix_global": (0.6, 0.0), "conv": (0.0, 0.3), "flash_gamma": (1.0, 0.3),
              "flash_beta": (0.0, 0.3), "flash_rel_bias": (0.0, 0.1)}
    out = {}
    for i, (name, value) in enumerate(sorted(init.items())):
        offset, scale = scales[name]
        out[name] = offset + scale * jax.random.normal(jax.random.fold_in(key, i), value.shape)
    return out


def _to_original(params):
    """Our params by the original's names (tests/original_reference.py's layout), float64 torch."""
    t = lambda x: torch.as_tensor(np.asarray(x, np.float64))  # noqa: E731
    out = {}
    if "mix_global" in params:
        out["global_factor"] = t(params["mix_global"]).reshape(1)
    if "mix_local" in params:
        out["local_factor"] = t(params["mix_local"]).reshape(1)
    if "conv" in params:
        out["dwconv.weight"] = t(params["conv"])[:, None, :, None]
    if "flash_gamma" in params:
        out["qk_offset_scale.gamma"] = t(params["flash_gamma"])
        out["qk_offset_scale.beta"] = t(params["flash_beta"])
        out["rel_pos_bias.relative_attention_bias.weight"] = t(params["flash_rel_bias"]).T
    return out


def _bhtd(x):
    return torch.as_tensor(np.asarray(x, np.float64)).transpose(1, 2)


@functools.partial(jax.jit, static_argnames=("lm", "form"))
def _ours(lm, form, params, q, k, v):
    """Our layer from the projections: before_rope, RoPE (theta 10^4), then the attention."""
    positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, D, 2) / D))
    q, k = layer.before_rope(lm, params, q, k)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    return layer.forward(lm, params, q, k, v, positions, form)


def _theirs(name, params, q, k, v):
    flags = dict(ORIGINAL_FLAGS[name])
    cos, sin = original.rope_cos_sin(torch.arange(q.shape[1])[None], D)
    q, k, v = _bhtd(q), _bhtd(k), _bhtd(v)
    if flags.pop("flash", False):
        out = original.flash_attention(q, k, v, _to_original(params), cos, sin, group_size=G, **flags)
    else:
        out = original.linearized_attention(original.rotate(q, cos, sin), original.rotate(k, cos, sin), v,
                                            _to_original(params), group_size=G, **flags)
    return out.transpose(1, 2).numpy()


def _grid():
    """Every preset at 29 tokens (three groups and a remainder: the original's two code paths);
    aug, castling and flash also at whole groups and below one group."""
    for name in ORIGINAL_FLAGS:
        for t, label in ((29, "groups_and_remainder"), (24, "whole_groups"), (5, "below_one_group")):
            if t == 29 or name in ("aug", "castling", "flash"):
                yield pytest.param(name, t, id=f"{name}-{label}")


@pytest.mark.parametrize("name, t", list(_grid()))
def test_layer_equals_the_original_formula(name, t):
    preset = presets.get(name)
    lm = layer_math(preset, group_size=G, local_kernel="yoso" if name == "yoso" else "relu2", head_dim=D, eps=1e-6,
                    max_len=64, performer_features=16, seed=0, layer=0)
    params = _random_params(preset, jax.random.key(3), H, D)
    q, k, v = (jax.random.normal(key, (2, t, H, D)) for key in jax.random.split(jax.random.key(t), 3))
    err = rel_err(_ours(lm, "chunked", params, q, k, v), _theirs(name, params, q, k, v))
    assert err <= 1e-4, err


@pytest.mark.parametrize("name", ["aug", "castling", "flash"])
def test_converted_model_logits_equal_the_original(name, hf_dirs, converted):
    """A transformers LLaMA converted and linearised with `name`, against the same transformers
    model whose attention layers are swapped for the original's (as its replace_llama_attn does)."""
    from transformers import LlamaForCausalLM

    model = load_checkpoint(converted["untied"], overrides=[f"attention={name}", f"la.group_size={G}",
                                                            "la.learn_lambda=true"])
    cfg = model.cfg
    layer_params = []
    for i, block in enumerate(model.layers):
        attn = block.attn
        values = _random_params(presets.get(name), jax.random.key(10 + i), cfg.n_heads, cfg.resolved_head_dim)
        for param_name, value in values.items():
            getattr(attn, param_name)[...] = value
        layer_params.append({key: value.float() for key, value in _to_original(values).items()})
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, size=(2, 29))
    ours = np.asarray(model(jnp.asarray(ids)))

    reference = LlamaForCausalLM.from_pretrained(hf_dirs["untied"], dtype=torch.float32).eval()
    flags = dict(ORIGINAL_FLAGS[name])
    original.patch_hf_llama(reference, layer_params, group_size=G, **flags)
    with torch.no_grad():
        theirs = reference(torch.as_tensor(ids)).logits.numpy()
    err = rel_err(ours, theirs)
    print(f"{name}: converted model vs the original's formulas, max rel. logit error {err:.2e}")
    assert err <= 1e-4
