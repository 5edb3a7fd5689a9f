"""LoRA on flat parameter dicts, without touching the model's modules.

A target kernel W [in, out] stays frozen; two trainable factors A [in, r] and B [r, out]
(B starts at zero, so training starts from the base model) give the effective kernel
W + (alpha / r) A B, which is put into the model for the forward pass. That is the same
function as x W + (alpha / r) x A B, and the merged kernel is exactly what is exported at the
end. Factors are named ``NAME:lora_a`` / ``NAME:lora_b`` (sharding.py places them like W's
input and output axes).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

SUFFIXES = (":lora_a", ":lora_b")


def is_lora(name: str) -> bool:
    return name.endswith(SUFFIXES)


def targets(names, pattern: str, rank: int) -> list[str]:
    """The 2-D params matching ``pattern`` (none when rank is 0)."""
    if rank <= 0:
        return []
    return [n for n in sorted(names) if re.search(pattern, n)]


def init(key: jax.Array, shapes: dict[str, tuple[int, ...]], rank: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Factors for each target {name: (in, out)}: A ~ N(0, 1/in), B = 0."""
    out = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        if len(shape) != 2:
            raise ValueError(f"LoRA target {name} has shape {shape}; only 2-D kernels [in, out] can take LoRA")
        d_in, d_out = shape
        out[f"{name}:lora_a"] = jax.random.normal(jax.random.fold_in(key, i), (d_in, rank), dtype) / jnp.sqrt(d_in)
        out[f"{name}:lora_b"] = jnp.zeros((rank, d_out), dtype)
    return out


def scale(alpha: float, rank: int) -> float:
    return alpha / rank


def merge(flat: dict[str, jax.Array], factors: dict[str, jax.Array], alpha: float, rank: int) -> dict[str, jax.Array]:
    """``flat`` with each target kernel replaced by W + (alpha / r) A B (other entries unchanged)."""
    out = dict(flat)
    s = scale(alpha, rank)
    for name in {n.rsplit(":", 1)[0] for n in factors}:
        a, b = factors[f"{name}:lora_a"], factors[f"{name}:lora_b"]
        w = flat[name]
        out[name] = (w.astype(jnp.float32) + s * (a.astype(jnp.float32) @ b.astype(jnp.float32))).astype(w.dtype)
    return out
