"""Golden logits against Hugging Face transformers, and bit-exact conversion both ways.

These fail if RoPE's rotation layout, the GQA head mapping or the norm epsilon were wrong:
the tiny models use GQA (4 heads, 2 kv heads), LLaMA-3 rope scaling over a sequence longer
than its original context, random norm weights and rms_norm_eps=1e-3.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from hf_reference import hf_logits, save_tiny_hf_llama
from lin_llm import load_checkpoint
from lin_llm.io.hf import convert_hf_to_checkpoint, export_to_hf

IDS = np.random.RandomState(0).randint(0, 97, size=(2, 48))


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_golden_logits_match_transformers(hf_dirs, converted, name):
    reference = hf_logits(hf_dirs[name], IDS)
    ours = np.asarray(load_checkpoint(converted[name])(jnp.asarray(IDS)))
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    assert np.abs(reference).max() > 1.0  # the comparison is not of near-zero numbers
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 4.0}], ids=["default", "linear"])
def test_golden_logits_other_rope_scalings(tmp_path, rope_scaling):
    hf_dir = save_tiny_hf_llama(tmp_path / "hf", tie=False, rope_scaling=rope_scaling, num_hidden_layers=1)
    ours = np.asarray(load_checkpoint(hf_dir)(jnp.asarray(IDS)))  # a HF dir loads directly too
    np.testing.assert_allclose(ours, hf_logits(hf_dir, IDS), rtol=0, atol=1e-4)


def _tensors(hf_dir):
    return load_file(hf_dir / "model.safetensors")


@pytest.mark.parametrize("name", ["untied", "tied", "bf16"])
def test_round_trip_hf_ours_hf_is_bit_exact(hf_dirs, converted, tmp_path, name):
    back = tmp_path / "back"
    export_to_hf(converted[name], back)
    original, exported = _tensors(hf_dirs[name]), _tensors(back)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype, key
        assert exported[key].shape == tensor.shape, key
        assert exported[key].tobytes() == tensor.tobytes(), key
    assert (back / "tokenizer_config.json").exists() == (hf_dirs[name] / "tokenizer_config.json").exists()
    config = json.loads((back / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] == (name == "tied")


def test_exported_directory_loads_in_transformers(hf_dirs, converted, tmp_path):
    back = tmp_path / "back"
    export_to_hf(converted["untied"], back)
    np.testing.assert_array_equal(hf_logits(back, IDS), hf_logits(hf_dirs["untied"], IDS))


def test_sharded_safetensors_round_trip(converted, tmp_path):
    sharded = tmp_path / "sharded"
    export_to_hf(converted["untied"], sharded, max_shard_bytes=40_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = tmp_path / "again"
    convert_hf_to_checkpoint(sharded, again)
    a = load_checkpoint(again)(jnp.asarray(IDS))
    b = load_checkpoint(converted["untied"])(jnp.asarray(IDS))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
