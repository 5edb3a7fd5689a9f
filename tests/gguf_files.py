"""GGUF files written in the tests as llama.cpp's convert_hf_to_gguf.py writes a LLaMA.

The names, the q/k row permutation and the metadata keys are re-stated here from llama.cpp and
the GGUF spec, not taken from lin_llm, so that a converter reading them back is checked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from safetensors.numpy import load_file

Q = GGMLQuantizationType
HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    stem = hf_name.removesuffix(".weight")
    if stem.startswith("model.layers."):
        block, rest = stem.removeprefix("model.layers.").split(".", 1)
        return f"blk.{block}.{HF_TO_GGUF[rest]}.weight"
    return f"{HF_TO_GGUF[stem]}.weight"


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's half-split rotary rows -> GGML's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama_cpp_rope_freqs(hf: dict) -> np.ndarray:
    """llama.cpp's LLaMA-3 rope factors (generate_extra_tensors; original context read from the top level)."""
    rope = hf["rope_parameters"]
    dim = hf["head_dim"]
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = hf.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context_len / high:
            factors.append(1)
        elif wavelen > old_context_len / low:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, np.float32)


def byte_tokenizer(vocab_size: int) -> dict:
    """A byte-level vocabulary of ``vocab_size`` tokens: two control tokens, single bytes and five merges."""
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    singles = [chr(c) for c in range(ord("!"), ord("!") + vocab_size - 8)] + ["Ġ"]
    tokens = ["<|endoftext|>", "<|im_start|>", *singles, *(m.replace(" ", "") for m in merges)]
    assert len(tokens) == vocab_size and len(set(tokens)) == vocab_size
    return {
        "model": "gpt2",
        "pre": "smollm",
        "tokens": tokens,
        "types": [3, 3] + [1] * (vocab_size - 2),
        "merges": merges,
    }


def add_tokenizer(writer: GGUFWriter, spec: dict) -> None:
    writer.add_tokenizer_model(spec["model"])
    if spec.get("pre"):
        writer.add_tokenizer_pre(spec["pre"])
    writer.add_token_list(spec["tokens"])
    writer.add_token_types(spec["types"])
    if spec.get("merges") is not None:
        writer.add_token_merges(spec["merges"])
    if spec.get("scores") is not None:
        writer.add_token_scores(spec["scores"])
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
    ):
        if spec.get(key) is not None:
            add(spec[key])
    if spec.get("add_bos") is not None:
        writer.add_add_bos_token(spec["add_bos"])
    if spec.get("chat_template"):
        writer.add_chat_template(spec["chat_template"])


def add_llama_metadata(writer: GGUFWriter, hf: dict, rope_scaling: dict | None = None) -> None:
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_rope_dimension_count(hf["head_dim"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    writer.add_rope_freq_base(hf["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(hf["vocab_size"])
    if rope_scaling and rope_scaling.get("rope_type") == "linear":
        writer.add_string("llama.rope.scaling.type", "linear")
        writer.add_float32("llama.rope.scaling.factor", rope_scaling["factor"])


def add_tensor(writer: GGUFWriter, name: str, values: np.ndarray, qtype: GGMLQuantizationType) -> None:
    if qtype == Q.F32:
        writer.add_tensor(name, values.astype(np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, values.astype(np.float16))
    else:
        writer.add_tensor(name, quantize(values.astype(np.float32), qtype), raw_dtype=qtype)


def write_llama_gguf(
    path: Path,
    hf_dir: Path,
    *,
    qtypes=None,
    tokenizer: dict | None = None,
    arch: str = "llama",
    drop: tuple[str, ...] = (),
    replace: dict[str, np.ndarray] | None = None,
    extra_meta=None,
) -> Path:
    """Write the HF LLaMA at ``hf_dir`` as a GGUF at ``path``.

    ``qtypes(gguf_name) -> GGMLQuantizationType`` (default: F32); ``drop`` leaves tensors out;
    ``replace`` gives tensors by GGUF name (added when new, in the given dtype's GGUF type);
    ``extra_meta(writer)`` adds metadata.
    """
    hf = json.loads((hf_dir / "config.json").read_text())
    hf.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    tensors = load_file(hf_dir / "model.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, arch)
    writer.add_name("tiny test llama")
    add_llama_metadata(writer, hf, hf["rope_parameters"])
    add_tokenizer(writer, tokenizer or byte_tokenizer(hf["vocab_size"]))
    if extra_meta is not None:
        extra_meta(writer)
    gguf_tensors = {}
    for hf_name, values in tensors.items():
        values = values.astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            values = llama_cpp_permute(values, hf["num_attention_heads"], hf["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            values = llama_cpp_permute(values, hf["num_attention_heads"], hf["num_key_value_heads"])
        if hf_name == "lm_head.weight" and hf["tie_word_embeddings"]:
            continue
        gguf_tensors[gguf_name(hf_name)] = values
    if hf["rope_parameters"].get("rope_type") == "llama3":
        gguf_tensors["rope_freqs.weight"] = llama_cpp_rope_freqs(hf)
    for name, values in gguf_tensors.items():
        if name in drop or (replace and name in replace):
            continue
        one_dim = values.ndim == 1  # llama.cpp keeps norms (and rope_freqs) in F32
        add_tensor(writer, name, values, Q.F32 if one_dim or qtypes is None else qtypes(name))
    for name, values in (replace or {}).items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tokenizer_gguf(path: Path, tokenizer: dict, vocab_size: int) -> Path:
    """A GGUF with a tiny LLaMA's metadata and ``tokenizer`` but no tensors (for tokenizer comparisons)."""
    hf = {"max_position_embeddings": 128, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96}
    hf |= {"head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}
    hf |= {"rope_parameters": {"rope_theta": 10000.0}, "vocab_size": vocab_size}
    writer = GGUFWriter(path, "llama")
    add_llama_metadata(writer, hf)
    add_tokenizer(writer, tokenizer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def trained_byte_level_tokenizer(texts: list[str], vocab_size: int = 400) -> dict:
    """A LLaMA-3-style byte-level BPE trained on ``texts``, with control, user-defined and mislabelled tokens."""
    from tokenizers import ByteLevelBPETokenizer

    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<|begin_of_text|>"], show_progress=False)
    model = json.loads(trained._tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    # an end token, a user-defined one, and a "control" token outside the byte alphabet (as llama.cpp writes some)
    tokens += ["<|eot_id|>", "<think>", "<｜end▁of▁sentence｜>"]
    types = [3] + [1] * (len(tokens) - 4) + [3, 4, 3]
    return {
        "model": "gpt2",
        "pre": "llama-bpe",
        "tokens": tokens,
        "types": types,
        "merges": [" ".join(merge) for merge in model["merges"]],
        "bos": 0,
        "eos": len(tokens) - 3,
        "add_bos": True,
        "chat_template": "{% for m in messages %}<|begin_of_text|>{{ m['content'] }}<|eot_id|>{% endfor %}",
    }


def trained_sentencepiece_tokenizer(texts: list[str], vocab_size: int = 300) -> dict:
    """A LLaMA-2-style SentencePiece BPE vocabulary (scores, byte tokens, no merges) trained on ``texts``."""
    from tokenizers import SentencePieceBPETokenizer

    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator(
        texts, vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    vocab = json.loads(trained._tokenizer.to_str())["model"]["vocab"]
    pieces = sorted((t for t in vocab if t not in ("<unk>", "<s>", "</s>")), key=vocab.get)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>", *byte_tokens, *pieces]
    return {
        "model": "llama",
        "tokens": tokens,
        "types": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "bos": 1,
        "eos": 2,
        "unk": 0,
    }
