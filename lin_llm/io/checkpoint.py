"""lin_llm model checkpoints: orbax params + a YAML model config (+ tokenizer files), atomic.

Layout of a lin_llm model checkpoint directory:
  config.yaml   {"model": {...}}: the ModelConfig the params belong to
  params/       orbax PyTree checkpoint of the flat {"layers.0.attn.wq.kernel": array, ...} dict
  checksums.json  the sha256 of each param's bytes (lin_llm/io/checksums.py), verified on restore
  tokenizer files copied from the directory it was converted from, if any
"""

from __future__ import annotations

import gc
import logging
import shutil
import sys
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from lin_llm.config import ModelConfig, config_to_dict, model_config_from_dict
from lin_llm.errors import CheckpointError, ConfigError
from lin_llm.io import checksums
from lin_llm.io.atomic import atomic_directory
from lin_llm.io.streaming import save_params
from lin_llm.model import LlamaModel, abstract_model, flat_params, new_param_defaults, param_shapes, unflatten

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",  # tokens added past a SentencePiece vocabulary (e.g. the released models' [PAD])
)


def copy_tokenizer_files(source: Path | None, directory: Path) -> None:
    """Copy the tokenizer files ``source`` has (if any) into ``directory``."""
    if source is None:
        return
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, directory / name)


def is_checkpoint(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


# --------------------------------------------------------------------------- params <-> model


def check_param_shapes(cfg: ModelConfig, shapes: Mapping[str, tuple]) -> dict[str, np.ndarray]:
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
            f"parameters do not match model.attention={cfg.attention!r}"
            + (f", model.softmax_layers={list(cfg.softmax_layers)}" if cfg.softmax_layers else "")
            + " and the other fields of the config: "
            f"missing {[n for n in missing if n not in defaults][:5]}, unexpected {unexpected[:5]}"
        )
    for name, shape in shapes.items():
        if tuple(shape) != tuple(expected[name].shape):
            raise CheckpointError(f"parameter {name} has shape {tuple(shape)}, the config needs {expected[name].shape}")
    return {name: defaults[name] for name in missing}


def model_from_flat_params(cfg: ModelConfig, flat: Mapping[str, object]) -> LlamaModel:
    """Build the model of ``cfg`` holding ``flat`` (see check_param_shapes for what may differ)."""
    flat = {**check_param_shapes(cfg, {name: value.shape for name, value in flat.items()}), **flat}
    dtypes = {name: spec.dtype for name, spec in param_shapes(cfg).items()}
    model = abstract_model(cfg)
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(unflatten({name: jnp.asarray(value, dtypes[name]) for name, value in flat.items()}))
    nnx.update(model, state)
    return model


# --------------------------------------------------------------------------- write


def write_model_dir(directory: Path, cfg: ModelConfig, flat: Mapping[str, object], tokenizer_dir: Path | None,
                    tokenizer_files: Mapping[str, str] | None = None) -> None:
    """Write config.yaml, the orbax params and tokenizer files into an existing directory.

    The params are written by this process alone from the arrays it is given (host arrays of
    the whole model, or LazyTensors produced and written one at a time), so the directory loads on
    any device count and any number of hosts.
    Tokenizer files are copied from ``tokenizer_dir`` or written from ``tokenizer_files`` (name -> text).
    """
    (directory / CONFIG_FILE).write_text(yaml.safe_dump({"model": config_to_dict(cfg)}, sort_keys=False))
    checksums.write_digests(directory, save_params(directory / PARAMS_DIR, flat))
    copy_tokenizer_files(tokenizer_dir, directory)
    for name, text in (tokenizer_files or {}).items():
        (directory / name).write_text(text, encoding="utf-8")


def save_model(model: LlamaModel, out: str | Path, *, tokenizer_dir: str | Path | None = None, overwrite=False):
    """Save ``model`` (config + params) as a lin_llm checkpoint directory, atomically."""
    with atomic_directory(out, overwrite) as tmp:
        host = {name: np.asarray(jax.device_get(v)) for name, v in flat_params(model).items()}
        write_model_dir(tmp, model.cfg, host, Path(tokenizer_dir) if tokenizer_dir else None)


