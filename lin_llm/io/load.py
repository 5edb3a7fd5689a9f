"""Loading a model from any directory lin_llm reads: its own checkpoints or Hugging Face LLaMA dirs
(plain, PyTorch .bin, or the authors' released layout: lin_llm.io.released)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lin_llm.config import ModelConfig, override_model_config
from lin_llm.errors import CheckpointError, ConfigError
from lin_llm.io import checkpoint, released
from lin_llm.io.paths import require_model_directory
from lin_llm.model import LlamaModel


def _overridden(path: Path, cfg: ModelConfig, overrides: Sequence[str]) -> ModelConfig:
    if not overrides:
        return cfg
    try:
        return override_model_config(cfg, overrides)
    except ConfigError as err:
        raise CheckpointError(f"override of {path}'s config is invalid: {err}") from None


def load_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> LlamaModel:
    """Load a lin_llm checkpoint directory or a Hugging Face LLaMA directory (any layout
    lin_llm.io.released.read_model_dir reads).

    ``overrides`` are model-config ``key=value`` items applied on top of the stored config,
    e.g. ``["compute_dtype=bfloat16"]`` or ``["attention=aug"]`` (linearising: the new params take
    their initial values).
    """
    path = require_model_directory(Path(path).absolute(), "checkpoint directory")
    if checkpoint.is_checkpoint(path):
        cfg = _overridden(path, checkpoint.read_model_config(path), overrides)
        return checkpoint.model_from_flat_params(cfg, checkpoint.restore_params(path, cfg))
    if (path / "config.json").is_file():
        stored_cfg, flat = released.read_model_dir(path)
        return checkpoint.model_from_flat_params(_overridden(path, stored_cfg, overrides), flat)
    raise CheckpointError(
        f"{path} is neither a lin_llm checkpoint ({checkpoint.CONFIG_FILE} + {checkpoint.PARAMS_DIR}/) "
        "nor a Hugging Face model directory (config.json + *.safetensors or pytorch_model*.bin)"
    )
