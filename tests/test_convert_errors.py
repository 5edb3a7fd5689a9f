"""Bad Hugging Face directories are refused with a message naming the problem; --out stays clean."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lin_llm.errors import CheckpointError
from lin_llm.io.hf import convert_hf_to_checkpoint


@pytest.fixture
def hf_copy(hf_dirs, tmp_path):
    copy = tmp_path / "hf"
    shutil.copytree(hf_dirs["untied"], copy)
    return copy


def _rewrite_tensors(hf_dir, edit):
    tensors = load_file(hf_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})


def _refused(hf_dir, out, match):
    with pytest.raises(CheckpointError, match=match):
        convert_hf_to_checkpoint(hf_dir, out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no partial dirs


def test_directory_without_weights(hf_copy, tmp_path):
    (hf_copy / "model.safetensors").unlink()
    (hf_copy / "pytorch_model.bin").write_bytes(b"")
    # (python -m lin_llm.convert reads PyTorch weights through lin_llm.io.released; lin_llm.io.hf reads safetensors)
    _refused(hf_copy, tmp_path / "out", r"no weights in .*model\.safetensors.*pytorch_model\.bin.*python -m lin_llm.convert"
                                        r".*found pytorch_model\.bin")


def test_mixture_of_experts_architecture(hf_copy, tmp_path):
    config = json.loads((hf_copy / "config.json").read_text())
    config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=8)
    (hf_copy / "config.json").write_text(json.dumps(config))
    _refused(hf_copy, tmp_path / "out", r"architecture MixtralForCausalLM .*not supported")


def test_missing_tensor(hf_copy, tmp_path):
    _rewrite_tensors(hf_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _refused(hf_copy, tmp_path / "out", r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing")


def test_tensor_of_wrong_shape(hf_copy, tmp_path):
    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)

    _rewrite_tensors(hf_copy, shrink)
    _refused(hf_copy, tmp_path / "out", r"k_proj\.weight has shape \[16, 64\], config\.json implies \[32, 64\]")


def test_unexpected_tensor(hf_copy, tmp_path):
    _rewrite_tensors(hf_copy, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}))
    _refused(hf_copy, tmp_path / "out", r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias")


def test_missing_shard_of_an_index(hf_copy, tmp_path):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(hf_copy, tmp_path / "out", r"lists shard model-00001-of-00002\.safetensors, which is missing")


def test_existing_output_is_not_overwritten(hf_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="already exists and is not empty.*--overwrite"):
        convert_hf_to_checkpoint(hf_copy, out)
    assert (out / "precious.txt").read_text() == "keep me"


def test_cli_converts_and_refuses_with_nonzero_exit(hf_copy, tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "lin_llm.convert", "--hf-dir", str(hf_copy), "--out", str(tmp_path / "ok")],
        capture_output=True, text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "wrote lin_llm checkpoint" in ok.stdout and (tmp_path / "ok" / "config.yaml").is_file()
    (hf_copy / "model.safetensors").unlink()
    bad = subprocess.run(
        [sys.executable, "-m", "lin_llm.convert", "--hf-dir", str(hf_copy), "--out", str(tmp_path / "bad")],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2
    assert "error: no weights in" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
