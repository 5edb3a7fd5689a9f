"""Sharded training: loss, train step, optimizer, evaluation, distillation, checkpoints, the loop.

``train(cfg, resume=...)`` is what train.py runs; everything it does is a function here.

- The model is split into a flat dict of params ({"layers.0.attn.wq.kernel": array, ...}).
  ``train.trainable`` (regex) picks the params that train; with ``train.lora_rank`` > 0 the
  ``train.lora_targets`` kernels stay frozen and train through LoRA factors (lin_llm.lora).
- Params, optimizer state and batches are placed on the (data, fsdp, tensor) mesh by the
  logical-axis rules of lin_llm.sharding; the step is one ``jax.jit`` with explicit
  in/out shardings that donates the old state. Gradient accumulation is a ``lax.scan`` over
  micro-batches inside the step; ``train.remat`` recomputes each block in the backward pass.
- Optimizer: AdamW (decay on matrices only) after global-norm clipping, with linear warm-up
  then cosine / constant / linear decay.
- Checkpoints: an orbax CheckpointManager in output_dir/checkpoints (async, keep-last-K, each
  step written to a temporary directory and renamed when complete, so a crash mid-save never
  leaves a checkpoint that restores). A checkpoint holds all params, the optimizer state, the
  step, the data position and the config; the batch of a step is a pure function of the step,
  so ``--resume`` reproduces the losses of an uninterrupted run.
- Optional attention-transfer distillation (LoLCATs) before fine-tuning: everything frozen
  but the new linear-attention params, trained so that each layer's attention output matches
  the softmax layer's (MSE) on the softmax model's own hidden states.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding

from lin_llm import data as data_lib
from lin_llm import lora as lora_lib
from lin_llm import sharding as shd
from lin_llm.checkpoint import flat_params, unflatten
from lin_llm.config import Config, ModelConfig, config_to_dict
from lin_llm.model import LlamaModel, abstract_model, build_model

F32 = jnp.float32
# Model fields a checkpoint may change when it is loaded with train.init_from: linearising a
# softmax checkpoint changes the attention, nothing that has weights.
LINEARIZE_FIELDS = ("attention", "attention_impl", "la", "compute_dtype", "medusa_heads")
# Train fields that must not change when resuming (they change the state or the data order).
RESUME_FIELDS = ("batch_size", "seq_len", "grad_accum", "seed", "trainable", "lora_rank", "lora_targets", "lora_alpha",
                 "data", "dataset", "dataset_config", "dataset_split", "text_field", "tokenizer", "val_fraction")


class TrainError(ValueError):
    """Something about the run's inputs must change before training can start."""


# --------------------------------------------------------------------------- model functions


def hidden_states(model: LlamaModel, ids, mesh=None, remat: bool = False):
    """The last block's output [B, T, dim]: the model's own blocks, with activation sharding
    constraints between them and optional rematerialisation of each block."""
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = model.embed(ids)
    for block in model.layers:
        if remat:
            graphdef, state = nnx.split(block)
            x = jax.checkpoint(lambda st, h, p: nnx.merge(graphdef, st)(h, p))(state, x, positions)
        else:
            x = block(x, positions)
        if mesh is not None:
            x = shd.constrain(x, mesh, "batch", "length", "act_embed")
    return x


def output_logits(model: LlamaModel, x):
    """fp32 logits from the last hidden state (final norm, then lm_head or the tied embedding)."""
    x = model.norm(x)
    if model.lm_head is not None:
        return model.lm_head(x).astype(F32)
    emb = model.embed.embedding[...].astype(x.dtype)
    return jnp.einsum("btd,vd->btv", x, emb, preferred_element_type=F32)


def model_logits(model: LlamaModel, ids, mesh=None, remat: bool = False):
    """= model(ids), with sharding constraints and remat (tests check the two agree)."""
    logits = output_logits(model, hidden_states(model, ids, mesh, remat))
    if mesh is not None:
        logits = shd.constrain(logits, mesh, "batch", "length", "act_vocab")
    return logits


def new_attention_params(cfg: ModelConfig) -> list[str]:
    """Names of the params that linear attention adds to the softmax model of the same shape."""
    softmax = dataclasses.replace(cfg, attention="softmax")
    return sorted(set(flat_params(abstract_model(cfg))) - set(flat_params(abstract_model(softmax))))