# --------------------------------------------------------------------------- read


def read_model_config(path: Path) -> ModelConfig:
    try:
        values = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, OSError, ValueError) as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(f"{path / CONFIG_FILE} cannot be read as YAML ({detail}); restore it, or convert "
                              "or export the model again") from None
    if not isinstance(values, dict) or not isinstance(values.get("model"), dict):
        raise CheckpointError(f"{path / CONFIG_FILE} has no 'model' section; is this a lin_llm checkpoint?")
    try:
        return model_config_from_dict(values["model"])
    except ConfigError as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: {err}") from None


def restore_params(path: Path, cfg: ModelConfig, shardings: Mapping | None = None, place=None) -> dict[str, jax.Array]:
    """Every param of ``cfg``'s model from the lin_llm checkpoint at ``path``, in the config's
    param dtypes: the stored ones restored straight into ``shardings`` (when given; any saved
    topology), the ones a plain checkpoint lacks (linear attention's, Medusa heads') at their
    initial values, put on devices by ``place(host_array, name)``."""
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{path} has {CONFIG_FILE} but no {PARAMS_DIR}/ directory: the checkpoint is incomplete")
    stored = _read_orbax(params_dir, lambda: ocp.StandardCheckpointer().metadata(params_dir).item_metadata)
    if stored is None or not hasattr(stored, "items") or not stored:
        raise CheckpointError(f"{params_dir} lists no arrays (its _METADATA is missing or damaged): {DAMAGED}")
    try:
        defaults = check_param_shapes(cfg, {name: meta.shape for name, meta in stored.items()})
    except CheckpointError as err:
        raise CheckpointError(f"{params_dir}: {err}") from None
    target = {
        name: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=None if shardings is None else shardings[name])
        for name, meta in stored.items()
    }
    expected = checksums.read_file(path)
    restored = _read_orbax(params_dir, lambda: ocp.StandardCheckpointer().restore(params_dir, target))
    if expected is not None:
        checksums.verify(restored, expected, f"the checkpoint {path}")
    dtypes = {name: spec.dtype for name, spec in param_shapes(cfg).items()}
    flat = {name: v if v.dtype == dtypes[name] else v.astype(dtypes[name]) for name, v in restored.items()}
    place = place or (lambda host, name: jnp.asarray(host))
    flat.update({name: place(np.asarray(value, dtypes[name]), name) for name, value in defaults.items()})
    return flat


DAMAGED = "the checkpoint is damaged or incomplete; restore it from a copy, or convert or export the model again"


def _read_orbax(params_dir: Path, read):
    """``read()`` of orbax data in ``params_dir``; a failure means damaged files: a CheckpointError,
    without orbax's log noise and that of the reads it abandons."""
    quiet = [logging.getLogger(name) for name in ("asyncio", "absl")]  # orbax's warnings about what is missing
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        return read()
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as err:
        drop_closed_loop_reports()
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{params_dir} cannot be read ({type(err).__name__}: {detail}): {DAMAGED}") from None
    finally:
        gc.collect()  # the abandoned reads' futures report their errors when collected: while quiet
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def drop_closed_loop_reports() -> None:
    """The reads orbax abandoned finish later in tensorstore's threads and report "Event loop is
    closed" (their loop is gone) through sys.unraisablehook: drop those reports, pass on the rest."""
    previous = sys.unraisablehook
    if getattr(previous, "lin_llm_filter", False):
        return

    def hook(report):
        if not (isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed"):
            previous(report)

    hook.lin_llm_filter = True
    sys.unraisablehook = hook


def load_model_dir(path: Path, cfg: ModelConfig | None = None) -> LlamaModel:
    """The model in the lin_llm checkpoint at ``path``, built with ``cfg`` (default: its own config)."""
    cfg = cfg or read_model_config(path)
    return model_from_flat_params(cfg, restore_params(path, cfg))
