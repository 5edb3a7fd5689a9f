"""Training checkpoints (an orbax CheckpointManager in output_dir/checkpoints), the checks a
resumed run must pass, where a run's params start (train.init_from or a fresh init), and the
export of the trained model.

Each saved step holds all params, the optimizer state, the step, the data position and the
config. Orbax writes a step into a temporary directory and renames it when complete, so a crash
mid-save never leaves a checkpoint that restores.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lin_llm import sharding as shd
from lin_llm.config import Config, ModelConfig, TrainConfig, config_from_dict, config_to_dict, field_names
from lin_llm.errors import CheckpointError, TrainError
from lin_llm.io import checkpoint as ckpt
from lin_llm.io.atomic import atomic_directory
from lin_llm.io.load import load_checkpoint
from lin_llm.model import build_model, flat_params, param_shapes
from lin_llm.training import metrics


def _diff(a: dict, b: dict, prefix: str) -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(_diff(va, vb, f"{prefix}{key}."))
        elif va != vb:
            out.append(f"{prefix}{key}: checkpoint {va!r}, config {vb!r}")
    return out


def _normalized(stored: dict) -> dict:
    """A stored config dict read through today's dataclasses (fields added since get defaults)."""
    try:
        return config_to_dict(config_from_dict(stored))
    except Exception:
        return stored


class CheckpointStore:
    """The run's checkpoints: save, find the latest, check it fits the config, restore."""

    def __init__(self, directory: Path, keep: int):
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, create=True,
            cleanup_tmp_directories=True,  # what a crash mid-save left behind
        )
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))

    def resumable_step(self, cfg: Config, fingerprint: str, resume: bool) -> int | None:
        """The step to resume from (None: start fresh); refuses a mismatch or an unasked resume."""
        latest = self.manager.latest_step()
        if not resume:
            if latest is not None:
                raise TrainError(
                    f"{self.directory} already has checkpoints (latest step {latest}); pass --resume to continue "
                    "that run, or choose another train.output_dir"
                )
            return None
        if latest is None:
            metrics.log(f"--resume: no checkpoint in {self.directory} yet; starting from step 0")
            return None
        meta = self.manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        stored, current = _normalized(meta["config"]), config_to_dict(cfg)
        resume_fields = field_names(TrainConfig, "resume")
        problems = _diff(stored["model"], current["model"], "model.")
        problems += _diff({k: stored["train"].get(k) for k in resume_fields},
                          {k: current["train"].get(k) for k in resume_fields}, "train.")
        if problems:
            raise TrainError(
                f"the checkpoint in {self.directory} (step {latest}) was written with a different config: "
                + "; ".join(problems[:6])
                + ". Set these fields back to the checkpoint's values, or choose another train.output_dir"
            )
        if meta["data"]["fingerprint"] != fingerprint:
            raise TrainError(
                f"the checkpoint in {self.directory} was trained on different data (tokens fingerprint "
                f"{meta['data']['fingerprint']}, now {fingerprint}); resume with the same train.data "
                "and tokenizer, or choose another train.output_dir"
            )
        return latest

    def save(self, step: int, state: dict, meta: dict, *, force: bool = False, wait: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=force)
        if wait:
            self.manager.wait_until_finished()

    def restore(self, step: int, abstract: dict) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        metrics.log(f"resumed from {self.directory / str(step)} (step {step})")
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# --------------------------------------------------------------------------- where params start


def _check_init_config(t: TrainConfig, stored_cfg: ModelConfig, wanted_cfg: ModelConfig) -> None:
    changeable = field_names(ModelConfig, "linearize")
    stored = {k: v for k, v in config_to_dict(stored_cfg).items() if k not in changeable}
    wanted = {k: v for k, v in config_to_dict(wanted_cfg).items() if k not in changeable}
    problems = _diff(stored, wanted, "model.")
    if problems:
        raise TrainError(
            f"train.init_from={t.init_from!r} holds a different model: " + "; ".join(problems[:6])
            + ". Set these model fields to the checkpoint's values (only "
            + ", ".join(f"model.{n}" for n in changeable) + " may differ), or choose another checkpoint"
        )


def initial_params(cfg: Config, shardings: dict) -> dict:
    """Every model param on the mesh: from train.init_from (a lin_llm checkpoint restored straight
    into ``shardings``; a Hugging Face directory converted on the host), or freshly initialised."""
    t = cfg.train
    if not t.init_from:
        model_sh = {n: shardings[n] for n in param_shapes(cfg.model)}
        return jax.jit(lambda: flat_params(build_model(cfg.model, seed=t.seed)), out_shardings=model_sh)()
    path = Path(t.init_from).absolute()
    try:
        if ckpt.is_checkpoint(path):
            _check_init_config(t, ckpt.read_model_config(path), cfg.model)
            return ckpt.restore_params(path, cfg.model, shardings, lambda host, name: shd.place(host, shardings[name]))
        loaded = load_checkpoint(path)  # a Hugging Face directory, converted on the host
        _check_init_config(t, loaded.cfg, cfg.model)
        # a softmax checkpoint gains the linear-attention params at their initial values
        model = ckpt.model_from_flat_params(cfg.model, flat_params(loaded))
    except CheckpointError as err:
        raise TrainError(f"train.init_from={t.init_from!r}: {err}") from None
    return {n: shd.place(np.asarray(v), shardings[n]) for n, v in flat_params(model).items()}


# --------------------------------------------------------------------------- export


def export_model(cfg: Config, flat: dict, out: Path) -> Path:
    """A lin_llm checkpoint of the trained model (LoRA merged; init_from's tokenizer files copied
    along), gathered to host memory and written unsharded by process 0, so the directory loads on
    any device count; it appears atomically."""
    if jax.process_count() == 1:
        host = {n: np.asarray(jax.device_get(v)) for n, v in flat.items()}
    else:
        host = {n: np.asarray(multihost_utils.process_allgather(flat[n], tiled=True)) for n in sorted(flat)}
    if metrics.is_main():
        tokenizer_dir = Path(cfg.train.init_from) if cfg.train.init_from else None
        with atomic_directory(out, overwrite=True) as tmp:
            ckpt.write_model_dir(tmp, cfg.model, host, tokenizer_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lin_llm: model exported")
    return out
