"""Model checkpoints: orbax params + a YAML model config, written atomically; HF dirs load too.

Layout of a lin_llm model checkpoint directory:
  config.yaml   {"model": {...}}: the ModelConfig the params belong to
  params/       orbax PyTree checkpoint of the flat {"layers.0.attn.wq.kernel": array, ...} dict
  tokenizer files copied from the Hugging Face directory it was converted from, if any
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from lin_llm.config import ConfigError, ModelConfig, config_to_dict, model_config_from_dict
from lin_llm.model import LlamaModel, abstract_model, new_param_defaults

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


class CheckpointError(ValueError):
    """A checkpoint or model directory is missing, incomplete or does not fit the model."""


# --------------------------------------------------------------------------- flat params


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"layers": {0: {"attn": ...}}} -> {"layers.0.attn...": leaf}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, object]) -> dict:
    """The inverse of flatten (digit parts become the int keys of nnx.List)."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = [int(p) if p.isdigit() else p for p in name.split(".")]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flat_params(model: LlamaModel) -> dict[str, jax.Array]:
    """The model's parameters as {"layers.0.attn.wq.kernel": array, ...}."""
    return flatten(nnx.state(model, nnx.Param).to_pure_dict())


def param_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    return flat_params(abstract_model(cfg))


def check_param_shapes(cfg: ModelConfig, shapes: dict[str, tuple]) -> dict[str, object]:
    """Check stored {name: shape} against the model of ``cfg`` before any data is read.

    Names and shapes must match, except that the linear-attention and Medusa params a plain
    checkpoint lacks are allowed missing: they are returned with their initial values.
    """
    expected = param_shapes(cfg)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    defaults = new_param_defaults(cfg)
    if unexpected or not set(missing) <= set(defaults):
        raise CheckpointError(
            f"parameters do not match model.attention={cfg.attention!r} and the other fields of the config: "
            f"missing {[n for n in missing if n not in defaults][:5]}, unexpected {unexpected[:5]}"
        )
    for name, shape in shapes.items():
        if tuple(shape) != tuple(expected[name].shape):
            raise CheckpointError(f"parameter {name} has shape {tuple(shape)}, the config needs {expected[name].shape}")
    return {name: defaults[name] for name in missing}


def model_from_flat_params(cfg: ModelConfig, flat: dict[str, object]) -> LlamaModel:
    """Build the model of ``cfg`` holding ``flat`` (see check_param_shapes for what may differ)."""
    flat = {**check_param_shapes(cfg, {name: value.shape for name, value in flat.items()}), **flat}
    dtypes = {name: spec.dtype for name, spec in param_shapes(cfg).items()}
    model = abstract_model(cfg)
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(unflatten({name: jnp.asarray(value, dtypes[name]) for name, value in flat.items()}))
    nnx.update(model, state)
    return model


# --------------------------------------------------------------------------- atomic output


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; it becomes ``out`` only if the block succeeds.

    A crash or an error leaves ``out`` as it was (absent, or the previous complete version).
    """
    out = Path(out).absolute()  # orbax requires absolute paths
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} already exists and is not empty; choose another output or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# --------------------------------------------------------------------------- save / load


def write_model_dir(
    directory: Path,
    cfg: ModelConfig,
    flat: dict[str, object],
    tokenizer_dir: Path | None,
    tokenizer_files: dict[str, str] | None = None,
) -> None:
    """Write config.yaml, the orbax params and tokenizer files into an existing directory.

    Tokenizer files are copied from ``tokenizer_dir`` or written from ``tokenizer_files`` (name -> text).
    """
    (directory / CONFIG_FILE).write_text(yaml.safe_dump({"model": config_to_dict(cfg)}, sort_keys=False))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, {name: jnp.asarray(v) for name, v in flat.items()})
    checkpointer.wait_until_finished()
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, directory / name)
    for name, text in (tokenizer_files or {}).items():
        (directory / name).write_text(text, encoding="utf-8")


def save_model(model: LlamaModel, out: str | Path, *, tokenizer_dir: str | Path | None = None, overwrite=False):
    """Save ``model`` (config + params) as a lin_llm checkpoint directory, atomically."""
    with atomic_directory(out, overwrite) as tmp:
        write_model_dir(tmp, model.cfg, flat_params(model), Path(tokenizer_dir) if tokenizer_dir else None)


def read_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    values = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
    if not isinstance(values, dict) or not isinstance(values.get("model"), dict):
        raise CheckpointError(f"{path / CONFIG_FILE} has no 'model' section; is this a lin_llm checkpoint?")
    return model_config_from_dict(values["model"])


def _overridden(path: Path, cfg: ModelConfig, overrides: Sequence[str]) -> ModelConfig:
    """``cfg`` with model-config overrides (``attention=aug`` or ``model.attention=aug``)."""
    if not overrides:
        return cfg
    from lin_llm.config import config_from_dict

    prefixed = [item if item.startswith("model.") else f"model.{item}" for item in overrides]
    try:
        return config_from_dict({"model": config_to_dict(cfg)}, prefixed).model
    except ConfigError as err:
        raise CheckpointError(f"override of {path}'s config is invalid: {err}") from None


def _restore_flat(path: Path, cfg: ModelConfig) -> dict[str, jax.Array]:
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{path} has {CONFIG_FILE} but no {PARAMS_DIR}/ directory: the checkpoint is incomplete")
    stored = ocp.StandardCheckpointer().metadata(params_dir).item_metadata
    try:
        check_param_shapes(cfg, {name: meta.shape for name, meta in stored.items()})
    except CheckpointError as err:
        raise CheckpointError(f"{params_dir}: {err}") from None
    target = {name: jax.ShapeDtypeStruct(meta.shape, meta.dtype) for name, meta in stored.items()}
    return ocp.StandardCheckpointer().restore(params_dir, target)


def load_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> LlamaModel:
    """Load a lin_llm checkpoint directory or a Hugging Face LLaMA directory.

    ``overrides`` are model-config ``key=value`` items applied on top of the stored config,
    e.g. ``["compute_dtype=bfloat16"]``.
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if (path / CONFIG_FILE).is_file():
        cfg = _overridden(path, read_model_config(path), overrides)
        flat = _restore_flat(path, cfg)
    elif (path / "config.json").is_file():
        from lin_llm.convert import read_hf_checkpoint

        stored_cfg, flat = read_hf_checkpoint(path)
        cfg = _overridden(path, stored_cfg, overrides)
    else:
        raise CheckpointError(
            f"{path} is neither a lin_llm checkpoint ({CONFIG_FILE} + {PARAMS_DIR}/) "
            "nor a Hugging Face model directory (config.json + *.safetensors)"
        )
    return model_from_flat_params(cfg, flat)
