"""GGUF LLaMA conversion (lin_llm.io.gguf) against transformers' GGUF loader and tokenizer, and against
the Hugging Face models the test files are written from (tests/gguf_files.py writes them as llama.cpp does).
"""

import json
import lzma
import re
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf.quants import dequantize
from tokenizers import Tokenizer

from gguf_files import (
    Q,
    byte_tokenizer,
    trained_byte_level_tokenizer,
    trained_sentencepiece_tokenizer,
    write_llama_gguf,
    write_tokenizer_gguf,
)
from hf_reference import hf_logits, save_tiny_hf_llama
from lin_llm import CheckpointError, load_checkpoint
from lin_llm.cli.convert import main
from lin_llm.io.gguf import DEQUANTIZABLE, convert_gguf_to_checkpoint, gguf_metadata
from lin_llm.io.gguf_tokenizer import gguf_tokenizer
from lin_llm.io.hf import hf_names
from lin_llm.model import flat_params
from lin_llm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
IDS = np.random.RandomState(0).randint(0, 97, size=(2, 48))
SAMPLES = [
    "In the beginning God created the heaven and the earth. I'm sure they'll've SHOUTED.",  # English
    "def area(r: float) -> float:\n    return 3.14159 * r**2  # TODO\n\n\nif x != y: print(f'{x}')",  # code
    "1 22 333 4444 55555 0.5 -17 1e-9 2024-01-31 $1,000,000",  # digits
    "tab\there   three  two \n\n\n  \t \r\n   lead and trail   ",  # whitespace runs
    "héllo wörld — naïve café, Straße, 日本語のテキスト, Привет, 😀👍🏽",  # non-ASCII
    "<|im_start|>user\nHi<|im_end|>\n<think>ok</think><|eot_id|><s>x</s>",  # special and added tokens
]
# A mix of storage types: norms stay F32 (as llama.cpp writes them).
QUANTIZED = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q8_0}
QUANTIZED |= {"ffn_gate": Q.F16, "ffn_up": Q.BF16, "ffn_down": Q.Q4_1}


def _qtype(name):
    return QUANTIZED[name.split(".")[-2]]


def _kjv(chars):
    return lzma.decompress((ROOT / "data" / "kjv.txt.xz").read_bytes()).decode("utf-8")[:chars]


def _transformers_model(gguf_file: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()


def _transformers_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))).logits.numpy()


def _transformers_tokenizer(gguf_file: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """GGUF files of tiny random HF LLaMAs (GQA), each converted once: {"f32": untied F32, "quantized": tied, mixed}."""
    root = tmp_path_factory.mktemp("gguf")
    untied = save_tiny_hf_llama(root / "hf-untied", tie=False, rope_scaling=None, seed=11)
    tied = save_tiny_hf_llama(root / "hf-tied", tie=True, rope_scaling=None, seed=12)
    files = {"f32": (untied, write_llama_gguf(root / "f32" / "m.gguf", untied))}
    files["quantized"] = (tied, write_llama_gguf(root / "quantized" / "m.gguf", tied, qtypes=_qtype))
    out = {}
    for name, (hf_dir, gguf_file) in files.items():
        convert_gguf_to_checkpoint(gguf_file, root / f"ours-{name}")
        out[name] = {"hf": hf_dir, "gguf": gguf_file, "ours": root / f"ours-{name}"}
    return out


# --------------------------------------------------------------------------- weights and logits


def test_f32_file_matches_transformers_and_the_original_model(tiny):
    case = tiny["f32"]
    ours = np.asarray(load_checkpoint(case["ours"])(jnp.asarray(IDS)))
    reference = _transformers_logits(_transformers_model(case["gguf"]), IDS)
    assert np.abs(reference).max() > 1.0
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours, hf_logits(case["hf"], IDS), rtol=0, atol=1e-4)


def test_quantized_file_gives_transformers_dequantized_weights_and_logits(tiny):
    case = tiny["quantized"]
    types = {t.name: t.tensor_type for t in GGUFReader(case["gguf"]).tensors}
    assert {types["token_embd.weight"], types["blk.0.attn_q.weight"], types["blk.1.ffn_up.weight"]} == {
        Q.Q8_0,
        Q.Q4_1,
        Q.BF16,
    }
    assert "output.weight" not in types  # tied: llama.cpp writes no output matrix
    reference = _transformers_model(case["gguf"])
    model = load_checkpoint(case["ours"])
    assert model.cfg.tie_embeddings and model.cfg.n_kv_heads == 2
    ours, theirs = flat_params(model), reference.state_dict()
    for name, (hf_name, transposed) in hf_names(model.cfg).items():
        value = np.asarray(ours[name])
        np.testing.assert_array_equal(value.T if transposed else value, theirs[hf_name].numpy(), err_msg=hf_name)
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(IDS))), _transformers_logits(reference, IDS), rtol=0, atol=1e-4
    )


