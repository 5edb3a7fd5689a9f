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

from lin_llm import data as data_lib
from lin_llm import sharding as shd
from lin_llm.config import Config, ModelConfig, TrainConfig, config_from_dict, config_to_dict, field_names
from lin_llm.errors import CheckpointError, TrainError
from lin_llm.io import checkpoint as ckpt
from lin_llm.io import checksums
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


DAMAGED_DIR = "damaged-checkpoints"  # beside checkpoints/: where a damaged step is moved (never deleted)


class CheckpointStore:
    """The run's checkpoints: save (with a sha256 of every array), and on --resume restore the
    newest intact one that fits the config, setting damaged newer ones aside."""

    def __init__(self, directory: Path, keep: int):
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, create=True,
            cleanup_tmp_directories=True,  # what a crash mid-save left behind
        )
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))

    def check_fresh(self, resume: bool) -> None:
        """Refuse to start over the checkpoints of another run unless resuming."""
        latest = self.manager.latest_step()
        if not resume and latest is not None:
            raise TrainError(
                f"{self.directory} already has checkpoints (latest step {latest}); pass --resume to continue "
                "that run, or choose another train.output_dir"
            )

    def resume(self, cfg: Config, data: dict, abstract: dict) -> dict | None:
        """The state in the newest intact checkpoint (None: there is none yet, start fresh).

        A checkpoint that cannot be read or whose arrays differ from their saved sha256 is damaged:
        when an older one is intact, the damaged ones are moved to output_dir/damaged-checkpoints and
        training resumes from it; when none is, nothing is moved and the run is refused. A config or
        data mismatch (TrainError) is refused at the newest readable checkpoint.
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as err:  # any failure to read it is damage
                damaged.append((step, _reason(err)))
                continue
            check_fits(meta, cfg, data, self.directory / str(step))
            try:
                state = self._restore_verified(step, abstract, meta)
            except Exception as err:  # a damaged array, a missing file
                damaged.append((step, _reason(err)))
                continue
            self._set_aside(damaged)
            metrics.log(f"resumed from {self.directory / str(step)} (step {step})")
            return state
        if damaged:
            raise TrainError(
                f"no intact checkpoint in {self.directory} to resume from: "
                + "; ".join(f"step {s}: {why}" for s, why in damaged)
                + ". Restore them from a good copy, or start again in another train.output_dir"
            )
        metrics.log(f"--resume: no checkpoint in {self.directory} yet; starting from step 0")
        return None

    def _restore_verified(self, step: int, abstract: dict, meta: dict) -> dict:
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        found = checksums.problems(checksums.leaves(state), meta["sha256"]) if "sha256" in meta else []
        if found:  # (checkpoints written before checksums restore unverified)
            raise CheckpointError("; ".join(found))
        return state

    def _set_aside(self, damaged: list[tuple[int, str]]) -> None:
        """Move each damaged step out of the manager's sight (process 0; the others wait)."""
        if not damaged:
            return
        aside = self.directory.parent / DAMAGED_DIR
        if metrics.is_main():
            aside.mkdir(exist_ok=True)
            for step, why in damaged:
                target = aside / str(step)
                n = 1
                while target.exists():
                    target, n = aside / f"{step}.{n}", n + 1
                (self.directory / str(step)).rename(target)
                metrics.log(f"checkpoint {self.directory / str(step)} is damaged ({why}); moved to {target}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("lin_llm: damaged checkpoints set aside")
        self.manager.reload()

    def save(self, step: int, state: dict, meta: dict, *, force: bool = False, wait: bool = False) -> None:
        meta = {**meta, "sha256": checksums.digests(checksums.leaves(state))}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=force)
        if wait:
            self.manager.wait_until_finished()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _reason(err: Exception) -> str:
    """The innermost cause of a restore error, in one line short enough for a message."""
    ckpt.drop_closed_loop_reports()  # the reads orbax abandoned report later, from tensorstore's threads
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).split(" See full TensorStore details")[0].strip()
    line = text.splitlines()[0][:300] if text else ""
    return line if isinstance(err, CheckpointError) else f"{type(err).__name__}: {line}"


def data_identity(t: TrainConfig, corpus) -> dict:
    """What a resumed run's data is compared by: its tokens' fingerprint; and for messages, the
    files train.data resolves to (absolute) or the hub dataset."""
    source = (f"train.dataset={t.dataset!r}" if t.dataset
              else "train.data=" + ", ".join(str(p.resolve()) for p in data_lib.resolve_files(t.data)))
    return {"fingerprint": corpus.fingerprint, "source": source}


def check_fits(meta: dict, cfg: Config, data: dict, where: Path) -> None:
    """Refuse to resume ``cfg`` from the checkpoint whose meta is ``meta``: another model, another
    value of a field the run's state or data order depends on, or other data. The data is compared
    by content (its tokens' fingerprint), not by how train.data is spelled: ./data/x and its
    absolute path are the same data."""
    stored, current = _normalized(meta["config"]), config_to_dict(cfg)
    resume_fields = [f for f in field_names(TrainConfig, "resume") if f != "data"]
    problems = _diff(stored["model"], current["model"], "model.")
    problems += _diff({k: stored["train"].get(k) for k in resume_fields},
                      {k: current["train"].get(k) for k in resume_fields}, "train.")
    if problems:
        raise TrainError(
            f"the checkpoint {where} was written with a different config: " + "; ".join(problems[:6])
            + ". Set these fields back to the checkpoint's values, or choose another train.output_dir"
        )
    if meta["data"]["fingerprint"] != data["fingerprint"]:
        before = meta["data"].get("source") or stored["train"].get("data")
        raise TrainError(
            f"the checkpoint {where} was trained on different data: {before}, now {data['source']} "
            f"(tokens fingerprint {meta['data']['fingerprint']}, now {data['fingerprint']}); resume with the "
            "same data and tokenizer, or choose another train.output_dir"
        )


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