def cross_entropy(logits, targets):
    """Mean next-token loss (all positions are real tokens: sequences are packed)."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(F32), targets))


# --------------------------------------------------------------------------- optimizer


def lr_schedule(t) -> Callable:
    """Linear warm-up to learning_rate over warmup_steps, then cosine / constant / linear decay
    to learning_rate * min_lr_ratio at train.steps."""
    peak, warm, total = t.learning_rate, t.warmup_steps, t.steps
    floor = peak * t.min_lr_ratio

    def schedule(step):
        step = jnp.asarray(step, F32)
        warmup = peak * jnp.minimum(1.0, (step + 1) / max(warm, 1)) if warm else peak
        frac = jnp.clip((step - warm) / max(total - warm, 1), 0.0, 1.0)
        if t.lr_schedule == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        elif t.lr_schedule == "linear":
            decayed = peak + (floor - peak) * frac
        else:
            decayed = jnp.asarray(peak, F32)
        return jnp.where(step < warm, warmup, decayed)

    return schedule


def _decays(name: str, ndim: int) -> bool:
    return ndim >= 2 and (name.endswith(("kernel", "embedding")) or lora_lib.is_lora(name))


def make_optimizer(t, schedule, params_like: dict) -> optax.GradientTransformation:
    mask = {name: _decays(name, len(x.shape)) for name, x in params_like.items()}
    parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay, mask=mask))
    return optax.chain(*parts)


def opt_state_shardings(abstract_opt, param_sh: dict, param_shapes: dict, mesh) -> object:
    """Each param-shaped leaf of the optimizer state (Adam's mu, nu) shards like its param."""
    repl = shd.replicated(mesh)

    def place(path, leaf):
        for key in reversed(path):
            name = getattr(key, "key", None)
            if isinstance(name, str) and name in param_sh:
                return param_sh[name] if tuple(leaf.shape) == tuple(param_shapes[name]) else repl
        return repl

    return jax.tree_util.tree_map_with_path(place, abstract_opt)


# --------------------------------------------------------------------------- the steps

# Train fields the compiled step depends on (with the model config and the mesh).
STEP_FIELDS = ("steps", "objective", "batch_size", "seq_len", "grad_accum", "learning_rate", "lr_schedule",
               "warmup_steps", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "remat", "trainable",
               "lora_rank", "lora_alpha", "lora_targets")
_STEPS: dict = {}


def effective_params(params: dict, frozen: dict, t) -> dict:
    """All model params from the trained and frozen ones, LoRA targets as W + alpha/r A B."""
    flat = {**frozen, **{n: v for n, v in params.items() if not lora_lib.is_lora(n)}}
    factors = {n: v for n, v in params.items() if lora_lib.is_lora(n)}
    return lora_lib.merge(flat, factors, t.lora_alpha, t.lora_rank) if factors else flat


def merged_model(graphdef, params: dict, frozen: dict, t, replicated) -> LlamaModel:
    flat = effective_params(params, frozen, t)
    if "embed.embedding" in flat:  # FSDP: gather the table before the lookup (a gather from a
        # column-sharded table would otherwise be resharded to the batch layout the slow way)
        flat["embed.embedding"] = jax.lax.with_sharding_constraint(flat["embed.embedding"], replicated)
    return nnx.merge(graphdef, unflatten(flat))


def build_steps(graphdef, tx, schedule, t, mesh, state_sh, train_sh, frozen_sh, batch_sh, eval_sh):
    """(train_step, eval_step), jitted with explicit shardings; the train step donates the state.

    train_step(state, frozen, batch [accum, micro, T + 1]) -> (state, {loss, grad_norm, lr});
    eval_step(params, frozen, tokens [micro, T + 1]) -> mean loss.
    """
    replicated = shd.replicated(mesh)

    def loss_fn(params, frozen, tokens):
        model = merged_model(graphdef, params, frozen, t, replicated)
        tokens = shd.constrain(tokens, mesh, "batch", "length")
        loss = 0.0
        if t.objective in ("lm", "lm+medusa"):
            loss = cross_entropy(model_logits(model, tokens[:, :-1], mesh, t.remat), tokens[:, 1:])
        if t.objective in ("medusa", "lm+medusa"):
            from lin_llm.medusa import medusa_loss  # head i at t predicts t + i + 2

            loss = loss + medusa_loss(model, tokens[:, :-1])
        return loss

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state, frozen, batch):
        params = state["params"]
        if t.grad_accum == 1:
            loss, grads = grad_fn(params, frozen, batch[0])
        else:
            def micro_step(carry, tokens):
                loss, grads = grad_fn(params, frozen, tokens)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), F32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(micro_step, zeros, batch)
            loss, grads = jax.tree.map(lambda x: x / t.grad_accum, (loss, grads))
        updates, opt = tx.update(grads, state["opt"], params)
        new = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt": opt}
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"])}
        return new, metrics

    train = jax.jit(train_step, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, replicated),
                    donate_argnums=(0,))
    evaluate = jax.jit(loss_fn, in_shardings=(train_sh, frozen_sh, eval_sh), out_shardings=replicated)
    return train, evaluate


