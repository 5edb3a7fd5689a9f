"""The tiny random models the tests share (cached, so tests also share their compiled functions)."""

import functools

import jax

import lin_llm

# Small enough to compile fast, big enough for GQA (4 query heads over 2 KV heads) and several
# groups of the linear attention within a short sequence.
TINY = (
    "model.n_layers=2", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
    "model.vocab_size=64", "model.max_seq_len=96", "train.seq_len=96", "model.init_std=0.3",
    "model.la.conv_kernel_size=7", "model.la.learn_lambda=true",  # lambda too is a parameter, so it acts
)


def perturb_attention_params(model, seed: int, scale: float = 0.3):
    """Move every layer's linear-attention params (conv taps, lambda, alpha, feature maps) off their
    initial zeros and ones, so that each of them acts in the tests."""
    for layer, block in enumerate(model.layers):
        for i, name in enumerate(block.attn.extra):
            param = getattr(block.attn, name)
            noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 100 * layer + i), param[...].shape)
            param[...] = param[...] + scale * noise
    return model


@functools.lru_cache(maxsize=None)
def tiny_model(*overrides: str, seed: int = 0, perturb: float = 0.3):
    """build_model of TINY + overrides (config key=value items), its attention params perturbed."""
    cfg = lin_llm.load_config(None, [*TINY, *overrides]).model
    return perturb_attention_params(lin_llm.build_model(cfg, seed=seed), seed, perturb)
