"""Tiny Hugging Face LLaMA models built locally (no download): the independent reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def tiny_hf_config(*, tie: bool, rope_scaling: dict | None = LLAMA3_ROPE, **overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=128,
        rms_norm_eps=1e-3,  # not the default, and large enough to matter at these activations
        initializer_range=0.2,  # logits of order one, so a 1e-4 comparison is meaningful
        tie_word_embeddings=tie,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def save_tiny_hf_llama(out: Path, *, tie: bool, dtype: str = "float32", seed: int = 0, **overrides) -> Path:
    """Build a random tiny LlamaForCausalLM with transformers and save it (safetensors) at ``out``."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(tie=tie, **overrides)).eval()
    with torch.no_grad():  # RMSNorm weights start at one: randomise them so a swapped norm shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    return out


def hf_logits(hf_dir: Path, input_ids: np.ndarray) -> np.ndarray:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(input_ids), dtype=torch.long)).logits.float().numpy()