# --------------------------------------------------------------------------- metrics


class MetricsWriter:
    """JSON lines in output_dir/metrics.jsonl (and TensorBoard when tensorboardX or
    tensorboard is installed; neither is a dependency).

    ``start_step`` is the step training starts from (the restored one on --resume): records of
    later steps, left by a run that went on past its last checkpoint and crashed, are dropped
    first, so replayed steps are not logged twice (nor a half-written last line kept).
    """

    FILE = "metrics.jsonl"

    def __init__(self, output_dir: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        path = output_dir / self.FILE
        if path.exists():
            truncate_metrics(path, start_step)
        self.file = open(path, "a")
        self.tb = _tensorboard_writer(output_dir / "tensorboard", start_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _tensorboard_writer(log_dir: Path, start_step: int):
    """A SummaryWriter from tensorboardX, else torch's (only when the tensorboard package is
    there: importing torch just to find it missing costs seconds), else None. Like the JSON
    lines, events after start_step (steps about to be replayed) are purged."""
    try:
        from tensorboardX import SummaryWriter  # type: ignore
    except ImportError:
        if importlib.util.find_spec("tensorboard") is None or importlib.util.find_spec("torch") is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter  # type: ignore
        except Exception:  # a broken torch / tensorboard install must not stop training
            return None
    return SummaryWriter(str(log_dir), purge_step=start_step + 1)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records of ``path`` up to ``last_step`` (dropping unparseable lines), rewritten
    atomically: a crash here leaves the old file or the new one, never a mix."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # the last line of a run killed mid-write
            continue
        step = record.get("step", record.get("summary", {}).get("steps", 0)) if isinstance(record, dict) else None
        if isinstance(step, int) and step <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class TrainResult:
    start_step: int
    end_step: int
    losses: dict[int, float]  # step -> training loss of that step (1-based: loss of the update to `step`)
    val: dict[int, float]  # step -> validation loss
    tokens_per_s: float
    interrupted: bool
    output_dir: Path
    model_dir: Path | None

    @property
    def final_val_loss(self) -> float:
        return self.val[max(self.val)] if self.val else float("nan")

    @property
    def final_val_ppl(self) -> float:
        return math.exp(min(self.final_val_loss, 50.0))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


# --------------------------------------------------------------------------- the trainer


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
    from lin_llm.config import config_from_dict

    try:
        return config_to_dict(config_from_dict(stored))
    except Exception:
        return stored


def _is_main() -> bool:
    return jax.process_index() == 0


def _log(msg: str) -> None:
    if _is_main():
        print(msg, flush=True)


class Trainer:
    """One training run of ``cfg``. Construction does every check (data, mesh, batch,
    checkpoint compatibility) before any training step."""

    def __init__(self, cfg: Config, *, resume: bool = False, progress: bool = True, devices=None):
        self.cfg = cfg
        t = cfg.train
        self.progress = progress
        self.mesh = shd.make_mesh(cfg.mesh, devices)
        self.micro = t.batch_size // t.grad_accum
        shd.check_batch(self.mesh, self.micro)
        self.output_dir = Path(t.output_dir).absolute()  # orbax needs absolute paths
        self.ckpt_dir = self.output_dir / "checkpoints"

        # data first: a missing or empty corpus stops before any model is built
        self.corpus, self.tokenizer = data_lib.load_corpus(t, cfg.model, self.output_dir / "cache")
        # evaluated in micro-batches, over val_batches full batches: grad_accum does not change the set
        self.val_data = data_lib.val_batches(self.corpus, self.micro, t.val_batches * t.grad_accum)

        self.mngr = None
        latest = self._existing_checkpoint(resume)
        self.resuming = latest is not None

        # params: names, shapes and the split into what trains and what does not
        shapes = {n: s.shape for n, s in flat_params(abstract_model(cfg.model)).items()}
        dtypes = {n: s.dtype for n, s in flat_params(abstract_model(cfg.model)).items()}
        self.lora_names = lora_lib.targets(shapes, t.lora_targets, t.lora_rank)
        self.trainable_names = [n for n in sorted(shapes) if re.search(t.trainable, n) and n not in self.lora_names]
        self.frozen_names = [n for n in sorted(shapes) if n not in self.trainable_names]
        if t.lora_rank and not self.lora_names:
            raise TrainError(f"train.lora_targets={t.lora_targets!r} matches no parameter; e.g. {sorted(shapes)[:4]}")
        if not self.trainable_names and not self.lora_names:
            raise TrainError(
                f"train.trainable={t.trainable!r} matches no parameter and LoRA is off; parameter paths look like "
                f"{', '.join(sorted(shapes)[:3])}"
            )
        lora_shapes = {}
        for name in self.lora_names:
            d_in, d_out = shapes[name]
            lora_shapes[f"{name}:lora_a"] = (d_in, t.lora_rank)
            lora_shapes[f"{name}:lora_b"] = (t.lora_rank, d_out)
        self.shapes = {**shapes, **lora_shapes}
        self.dtypes = {**dtypes, **{n: jnp.dtype(F32) for n in lora_shapes}}
        train_names = self.trainable_names + sorted(lora_shapes)
        self.param_sh = {n: shd.param_sharding(self.mesh, n, self.shapes[n]) for n in self.shapes}
        self.train_sh = {n: self.param_sh[n] for n in train_names}
        self.frozen_sh = {n: self.param_sh[n] for n in self.frozen_names}
        self.repl = shd.replicated(self.mesh)
        self.graphdef = nnx.split(abstract_model(cfg.model))[0]

        self.schedule = lr_schedule(t)
        abstract_train = {n: jax.ShapeDtypeStruct(self.shapes[n], self.dtypes[n]) for n in train_names}
        self.tx = make_optimizer(t, self.schedule, abstract_train)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_train)
        self.opt_sh = opt_state_shardings(abstract_opt, self.train_sh, self.shapes, self.mesh)
        self.state_sh = {"step": self.repl, "params": self.train_sh, "opt": self.opt_sh}
        self.batch_sh = shd.batch_sharding(self.mesh, ndim=2, leading=1)
        self.eval_sh = shd.batch_sharding(self.mesh, ndim=2)
        self._train_rows = self._local_rows(self.batch_sh, (t.grad_accum, self.micro, t.seq_len + 1), axis=1)
        self._eval_rows = self._local_rows(self.eval_sh, (self.micro, t.seq_len + 1), axis=0)
        self._build_steps()

        if self.resuming:
            self.state, self.frozen = self._restore(latest)
        else:
            flat = self._initial_params()
            if t.distill_steps:
                flat = self.distill(flat)
            self.state, self.frozen = self._fresh_state(flat)

    # ------------------------------------------------------------------ setup helpers

    def _manager(self, create: bool) -> ocp.CheckpointManager:
        if self.mngr is None:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.cfg.train.keep_checkpoints, enable_async_checkpointing=True, create=create,
                cleanup_tmp_directories=True,  # what a crash mid-save left behind
            )
            self.mngr = ocp.CheckpointManager(self.ckpt_dir, options=options, item_names=("state", "meta"))
        return self.mngr

    def _existing_checkpoint(self, resume: bool) -> int | None:
        latest = self._manager(create=True).latest_step()
        if not resume:
            if latest is not None:
                raise TrainError(
                    f"{self.ckpt_dir} already has checkpoints (latest step {latest}); pass --resume to continue "
                    "that run, or choose another train.output_dir"
                )
            return None
        if latest is None:
            _log(f"--resume: no checkpoint in {self.ckpt_dir} yet; starting from step 0")
            return None
        meta = self.mngr.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        stored = _normalized(meta["config"])
        current = config_to_dict(self.cfg)
        problems = _diff(stored["model"], current["model"], "model.")
        problems += _diff({k: stored["train"].get(k) for k in RESUME_FIELDS},
                          {k: current["train"].get(k) for k in RESUME_FIELDS}, "train.")
        if problems:
            raise TrainError(
                f"the checkpoint in {self.ckpt_dir} (step {latest}) was written with a different config: "
                + "; ".join(problems[:6])
                + ". Set these fields back to the checkpoint's values, or choose another train.output_dir"
            )
        if meta["data"]["fingerprint"] != self.corpus.fingerprint:
            raise TrainError(
                f"the checkpoint in {self.ckpt_dir} was trained on different data (tokens fingerprint "
                f"{meta['data']['fingerprint']}, now {self.corpus.fingerprint}); resume with the same train.data "
                "and tokenizer, or choose another train.output_dir"
            )
        return latest

    def _initial_params(self) -> dict:
        """Host (or device) arrays of every model param: train.init_from, or a fresh init."""
        cfg, t = self.cfg, self.cfg.train
        if not t.init_from:
            model_sh = {n: self.param_sh[n] for n in self.frozen_names + self.trainable_names}
            init = jax.jit(lambda: flat_params(build_model(cfg.model, seed=t.seed)), out_shardings=model_sh)
            return init()
        from lin_llm import checkpoint as ckpt

        path = Path(t.init_from).absolute()
        try:
            if (path / ckpt.CONFIG_FILE).is_file() and (path / ckpt.PARAMS_DIR).is_dir():
                self._check_init_config(ckpt.read_model_config(path))
                return self._restore_model_dir(path)
            loaded = ckpt.load_checkpoint(path)  # a Hugging Face directory, converted on the host
            self._check_init_config(loaded.cfg)
            # a softmax checkpoint gains the linear-attention params at their initial values
            model = ckpt.model_from_flat_params(cfg.model, flat_params(loaded))
        except ckpt.CheckpointError as err:
            raise TrainError(f"train.init_from={t.init_from!r}: {err}") from None
        return {n: self._place(np.asarray(v), self.param_sh[n]) for n, v in flat_params(model).items()}

    def _check_init_config(self, stored_cfg: ModelConfig) -> None:
        t = self.cfg.train
        stored = {k: v for k, v in config_to_dict(stored_cfg).items() if k not in LINEARIZE_FIELDS}
        wanted = {k: v for k, v in config_to_dict(self.cfg.model).items() if k not in LINEARIZE_FIELDS}
        problems = _diff(stored, wanted, "model.")
        if problems:
            raise TrainError(
                f"train.init_from={t.init_from!r} holds a different model: " + "; ".join(problems[:6])
                + ". Set these model fields to the checkpoint's values (only model.attention, model.la.*, "
                "model.attention_impl, model.compute_dtype and model.medusa_heads may differ), or choose "
                "another checkpoint"
            )

    def _restore_model_dir(self, path: Path) -> dict:
        """A lin_llm model directory restored straight into the mesh's shardings (no host copy of
        the whole model, any saved topology); params it lacks take their initial values."""
        from lin_llm import checkpoint as ckpt

        params_dir = path / ckpt.PARAMS_DIR
        stored = ocp.StandardCheckpointer().metadata(params_dir).item_metadata
        defaults = ckpt.check_param_shapes(self.cfg.model, {n: m.shape for n, m in stored.items()})
        target = {n: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=self.param_sh[n]) for n, m in stored.items()}
        restored = ocp.StandardCheckpointer().restore(params_dir, target)
        flat = {n: v.astype(self.dtypes[n]) if v.dtype != self.dtypes[n] else v for n, v in restored.items()}
        for name, value in defaults.items():
            flat[name] = self._place(np.asarray(value, self.dtypes[name]), self.param_sh[name])
        return flat

    @staticmethod
    def _place(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def _fresh_state(self, flat: dict):
        t = self.cfg.train
        params = {n: flat[n] for n in self.trainable_names}
        if self.lora_names:
            init = jax.jit(
                lambda: lora_lib.init(jax.random.key(t.seed + 1), {n: self.shapes[n] for n in self.lora_names}, t.lora_rank),
                out_shardings={n: self.train_sh[n] for n in self.train_sh if lora_lib.is_lora(n)},
            )
            params.update(init())
        opt = jax.jit(self.tx.init, out_shardings=self.opt_sh)(params)
        state = {"step": jax.device_put(jnp.zeros((), jnp.int32), self.repl), "params": params, "opt": opt}
        frozen = {n: flat[n] for n in self.frozen_names}
        return state, frozen

    @staticmethod
    def _local_rows(sharding: NamedSharding, shape: tuple, axis: int) -> np.ndarray:
        """Rows (along ``axis``) of a global batch that this process's devices hold, in order."""
        spans = sorted({(s[axis].start or 0, s[axis].stop or shape[axis])
                        for s in sharding.addressable_devices_indices_map(shape).values()})
        return np.concatenate([np.arange(a, b) for a, b in spans])

    # ------------------------------------------------------------------ the jitted functions

    def effective_params(self, params: dict, frozen: dict) -> dict:
        """All model params, with the LoRA targets as W + scale A B."""
        return effective_params(params, frozen, self.cfg.train)

    def _model(self, params, frozen) -> LlamaModel:
        return merged_model(self.graphdef, params, frozen, self.cfg.train, self.repl)

    def _build_steps(self):
        """The jitted train and eval steps; reused by later Trainers of the same model, step
        config and mesh in this process (a resumed run does not compile again)."""
        t = self.cfg.train
        key = (self.cfg.model, tuple(getattr(t, f) for f in STEP_FIELDS), tuple(self.mesh.shape.items()),
               tuple(d.id for d in self.mesh.devices.flat))
        if key not in _STEPS:
            if len(_STEPS) >= 4:
                _STEPS.pop(next(iter(_STEPS)))
            _STEPS[key] = build_steps(self.graphdef, self.tx, self.schedule, t, self.mesh, self.state_sh,
                                      self.train_sh, self.frozen_sh, self.batch_sh, self.eval_sh)
        self.train_step, self.eval_step = _STEPS[key]

    # ------------------------------------------------------------------ batches

    def train_batch(self, step: int) -> jax.Array:
        t = self.cfg.train
        idx = data_lib.train_indices(step, t.batch_size, self.corpus.n_train, t.seed).reshape(t.grad_accum, self.micro)
        local = data_lib.sequences(self.corpus.train, idx[:, self._train_rows].reshape(-1), t.seq_len)
        local = local.reshape(t.grad_accum, len(self._train_rows), t.seq_len + 1)
        return jax.make_array_from_process_local_data(self.batch_sh, local, (t.grad_accum, self.micro, t.seq_len + 1))

    def _eval_batch(self, batch: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(self.eval_sh, batch[self._eval_rows], batch.shape)

    def evaluate(self) -> float:
        """Mean validation loss over train.val_batches batches (the same ones every time)."""
        losses = [self.eval_step(self.state["params"], self.frozen, self._eval_batch(b)) for b in self.val_data]
        return float(np.mean(jax.device_get(losses)))

    # ------------------------------------------------------------------ distillation

    def distill(self, flat: dict) -> dict:
        """Attention transfer: train only the new linear-attention params (or
        train.distill_trainable) so each layer's attention output matches softmax attention's."""
        cfg, t = self.cfg, self.cfg.train
        pattern = t.distill_trainable
        names = [n for n in sorted(flat) if re.search(pattern, n)] if pattern else new_attention_params(cfg.model)
        if not names:
            raise TrainError(
                f"distillation has nothing to train: model.attention={cfg.model.attention!r} adds no parameters "
                "(set train.distill_trainable to a regex of params to train, or train.distill_steps=0)"
            )
        teacher_cfg = dataclasses.replace(cfg.model, attention="softmax")
        teacher_def = nnx.split(abstract_model(teacher_cfg))[0]
        teacher_names = set(flat_params(abstract_model(teacher_cfg)))
        student_def, mesh = self.graphdef, self.mesh
        d_sh = {n: self.param_sh[n] for n in names}
        o_sh = {n: self.param_sh[n] for n in flat if n not in d_sh}

        def loss_fn(dparams, others, tokens):
            all_params = {**others, **dparams}
            student = nnx.merge(student_def, unflatten(all_params))
            teacher = nnx.merge(teacher_def, unflatten({n: all_params[n] for n in teacher_names}))
            ids = shd.constrain(tokens[:, :-1], mesh, "batch", "length")
            b, s = ids.shape
            positions = jnp.broadcast_to(jnp.arange(s), (b, s))
            x = teacher.embed(ids)
            total = 0.0
            for sb, tb in zip(student.layers, teacher.layers):
                a = tb.attn_norm(x)
                teacher_out = jax.lax.stop_gradient(tb.attn(a, positions))
                y_t = teacher_out.astype(F32)
                y_s = sb.attn(a, positions).astype(F32)
                total = total + jnp.mean(jnp.square(y_s - y_t)) / jnp.maximum(jnp.mean(jnp.square(y_t)), 1e-12)
                h = x + teacher_out
                x = shd.constrain(h + tb.mlp(tb.mlp_norm(h)), mesh, "batch", "length", "act_embed")
            return total / len(student.layers)

        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(t.distill_learning_rate))
        dparams = {n: flat[n] for n in names}
        others = {n: flat[n] for n in flat if n not in d_sh}
        opt_sh = opt_state_shardings(jax.eval_shape(tx.init, dparams), d_sh, self.shapes, mesh)
        opt = jax.jit(tx.init, out_shardings=opt_sh)(dparams)

        def step(dparams, opt, others, tokens):
            loss, grads = jax.value_and_grad(loss_fn)(dparams, others, tokens)
            updates, opt = tx.update(grads, opt, dparams)
            return optax.apply_updates(dparams, updates), opt, loss

        step = jax.jit(step, in_shardings=(d_sh, opt_sh, o_sh, self.eval_sh), out_shardings=(d_sh, opt_sh, self.repl),
                       donate_argnums=(0, 1))
        bar = _bar(range(t.distill_steps), "distill", self.progress)
        loss = None
        self.distill_losses = []
        for i in bar:
            # a data stream of its own (seed + 1), so fine-tuning's batches are those of a run without it
            idx = data_lib.train_indices(i, self.micro, self.corpus.n_train, t.seed + 1)
            tokens = data_lib.sequences(self.corpus.train, idx, t.seq_len)
            dparams, opt, loss = step(dparams, opt, others, self._eval_batch(tokens))
            self.distill_losses.append(loss)
            if _is_main() and hasattr(bar, "set_postfix") and (i % t.log_every == 0 or i == t.distill_steps - 1):
                bar.set_postfix(mse=f"{float(loss):.4f}")
        self.distill_losses = [float(x) for x in jax.device_get(self.distill_losses)]
        if loss is not None:
            _log(f"distillation: {t.distill_steps} steps, final relative attention MSE {float(loss):.4f}")
        return {**others, **dparams}

    # ------------------------------------------------------------------ checkpoints

    def _meta(self, step: int) -> dict:
        t = self.cfg.train
        return {
            "step": step,
            "config": config_to_dict(self.cfg),
            "data": {
                "fingerprint": self.corpus.fingerprint,
                "n_train_sequences": self.corpus.n_train,
                "sequences_consumed": step * t.batch_size,
                "epoch": step * t.batch_size // self.corpus.n_train,
            },
            "trainable": self.trainable_names,
            "lora": self.lora_names,
        }

    def save(self, step: int, *, force: bool = False, wait: bool = False) -> None:
        state = {**self.state, "frozen": self.frozen}
        self.mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self._meta(step))),
            force=force,
        )
        if wait:
            self.mngr.wait_until_finished()

    def _restore(self, step: int):
        abstract = {
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=self.repl),
            "params": {n: jax.ShapeDtypeStruct(self.shapes[n], self.dtypes[n], sharding=s) for n, s in self.train_sh.items()},
            "opt": jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                jax.eval_shape(self.tx.init, {n: jax.ShapeDtypeStruct(self.shapes[n], self.dtypes[n]) for n in self.train_sh}),
                self.opt_sh,
            ),
            "frozen": {n: jax.ShapeDtypeStruct(self.shapes[n], self.dtypes[n], sharding=s) for n, s in self.frozen_sh.items()},
        }
        restored = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        frozen = restored.pop("frozen")
        _log(f"resumed from {self.ckpt_dir / str(step)} (step {step})")
        return restored, frozen

    # ------------------------------------------------------------------ export

    def final_model(self) -> LlamaModel:
        """The trained model (LoRA merged), as a plain LlamaModel on the mesh."""
        return self._model(self.state["params"], self.frozen)

    def export(self, out: Path) -> Path:
        """A lin_llm checkpoint of the trained model (LoRA merged; tokenizer files copied along).

        The params are gathered to host memory and written unsharded by process 0 only, so the
        directory loads on any device count; it appears atomically (checkpoint.atomic_directory).
        """
        from lin_llm.checkpoint import CONFIG_FILE, PARAMS_DIR, TOKENIZER_FILES, atomic_directory

        flat = flat_params(self.final_model())
        if jax.process_count() == 1:
            host = {n: np.asarray(jax.device_get(v)) for n, v in flat.items()}
        else:
            from jax.experimental import multihost_utils

            host = {n: np.asarray(multihost_utils.process_allgather(flat[n], tiled=True)) for n in sorted(flat)}
        if _is_main():
            tokenizer_dir = Path(self.cfg.train.init_from) if self.cfg.train.init_from else None
            options = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
            with atomic_directory(out, overwrite=True) as tmp:
                (tmp / CONFIG_FILE).write_text(
                    __import__("yaml").safe_dump({"model": config_to_dict(self.cfg.model)}, sort_keys=False))
                checkpointer = ocp.StandardCheckpointer(multiprocessing_options=options)
                checkpointer.save(tmp / PARAMS_DIR, host)
                checkpointer.wait_until_finished()
                for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
                    if (tokenizer_dir / name).is_file():
                        shutil.copy2(tokenizer_dir / name, tmp / name)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("lin_llm: model exported")
        return out

    # ------------------------------------------------------------------ the loop

    def run(self, until: int | None = None) -> TrainResult:
        """Train to train.steps, or stop after step ``until`` (saving a checkpoint there, as
        Ctrl-C does), and return the losses."""
        cfg, t = self.cfg, self.cfg.train
        start = int(jax.device_get(self.state["step"]))
        stop_at = t.steps if until is None else min(until, t.steps)
        if _is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(
                __import__("yaml").safe_dump(config_to_dict(cfg), sort_keys=False))
        writer = MetricsWriter(self.output_dir, _is_main(), start)
        n_params = sum(math.prod(s) for s in self.shapes.values())
        n_train = sum(math.prod(self.shapes[n]) for n in self.train_sh)
        _log(
            f"mesh {dict(self.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices "
            f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''}); model "
            f"{cfg.model.attention} {n_params / 1e6:.2f}M params, training {n_train / 1e6:.3f}M; data "
            f"{self.corpus.source}: {len(self.corpus.train)} train / {len(self.corpus.val)} val tokens"
        )
        stop = _StopFlag()
        losses: dict[int, float] = {}
        val: dict[int, float] = {}
        pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet fetched
        tokens_per_step = t.batch_size * t.seq_len
        clock: list = []  # (time, step) once the first (compiling) step has finished
        tok_s = float("nan")
        bar = _bar(range(start, t.steps), "train", self.progress, total=t.steps, initial=start)

        def flush():
            nonlocal tok_s
            if not pending:
                return
            fetched = jax.device_get(pending)
            last_step = fetched[-1][0]
            if clock and last_step > clock[0][1]:
                tok_s = (last_step - clock[0][1]) * tokens_per_step / (time.perf_counter() - clock[0][0])
            for s, m in fetched:
                losses[s] = float(m["loss"])
                writer.write({"step": s, "loss": losses[s], "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                              "tokens_per_s": tok_s})
            pending.clear()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[last_step]:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)

        with stop:
            try:
                for step in bar:
                    self.state, metrics = self.train_step(self.state, self.frozen, self.train_batch(step))
                    done = step + 1
                    pending.append((done, metrics))
                    if not clock:
                        jax.block_until_ready(metrics)
                        clock.append((time.perf_counter(), done))
                    last = done == t.steps
                    if done % t.log_every == 0 or last or stop.requested:
                        flush()
                    if (t.eval_every and done % t.eval_every == 0) or last:
                        val[done] = self.evaluate()
                        writer.write({"step": done, "val_loss": val[done], "val_ppl": perplexity(val[done])})
                        message = f"step {done}: val loss {val[done]:.4f}, ppl {perplexity(val[done]):.3f}"
                        if _is_main() and hasattr(bar, "write"):
                            bar.write(message)
                        else:
                            _log(message)
                    if (t.save_every and done % t.save_every == 0) or last:
                        self.save(done, force=True)
                    if stop.requested or (done == stop_at and stop_at < t.steps):
                        if hasattr(bar, "update"):
                            bar.update(1)  # the bar counts an iteration when the next one starts
                        break
                flush()
            finally:
                if hasattr(bar, "close"):
                    bar.close()
        end = int(jax.device_get(self.state["step"]))
        if not val and end == t.steps:  # resumed a finished run: report it all the same
            val[end] = self.evaluate()
        if end < t.steps:
            if not (t.save_every and end % t.save_every == 0):
                self.save(end, force=True)
            self.mngr.wait_until_finished()
            why = "interrupted" if stop.requested else "stopped"
            _log(f"{why} at step {end}: checkpoint saved in {self.ckpt_dir}; continue with --resume")
        self.mngr.wait_until_finished()
        model_dir = None
        if end == t.steps and t.export_model:
            model_dir = self.export(self.output_dir / "model")
        result = TrainResult(start, end, losses, val, tok_s, stop.requested and end < t.steps, self.output_dir, model_dir)
        if val:
            summary = {"steps": end, "val_loss": round(result.final_val_loss, 5), "val_ppl": round(result.final_val_ppl, 4),
                       "tokens_per_s": round(tok_s, 1), "attention": cfg.model.attention}
            writer.write({"summary": summary})
            _log("summary: " + " ".join(f"{k}={v}" for k, v in summary.items()))
        writer.close()
        return result

    def close(self):
        if self.mngr is not None:
            self.mngr.wait_until_finished()
            self.mngr.close()


class _StopFlag:
    """The first Ctrl-C asks the loop to stop after the current step (it then saves); a second
    one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        _log("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _bar(iterable, desc: str, enabled: bool, **kwargs):
    if not enabled or not _is_main():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="step", dynamic_ncols=True, **kwargs)


# --------------------------------------------------------------------------- entry points


def train(cfg: Config, *, resume: bool = False, progress: bool = True, devices=None) -> TrainResult:
    """Run ``cfg`` to train.steps (or until Ctrl-C). Multi-host set-up happens here first."""
    shd.maybe_initialize_distributed(cfg.mesh)
    trainer = Trainer(cfg, resume=resume, progress=progress, devices=devices)
    try:
        return trainer.run()
    finally:
        trainer.close()


def evaluate_model(model: LlamaModel, batches: list[np.ndarray]) -> float:
    """Mean loss of ``model`` over token batches [B, T + 1] (single device; for reports)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss(state, tokens):
        m = nnx.merge(graphdef, state)
        return cross_entropy(m(tokens[:, :-1]), tokens[:, 1:])

    return float(np.mean([float(loss(state, jnp.asarray(b))) for b in batches]))