def test_bfloat16_output_through_the_command_line(tiny, tmp_path, capsys):
    case = tiny["quantized"]
    assert main(["--gguf", str(case["gguf"]), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert "bfloat16" in capsys.readouterr().out
    bf16, f32 = flat_params(load_checkpoint(tmp_path / "bf16")), flat_params(load_checkpoint(case["ours"]))
    for name, value in f32.items():
        assert bf16[name].dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(np.asarray(bf16[name]), np.asarray(value).astype(ml_dtypes.bfloat16))


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize("rope_scaling", [LLAMA3, {"rope_type": "linear", "factor": 4.0}], ids=["llama3", "linear"])
def test_rope_scaling_matches_the_original_model(tmp_path, rope_scaling):
    # transformers' GGUF loader ignores both (llama.rope.scaling.*, rope_freqs.weight): the HF model is the reference.
    hf_dir = save_tiny_hf_llama(
        tmp_path / "hf", tie=False, rope_scaling=rope_scaling, num_hidden_layers=1, max_position_embeddings=16384
    )
    gguf_file = write_llama_gguf(tmp_path / "m.gguf", hf_dir)
    cfg = convert_gguf_to_checkpoint(gguf_file, tmp_path / "ours")
    assert cfg.rope.type == rope_scaling["rope_type"] and cfg.rope.factor == rope_scaling["factor"]
    ours = np.asarray(load_checkpoint(tmp_path / "ours")(jnp.asarray(IDS)))
    np.testing.assert_allclose(ours, hf_logits(hf_dir, IDS), rtol=0, atol=1e-4)


def _q5_reference(raw: np.ndarray, with_min: bool) -> np.ndarray:
    """ggml's dequantize_row_q5_0 / q5_1, restated: 16 low nibbles, 16 high, a fifth bit from qh."""
    head = 4 if with_min else 2
    blocks = raw.reshape(-1, head + 20)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qh = blocks[:, head : head + 4].copy().view("<u4")
    qs = blocks[:, head + 4 :].astype(np.uint32)
    bits = (qh >> np.arange(32, dtype=np.uint32)) & 1
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1) | (bits << 4)
    if with_min:
        return d * q + blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return d * (q.astype(np.float32) - 16)


def test_every_accepted_storage_type_dequantizes_as_an_independent_implementation_does():
    from transformers.integrations.gguf.dequant import GGML_BLOCK
    from transformers.integrations.gguf.dequant import dequantize as transformers_dequantize

    rng = np.random.default_rng(0)
    independent = {
        Q.F32: lambda raw: raw.view(np.float32),
        Q.F16: lambda raw: raw.view(np.float16).astype(np.float32),
        Q.BF16: lambda raw: raw.view(ml_dtypes.bfloat16).astype(np.float32),
        Q.Q5_0: lambda raw: _q5_reference(raw, with_min=False),
        Q.Q5_1: lambda raw: _q5_reference(raw, with_min=True),
    }
    for qtype in DEQUANTIZABLE:
        block, size = GGML_QUANT_SIZES[qtype]
        rows, cols = 3, 2 * max(block, 32)
        raw = rng.integers(0, 256, size=rows * cols // block * size, dtype=np.uint8)
        raw = (raw.view(np.uint16) & 0xBFFF).view(np.uint8)  # every half-float field finite
        if qtype in independent:
            expected = independent[qtype](raw)
        else:
            assert int(qtype) in GGML_BLOCK, qtype.name
            expected = transformers_dequantize(torch.from_numpy(raw.copy()), int(qtype)).numpy()
        ours = dequantize(raw.reshape(rows, -1), qtype)
        assert np.isfinite(ours).all() and np.abs(ours).max() > 0, qtype.name
        np.testing.assert_array_equal(ours.reshape(-1), expected.reshape(-1), err_msg=qtype.name)


# --------------------------------------------------------------------------- tokenizers


def _assert_same_tokenizer(ours_json: str, theirs, extra_transformers_tokens=()):
    ours, expected = json.loads(ours_json), json.loads(theirs.backend_tokenizer.to_str())
    vocab_size = len(ours["model"]["vocab"])
    extra = [t for t in expected["added_tokens"] if t["content"] in extra_transformers_tokens]
    assert all(t["id"] >= vocab_size for t in extra)  # transformers adds them past the model's vocabulary
    expected["added_tokens"] = [t for t in expected["added_tokens"] if t not in extra]
    assert ours == expected
    tokenizer = Tokenizer.from_str(ours_json)
    for text in SAMPLES:
        assert tokenizer.encode(text).ids == theirs(text)["input_ids"], text
        assert tokenizer.encode(text, add_special_tokens=False).ids == theirs.encode(text, add_special_tokens=False)


def _assert_same_config(config: dict, theirs):
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token", "chat_template"):
        assert config.get(key) == getattr(theirs, key), key


@pytest.fixture(scope="module")
def kjv_documents():
    return _kjv(300_000).split("\n\n")


def test_byte_level_tokenizer_with_llama3_split_matches_transformers(tmp_path, kjv_documents):
    spec = trained_byte_level_tokenizer(kjv_documents)
    gguf_file = write_tokenizer_gguf(tmp_path / "t.gguf", spec, vocab_size=len(spec["tokens"]))
    tokenizer_json, config = gguf_tokenizer(gguf_metadata(gguf_file), str(gguf_file))
    theirs = _transformers_tokenizer(gguf_file)
    _assert_same_tokenizer(tokenizer_json, theirs, extra_transformers_tokens=("<|endoftext|>",))
    _assert_same_config(config, theirs)
    assert config["add_bos_token"] and Tokenizer.from_str(tokenizer_json).encode("x").ids[0] == spec["bos"]


def test_sentencepiece_tokenizer_matches_transformers(tmp_path, kjv_documents):
    spec = trained_sentencepiece_tokenizer(kjv_documents)
    gguf_file = write_tokenizer_gguf(tmp_path / "t.gguf", spec, vocab_size=len(spec["tokens"]))
    tokenizer_json, config = gguf_tokenizer(gguf_metadata(gguf_file), str(gguf_file))
    theirs = _transformers_tokenizer(gguf_file)
    _assert_same_tokenizer(tokenizer_json, theirs)
    _assert_same_config(config, theirs)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    assert "<0xC3>" in tokenizer.encode("é").tokens  # an unseen character falls back to bytes
    assert tokenizer.decode(tokenizer.encode(SAMPLES[4]).ids) == SAMPLES[4]


# llama.cpp's `smollm` pre-tokenizer (llama-vocab.cpp: "\\p{N}" isolated, then GPT-2's regex), which
# is also SmolLM2's own tokenizer.json (Digits(individual_digits) then ByteLevel). transformers 5.23
# has no `smollm` entry and falls back to GPT-2's split: it differs on whitespace before a digit.
SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def test_smollm2_tokenizer_matches_transformers_with_llama_cpps_digit_split(smollm2_gguf):
    tokenizer_json, config = gguf_tokenizer(gguf_metadata(smollm2_gguf), str(smollm2_gguf))
    theirs = _transformers_tokenizer(smollm2_gguf)
    reference = json.loads(theirs.backend_tokenizer.to_str())
    assert reference["pre_tokenizer"] == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                          "use_regex": True}  # transformers' plain GPT-2 split
    reference["pre_tokenizer"] = SMOLLM_PRE_TOKENIZER
    assert json.loads(tokenizer_json) == reference  # vocabulary, merges, specials, post-processor: transformers'
    _assert_same_config(config, theirs)
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert not config["add_bos_token"] and "<|im_start|>" in config["chat_template"]
    ours = Tokenizer.from_str(tokenizer_json)
    text = _kjv(20_000)
    for sample in [*SAMPLES, text]:
        if not re.search(r"\s\s\d", sample):  # wherever the two splits agree, transformers' ids
            assert ours.encode(sample).ids == theirs(sample)["input_ids"], sample
    assert ours.encode("a  1").tokens == ["a", "ĠĠ", "1"]  # llama.cpp's split
    assert theirs.convert_ids_to_tokens(theirs("a  1")["input_ids"]) == ["a", "Ġ", "Ġ", "1"]


def test_checkpoint_carries_the_tokenizer(tiny):
    case = tiny["f32"]
    expected_json, expected_config = gguf_tokenizer(gguf_metadata(case["gguf"]), str(case["gguf"]))
    assert (case["ours"] / "tokenizer.json").read_text(encoding="utf-8") == expected_json
    assert json.loads((case["ours"] / "tokenizer_config.json").read_text()) == expected_config
    tokenizer = load_tokenizer(case["ours"])
    assert tokenizer.vocab_size == 97 and tokenizer.decode(tokenizer.encode("the hen")) == "the hen"


# --------------------------------------------------------------------------- refusals


def _refused(gguf_file: Path, out: Path, match: str):
    with pytest.raises(CheckpointError, match=match):
        convert_gguf_to_checkpoint(gguf_file, out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no partial dirs


REFUSALS = {
    "architecture": ({"arch": "qwen2"}, r"general\.architecture='qwen2' is not supported.*'llama'"),
    "experts": (
        {"extra_meta": lambda w: w.add_expert_count(8)},
        r"llama\.expert_count=8: mixture-of-experts models are not supported",
    ),
    "storage type": (
        {"replace": {"blk.0.attn_norm.weight": np.ones(64, np.int32)}},
        r"tensor blk\.0\.attn_norm\.weight has type I32, which lin_llm cannot dequantize \(supported: F32, F16",
    ),
    "missing tensor": (
        {"drop": ("blk.1.ffn_up.weight",)},
        r"tensor blk\.1\.ffn_up\.weight is missing \(needed for model\.layers\.1\.mlp\.up_proj\.weight\)",
    ),
    "mis-shaped tensor": (
        {"replace": {"blk.0.attn_k.weight": np.zeros((16, 64), np.float32)}},
        r"tensor blk\.0\.attn_k\.weight has shape \[16, 64\] \(HF layout\), the metadata implies \[32, 64\]",
    ),
    "unexpected tensor": (
        {"replace": {"blk.0.attn_q.bias": np.zeros(64, np.float32)}},
        r"unexpected tensor blk\.0\.attn_q\.bias \(1 in all\): not part of a LLaMA model",
    ),
    "tokenizer model": (
        {"tokenizer": byte_tokenizer(97) | {"model": "bert"}},
        r"tokenizer\.ggml\.model='bert' is a tokenizer lin_llm cannot convert \(supported: gpt2, llama\)",
    ),
    "pre-tokenizer": (
        {"tokenizer": byte_tokenizer(97) | {"pre": "qwen2"}},
        r"tokenizer\.ggml\.pre='qwen2' is a pre-tokenizer lin_llm cannot convert",
    ),
    "rope scaling": (
        {"extra_meta": lambda w: w.add_string("llama.rope.scaling.type", "yarn")},
        r"llama\.rope\.scaling\.type='yarn' is not supported",
    ),
    "rope factors": (
        {"replace": {"rope_freqs.weight": np.linspace(1.0, 3.0, 8, dtype=np.float32)}},
        r"tensor rope_freqs\.weight holds rope frequency factors that are not LLaMA-3's scaling",
    ),
    "split file": (
        {"extra_meta": lambda w: (w.add_uint16("split.no", 0), w.add_uint16("split.count", 2))},
        r"is part 1 of a 2-file split GGUF; merge it first",
    ),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_refusals_name_the_field_or_tensor(tiny, tmp_path, case):
    options, match = REFUSALS[case]
    gguf_file = write_llama_gguf(tmp_path / "bad.gguf", tiny["f32"]["hf"], **options)
    _refused(gguf_file, tmp_path / "out", match)


def test_truncated_file_is_refused(tiny, tmp_path):
    data = tiny["f32"]["gguf"].read_bytes()
    for cut in (len(data) - 100, 2000):  # in the tensor data, in the metadata
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        _refused(
            tmp_path / "cut.gguf", tmp_path / "out", r"cut\.gguf is not a readable GGUF file \(truncated or corrupt"
        )


def test_command_line_refusals(tiny, tmp_path, capsys):
    gguf_file = str(tiny["f32"]["gguf"])
    assert main(["--gguf", gguf_file, "--out", str(tmp_path / "o"), "--dtype", "float16"]) == 2
    assert "--dtype 'float16' is not supported; choose one of float32, bfloat16" in capsys.readouterr().err
    assert main(["--gguf", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "none.gguf does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--hf-dir", str(tmp_path), "--dtype", "bfloat16", "--out", str(tmp_path / "o")])
    assert "--dtype applies to --gguf only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_kept(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="already exists and is not empty.*--overwrite"):
        convert_gguf_to_checkpoint(tiny["f32"]["gguf"], out)
    assert (out / "precious.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- the real SmolLM2 file


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_gguf, smollm2_checkpoint):
    model = load_checkpoint(smollm2_checkpoint)
    cfg = model.cfg
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.ffn_dim, cfg.vocab_size, cfg.max_seq_len, cfg.rope.theta, cfg.tie_embeddings) == (
        1536,
        49152,
        8192,
        1e5,
        True,
    )
    ids = np.asarray([load_tokenizer(smollm2_checkpoint).encode(_kjv(20_000))[:512]])
    reference = _transformers_model(smollm2_gguf)
    theirs = reference.state_dict()
    ours = flat_params(model)
    for name, (hf_name, transposed) in hf_names(cfg).items():
        value = np.asarray(ours[name])
        np.testing.assert_array_equal(value.T if transposed else value, theirs[hf_name].numpy(), err_msg=hf_name)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), _transformers_logits(reference, ids), atol=5e-4)


@pytest.mark.slow
def test_smollm2_checkpoint_tokenizer_loads_in_transformers(smollm2_gguf, smollm2_checkpoint):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    theirs = _transformers_tokenizer(smollm2_gguf)
    for text in SAMPLES:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)
