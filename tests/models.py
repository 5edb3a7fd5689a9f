"""The tiny random models the tests share (cached, so tests also share their compiled functions)."""

import functools

import jax
from flax import nnx

import lin_llm

# Small enough to compile fast, big enough for GQA (4 query heads over 2 KV heads) and several
# groups of the linear attention within a short sequence.
TINY = (
    "model.n_layers=2", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
    "model.vocab_size=64", "model.max_seq_len=96", "train.seq_len=96", "model.init_std=0.3",
    "model.la.conv_kernel_size=7", "model.la.learn_lambda=true",  # lambda too is a parameter, so it acts
)

# A tiny hybrid: softmax attention in the first, a middle and the last of five layers, the preset
# of the case in layers 1 and 3 (e.g. "hybrid-aug", "hybrid-hedgehog+conv").
HYBRID = ("model.n_layers=5", "model.softmax_layers=[0,2,4]")


def attention_overrides(case: str) -> tuple[str, ...]:
    """The config overrides of a test case: a preset name, or "hybrid-" and the linear layers' preset."""
    if case.startswith("hybrid-"):
        return (*HYBRID, f"model.attention={case.removeprefix('hybrid-')}")
    return (f"model.attention={case}",)


def perturb_attention_params(model, seed: int, scale: float = 0.3):
    """Move every layer's linear-attention params (conv taps, lambda, alpha, feature maps) off their
    initial zeros and ones, so that each of them acts in the tests."""
    for layer, block in enumerate(model.layers):
        for i, name in enumerate(block.attn.extra):
            param = getattr(block.attn, name)
            noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 100 * layer + i), param[...].shape)
            param[...] = param[...] + scale * noise
    return model


def perturb_norms(model, seed: int, scale: float = 0.3):
    """Move every RMSNorm scale off one (the other weights are random already)."""
    norms = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RMSNorm)]
    for i, norm in enumerate(norms):
        norm.scale[...] = norm.scale[...] + scale * jax.random.normal(jax.random.fold_in(jax.random.key(seed + 1), i),
                                                                       norm.scale[...].shape)
    return model


@functools.lru_cache(maxsize=None)
def tiny_model(*overrides: str, seed: int = 0, perturb: float = 0.3, norms: bool = False):
    """build_model of TINY + overrides (config key=value items), its attention params perturbed
    (and with norms, its norm scales: then every parameter is off its initial value)."""
    cfg = lin_llm.load_config(None, [*TINY, *overrides]).model
    model = perturb_attention_params(lin_llm.build_model(cfg, seed=seed), seed, perturb)
    return perturb_norms(model, seed, perturb) if norms else model
