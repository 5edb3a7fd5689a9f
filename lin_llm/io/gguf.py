"""GGUF LLaMA files (llama.cpp's format) -> lin_llm checkpoints, read with the ``gguf`` package (no torch).

    python -m lin_llm.convert --gguf model.Q4_K_M.gguf --out DIR [--dtype bfloat16]

``read_gguf`` validates the whole file before any tensor data is read and describes it the way the
Hugging Face path does: a config.json dict, the tensors by HF name in HF layout ([out, in], with
llama.cpp's q/k row permutation undone), and the tokenizer files. ``convert_gguf_to_checkpoint``
writes that as a lin_llm checkpoint, dequantizing one tensor at a time from the memory-mapped file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFReader, ReaderTensor, get_tensor_name_map
from gguf.quants import dequantize

from lin_llm.config import DTYPES, ModelConfig, RopeConfig
from lin_llm.errors import CheckpointError
from lin_llm.io.atomic import atomic_directory
from lin_llm.io.checkpoint import write_model_dir
from lin_llm.io.gguf_tokenizer import gguf_tokenizer
from lin_llm.io.hf import hf_layout, hf_names, model_config_from_hf, refuse_unexpected
from lin_llm.io.paths import require_file
from lin_llm.io.streaming import LazyTensor
from lin_llm.rope import inverse_frequencies

ARCHITECTURE = "llama"
Q = GGMLQuantizationType
# What gguf.quants dequantizes, each checked in the tests against an independent dequantizer.
DEQUANTIZABLE = (
    *(Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1),
    *(Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K),
    *(Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS),
)
ROPE_FREQS = "rope_freqs.weight"  # LLaMA-3 rope scaling, as per-frequency divisors
# The LLaMA-3 scaling llama.cpp writes rope_freqs from (it reads original_max_position_embeddings
# from the top level of config.json, where LLaMA-3 has none, so always 8192).
LLAMA_CPP_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_len": 8192}


@dataclass(frozen=True)
class GGUFCheckpoint:
    """A validated GGUF LLaMA, described as a Hugging Face directory would be."""

    path: Path
    hf_config: dict  # what config.json would hold
    tensors: dict[str, ReaderTensor]  # HF tensor name -> the file's (memory-mapped) tensor
    tokenizer_files: dict[str, str]  # file name -> text

    def tensor(self, hf_name: str) -> np.ndarray:
        """One tensor dequantized to float32 in HF layout, llama.cpp's q/k row permutation undone."""
        found = self.tensors[hf_name]
        values = np.asarray(dequantize(found.data, found.tensor_type), np.float32).reshape(_hf_shape(found))
        if hf_name.endswith("self_attn.q_proj.weight"):
            return _undo_rope_permutation(values, self.hf_config["num_attention_heads"])
        if hf_name.endswith("self_attn.k_proj.weight"):
            return _undo_rope_permutation(values, self.hf_config["num_key_value_heads"])
        return values


def _undo_rope_permutation(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp rotates interleaved pairs, HF the two halves of each head: the inverse of its permute()."""
    return rows.reshape(n_heads, rows.shape[0] // n_heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _hf_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))  # ggml lists the fastest dimension first


# --------------------------------------------------------------------------- metadata


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """A GGUF file's metadata as {key: value}."""
    return _open(Path(path))[1]


def _open(path: Path) -> tuple[GGUFReader, dict[str, Any]]:
    require_file(path, "--gguf", "GGUF")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): {err}") from None
    return reader, {name: field.contents() for name, field in reader.fields.items()}


def _integer(meta: dict, key: str, source: Path, default: int | None = None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise CheckpointError(f"{source}: metadata {key} is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(
            f"{source}: metadata {key}={value!r} is not one integer (per-layer values are not supported)"
        )
    return value


def _number(meta: dict, key: str, source: Path) -> float:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(
            f"{source}: metadata {key} is {'missing' if value is None else repr(value)}, not a number"
        )
    # GGUF stores these as float32: the shortest decimal that is the same float32 (1e-05, not 9.9999997e-06)
    return float(str(np.float32(value))) if isinstance(value, float) else float(value)


def _rope_parameters(meta: dict, rope_freqs: np.ndarray | None, head_dim: int, source: Path) -> dict:
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    kind = meta.get("llama.rope.scaling.type", "none")
    if rope_freqs is not None:
        if kind != "none":
            raise CheckpointError(f"{source}: tensor {ROPE_FREQS} and llama.rope.scaling.type={kind!r} contradict")
        return _llama3_rope(theta, rope_freqs, head_dim, source)
    if kind == "linear":
        return {
            "rope_theta": theta,
            "rope_type": "linear",
            "factor": _number(meta, "llama.rope.scaling.factor", source),
        }
    if "llama.rope.scale_linear" in meta and kind == "none":  # older files
        return {"rope_theta": theta, "rope_type": "linear", "factor": float(meta["llama.rope.scale_linear"])}
    if kind != "none":
        raise CheckpointError(
            f"{source}: metadata llama.rope.scaling.type={kind!r} is not supported (none, linear; "
            f"LLaMA-3 scaling comes as the tensor {ROPE_FREQS})"
        )
    return {"rope_theta": theta, "rope_type": "default"}


def _llama3_rope(theta: float, rope_freqs: np.ndarray, head_dim: int, source: Path) -> dict:
    """The LLaMA-3 scaling whose frequencies are those rope_freqs.weight divides by, or a refusal."""
    factors = np.asarray(rope_freqs, np.float64).reshape(-1)
    rope = RopeConfig(theta=theta, type="llama3", factor=float(factors.max()), **LLAMA_CPP_LLAMA3)
    wanted = inverse_frequencies(head_dim, RopeConfig(theta=theta)) / factors if len(factors) == head_dim // 2 else None
    if wanted is None or not np.allclose(inverse_frequencies(head_dim, rope), wanted, rtol=1e-5, atol=0):
        raise CheckpointError(
            f"{source}: tensor {ROPE_FREQS} holds rope frequency factors that are not LLaMA-3's scaling "
            f"(factor {rope.factor:g}, low/high frequency factors 1 and 4, original context 8192); not supported"
        )
    return {
        "rope_theta": theta,
        "rope_type": "llama3",
        "factor": rope.factor,
        "low_freq_factor": rope.low_freq_factor,
        "high_freq_factor": rope.high_freq_factor,
        "original_max_position_embeddings": rope.original_max_len,
    }


def _hf_config(meta: dict, reader: GGUFReader, source: Path) -> dict:
    """config.json of the model in the metadata (the keys transformers' GGUF loader maps, and more)."""
    if _integer(meta, "llama.expert_count", source, default=0):
        raise CheckpointError(
            f"{source}: metadata llama.expert_count={meta['llama.expert_count']}: "
            "mixture-of-experts models are not supported"
        )
    n_heads = _integer(meta, "llama.attention.head_count", source)
    dim = _integer(meta, "llama.embedding_length", source)
    head_dim = _integer(meta, "llama.attention.key_length", source, default=dim // n_heads)
    for other in ("llama.attention.value_length", "llama.rope.dimension_count"):
        if meta.get(other, head_dim) != head_dim:
            raise CheckpointError(
                f"{source}: metadata {other}={meta[other]} differs from the head dimension {head_dim} "
                "(partial rotary or unequal value heads are not supported)"
            )
    names = {t.name for t in reader.tensors}
    rope_freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if rope_freqs is not None:
        _check_storage_type(rope_freqs, source)
    rope_values = None if rope_freqs is None else dequantize(rope_freqs.data, rope_freqs.tensor_type)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": _integer(
            meta, "llama.vocab_size", source, default=len(meta.get("tokenizer.ggml.tokens", [])) or None
        ),
        "hidden_size": dim,
        "num_hidden_layers": _integer(meta, "llama.block_count", source),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _integer(meta, "llama.attention.head_count_kv", source, default=n_heads),
        "head_dim": head_dim,
        "intermediate_size": _integer(meta, "llama.feed_forward_length", source),
        "max_position_embeddings": _integer(meta, "llama.context_length", source),
        "rms_norm_eps": _number(meta, "llama.attention.layer_norm_rms_epsilon", source),
        "rope_parameters": _rope_parameters(meta, rope_values, head_dim, source),
        "tie_word_embeddings": "output.weight" not in names,  # llama.cpp writes no output when tied
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    return config


# --------------------------------------------------------------------------- tensors


def _check_storage_type(tensor: ReaderTensor, source: Path) -> None:
    if tensor.tensor_type not in DEQUANTIZABLE:
        raise CheckpointError(
            f"{source}: tensor {tensor.name} has type {tensor.tensor_type.name}, which lin_llm cannot dequantize "
            f"(supported: {', '.join(q.name for q in DEQUANTIZABLE)})"
        )


def _match_tensors(cfg: ModelConfig, reader: GGUFReader, source: Path) -> dict[str, ReaderTensor]:
    """HF name -> the file's tensor, every name, shape and type checked against the config."""
    by_name = {t.name: t for t in reader.tensors}
    gguf_names = get_tensor_name_map(MODEL_ARCH.LLAMA, cfg.n_layers)
    matched = {}
    for theirs, (_, _, want) in hf_layout(cfg).items():
        name = gguf_names.get_name(theirs, try_suffixes=(".weight",))
        if name not in by_name:
            raise CheckpointError(f"{source}: tensor {name} is missing (needed for {theirs})")
        tensor = by_name[name]
        if _hf_shape(tensor) != want:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {list(_hf_shape(tensor))} (HF layout), the metadata implies {list(want)}"
            )
        _check_storage_type(tensor, source)
        matched[theirs] = tensor
    refuse_unexpected(source, set(by_name) - {t.name for t in matched.values()} - {ROPE_FREQS})
    return matched


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Validate a GGUF LLaMA completely (metadata, tensors, tokenizer) without reading tensor data."""
    path = Path(path)
    reader, meta = _open(path)
    if _integer(meta, "split.count", path, default=1) > 1:
        raise CheckpointError(
            f"{path} is part {meta.get('split.no', 0) + 1} of a {meta['split.count']}-file split GGUF; "
            "merge it first (llama-gguf-split --merge FIRST_PART OUT.gguf)"
        )
    architecture = meta.get("general.architecture")
    if architecture != ARCHITECTURE:
        raise CheckpointError(
            f"{path}: metadata general.architecture={architecture!r} is not supported; "
            f"lin_llm converts {ARCHITECTURE!r} GGUF files (dense LLaMA-family decoders)"
        )
    hf_config = _hf_config(meta, reader, path)
    try:
        cfg = model_config_from_hf(hf_config, "float32")
    except CheckpointError as err:  # its messages speak of config.json
        raise CheckpointError(f"{path}: its metadata describes a model lin_llm cannot build: {err}") from None
    tensors = _match_tensors(cfg, reader, path)
    tokenizer_json, tokenizer_config = gguf_tokenizer(meta, str(path))
    tokenizer_files = {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
    }
    return GGUFCheckpoint(path, hf_config, tensors, tokenizer_files)


def convert_gguf_to_checkpoint(
    path: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False
) -> ModelConfig:
    """Write the GGUF LLaMA at ``path`` as a lin_llm checkpoint (config, params in ``dtype``, tokenizer) at ``out``."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    gguf = read_gguf(path)  # validates everything before `out` is touched
    cfg = model_config_from_hf(gguf.hf_config, dtype)
    flat = {ours: _lazy_tensor(gguf, theirs, transposed, np.dtype(getattr(jnp, dtype)))
            for ours, (theirs, transposed) in hf_names(cfg).items()}
    with atomic_directory(out, overwrite, sources=(gguf.path,)) as tmp:
        write_model_dir(tmp, cfg, flat, None, tokenizer_files=gguf.tokenizer_files)  # one tensor in memory at a time
    return cfg


def _lazy_tensor(gguf: GGUFCheckpoint, hf_name: str, transposed: bool, dtype: np.dtype) -> LazyTensor:
    """The file's tensor ``hf_name`` in our layout and ``dtype``, dequantized when it is written."""

    def load() -> np.ndarray:
        values = gguf.tensor(hf_name)
        if not np.isfinite(values).all():
            raise CheckpointError(f"{gguf.path}: tensor {hf_name} dequantizes to non-finite values; the file is corrupt")
        return np.ascontiguousarray(values.T if transposed else values).astype(dtype, copy=False)

    shape = _hf_shape(gguf.tensors[hf_name])
    return LazyTensor(shape[::-1] if transposed else shape, dtype, load)
