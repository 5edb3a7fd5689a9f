"""The training loop: ``Trainer`` puts a run together (data, mesh, params, compiled steps,
checkpoints) and ``run`` steps it, evaluating, saving and logging; ``train`` is what train.py runs.

The batch of a step is a pure function of the step, so ``--resume`` reproduces the losses of an
uninterrupted run. Ctrl-C or SIGTERM (what schedulers send before preemption) finishes the
current step, saves and stops; outside the loop (loading, distilling, exporting) either stops at
once, keeping the complete checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx
from tqdm.auto import tqdm

from lin_llm import data as data_lib
from lin_llm import sharding as shd
from lin_llm.config import Config, config_to_dict
from lin_llm.errors import TrainError
from lin_llm.io.atomic import require_writable_directory, write_text
from lin_llm.model import LlamaModel, abstract_model, flat_params
from lin_llm.training import checkpoints, metrics
from lin_llm.training import state as state_lib
from lin_llm.training import step as step_lib
from lin_llm.training.distill import attention_transfer
from lin_llm.training.metrics import MetricsWriter, perplexity


@dataclasses.dataclass
class TrainResult:
    start_step: int
    end_step: int
    losses: dict[int, float]  # step -> training loss of that step (1-based: loss of the update to `step`)
    val: dict[int, float]  # step -> validation loss
    tokens_per_s: float
    stop_signal: int  # the signal (SIGINT, SIGTERM) that stopped the run before train.steps; 0: none
    output_dir: Path
    model_dir: Path | None

    @property
    def interrupted(self) -> bool:
        return self.stop_signal != 0

    @property
    def final_val_loss(self) -> float:
        return self.val[max(self.val)] if self.val else float("nan")

    @property
    def final_val_ppl(self) -> float:
        return perplexity(self.final_val_loss)


def progress_bar(enabled: bool):
    """bar(iterable, desc, **tqdm kwargs): a tqdm bar on process 0 when enabled, else the iterable."""
    def bar(iterable, desc: str, **kwargs):
        if not enabled or not metrics.is_main():
            return iterable
        return tqdm(iterable, desc=desc, unit="step", dynamic_ncols=True, **kwargs)

    return bar


class Trainer:
    """One training run of ``cfg``. Construction does every check (data, mesh, batch,
    checkpoint compatibility) before any training step."""

    def __init__(self, cfg: Config, *, resume: bool = False, progress: bool = True, devices=None):
        self.cfg = cfg
        t = cfg.train
        self.bar = progress_bar(progress)
        self.mesh = shd.make_mesh(cfg.mesh, devices)
        self.micro = t.batch_size // t.grad_accum
        shd.check_batch(self.mesh, self.micro)
        self.output_dir = Path(t.output_dir).absolute()  # orbax needs absolute paths
        require_writable_directory(self.output_dir, "train.output_dir", TrainError)  # before the data's cache goes there
        # data first: a missing or empty corpus stops before any model is built
        self.corpus, self.tokenizer = data_lib.load_corpus(t, cfg.model, self.output_dir / "cache")
        # evaluated in micro-batches, over val_batches full batches: grad_accum does not change the set
        self.val_data = data_lib.val_batches(self.corpus, self.micro, t.val_batches * t.grad_accum)
        self.store = checkpoints.CheckpointStore(self.output_dir / "checkpoints", t.keep_checkpoints)
        self.store.check_fresh(resume)
        self.data = checkpoints.data_identity(t, self.corpus)

        self.plan = state_lib.plan_params(cfg)
        self.schedule = step_lib.lr_schedule(t)
        self.tx = step_lib.make_optimizer(t, self.schedule, state_lib.abstract_params(self.plan, self.plan.train_names))
        self.sh = state_lib.build_shardings(self.plan, self.mesh, self.tx)
        resumed = self.store.resume(cfg, self.data, state_lib.abstract_state(self.plan, self.sh, self.tx)) if resume else None
        self.graphdef = nnx.split(abstract_model(cfg.model))[0]
        self.train_step, self.eval_step = step_lib.cached_steps(
            cfg, self.mesh, lambda: step_lib.build_steps(self.graphdef, self.tx, self.schedule, t, self.mesh, self.sh))
        self._train_rows = state_lib.local_rows(self.sh.batch, (t.grad_accum, self.micro, t.seq_len + 1), axis=1)
        self._eval_rows = state_lib.local_rows(self.sh.eval, (self.micro, t.seq_len + 1), axis=0)

        self.distill_losses: list[float] = []
        self.distill_layer_losses: dict[int, float] = {}  # each linear layer's final relative MSE
        if resumed is not None:
            self.frozen = resumed.pop("frozen")
            self.state = resumed
        else:
            flat = checkpoints.initial_params(cfg, self.sh.params)
            if t.distill_steps:
                flat, self.distill_losses, self.distill_layer_losses = attention_transfer(
                    cfg, flat, self.sh.params, self.sh.eval, self.mesh, self._distill_batch, self.bar)
            self.state, self.frozen = state_lib.fresh_state(self.plan, self.sh, self.tx, flat, t.seed)

    # ------------------------------------------------------------------ batches

    def train_batch(self, step: int) -> jax.Array:
        t = self.cfg.train
        idx = data_lib.train_indices(step, t.batch_size, self.corpus.n_train, t.seed).reshape(t.grad_accum, self.micro)
        local = data_lib.sequences(self.corpus.train, idx[:, self._train_rows].reshape(-1), t.seq_len)
        local = local.reshape(t.grad_accum, len(self._train_rows), t.seq_len + 1)
        return jax.make_array_from_process_local_data(self.sh.batch, local, (t.grad_accum, self.micro, t.seq_len + 1))

    def _eval_batch(self, batch: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(self.sh.eval, batch[self._eval_rows], batch.shape)

    def _distill_batch(self, i: int) -> jax.Array:
        # a data stream of its own (seed + 1), so fine-tuning's batches are those of a run without it
        t = self.cfg.train
        idx = data_lib.train_indices(i, self.micro, self.corpus.n_train, t.seed + 1)
        return self._eval_batch(data_lib.sequences(self.corpus.train, idx, t.seq_len))

    def evaluate(self) -> float:
        """Mean validation loss over train.val_batches batches (the same ones every time)."""
        losses = [self.eval_step(self.state["params"], self.frozen, self._eval_batch(b)) for b in self.val_data]
        return float(np.mean(jax.device_get(losses)))

    # ------------------------------------------------------------------ checkpoints and export

    def save(self, step: int, *, force: bool = False, wait: bool = False) -> None:
        t = self.cfg.train
        meta = {
            "step": step,
            "config": config_to_dict(self.cfg),
            "data": {
                **self.data,
                "n_train_sequences": self.corpus.n_train,
                "sequences_consumed": step * t.batch_size,
                "epoch": step * t.batch_size // self.corpus.n_train,
            },
            "trainable": self.plan.trainable,
            "lora": self.plan.lora,
        }
        self.store.save(step, {**self.state, "frozen": self.frozen}, meta, force=force, wait=wait)

    def final_model(self) -> LlamaModel:
        """The trained model (LoRA merged), as a plain LlamaModel on the mesh."""
        return step_lib.merged_model(self.graphdef, self.state["params"], self.frozen, self.cfg.train, self.sh.replicated)

    def close(self):
        self.store.close()

    # ------------------------------------------------------------------ the loop

    def run(self, until: int | None = None) -> TrainResult:
        """Train to train.steps, or stop after step ``until`` (saving a checkpoint there, as
        Ctrl-C does), and return the losses."""
        t = self.cfg.train
        start = int(jax.device_get(self.state["step"]))
        if metrics.is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.output_dir / "config.yaml", yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
            if self.distill_layer_losses:  # kept for choosing a hybrid's softmax layers (lin_llm.layer_choice)
                write_text(self.output_dir / "distill.json", json.dumps({
                    "steps": t.distill_steps, "final_relative_mse": self.distill_losses[-1],
                    "per_layer": {str(layer): loss for layer, loss in self.distill_layer_losses.items()}}, indent=1))
        writer = MetricsWriter(self.output_dir, metrics.is_main(), start)
        self._log_start()
        stop = _StopFlag()
        with stop:  # a signal during the closing save does not cut it short (a second one does)
            losses, val, tok_s = self._steps(start, t.steps if until is None else min(until, t.steps), writer, stop)
            end = int(jax.device_get(self.state["step"]))
            if end < t.steps:
                if not (t.save_every and end % t.save_every == 0):
                    self.save(end, force=True)
                self.store.wait()
                metrics.log(f"{'interrupted' if stop.requested else 'stopped'} at step {end}: checkpoint saved in "
                    f"{self.store.directory}; continue with --resume")
            self.store.wait()
        if not val and end == t.steps:  # resumed a finished run: report it all the same
            val[end] = self.evaluate()
        model_dir = None
        if end == t.steps and t.export_model:
            model_dir = checkpoints.export_model(self.cfg, flat_params(self.final_model()), self.output_dir / "model")
        result = TrainResult(start, end, losses, val, tok_s, stop.signum if end < t.steps else 0, self.output_dir, model_dir)
        if val:
            summary = {"steps": end, "val_loss": round(result.final_val_loss, 5), "val_ppl": round(result.final_val_ppl, 4),
                       "tokens_per_s": round(tok_s, 1), "attention": self.cfg.model.attention_summary}
            writer.write({"summary": summary})
            metrics.log("summary: " + " ".join(f"{k}={v}" for k, v in summary.items()))
        writer.close()
        return result

    def _log_start(self) -> None:
        n_params = sum(math.prod(s) for n, s in self.plan.shapes.items() if ":lora" not in n)
        n_train = sum(math.prod(self.plan.shapes[n]) for n in self.plan.train_names)
        metrics.log(
            f"mesh {dict(self.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices "
            f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''}); model "
            f"{self.cfg.model.attention_summary} {n_params / 1e6:.2f}M params, training {n_train / 1e6:.3f}M; data "
            f"{self.corpus.source}: {len(self.corpus.train)} train / {len(self.corpus.val)} val tokens"
        )

    def _steps(self, start: int, stop_at: int, writer: MetricsWriter, stop: "_StopFlag"):
        """Step from ``start`` to train.steps (or to ``stop_at``, or a stop request): the losses,
        validation losses and tokens/s. Device metrics are fetched every log_every steps."""
        t = self.cfg.train
        losses: dict[int, float] = {}
        val: dict[int, float] = {}
        pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet fetched
        clock: list = []  # (time, step) once the first (compiling) step has finished
        tok_s = float("nan")
        bar = self.bar(range(start, t.steps), "train", total=t.steps, initial=start)

        def flush():
            nonlocal tok_s
            if not pending:
                return
            fetched = jax.device_get(pending)
            last_step = fetched[-1][0]
            if clock and last_step > clock[0][1]:
                tok_s = (last_step - clock[0][1]) * t.batch_size * t.seq_len / (time.perf_counter() - clock[0][0])
            for s, m in fetched:
                losses[s] = float(m["loss"])
                writer.write({"step": s, "loss": losses[s], "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                              "tokens_per_s": tok_s})
            pending.clear()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[last_step]:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)

        try:
            for step in bar:
                self.state, step_metrics = self.train_step(self.state, self.frozen, self.train_batch(step))
                done = step + 1
                pending.append((done, step_metrics))
                if not clock:
                    jax.block_until_ready(step_metrics)
                    clock.append((time.perf_counter(), done))
                last = done == t.steps
                if done % t.log_every == 0 or last or stop.requested:
                    flush()
                if (t.eval_every and done % t.eval_every == 0) or last:
                    val[done] = self._validate(done, writer, bar)
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
        return losses, val, tok_s

    def _validate(self, step: int, writer: MetricsWriter, bar) -> float:
        loss = self.evaluate()
        writer.write({"step": step, "val_loss": loss, "val_ppl": perplexity(loss)})
        message = f"step {step}: val loss {loss:.4f}, ppl {perplexity(loss):.3f}"
        if metrics.is_main() and hasattr(bar, "write"):
            bar.write(message)
        else:
            metrics.log(message)
        return loss


class Terminated(KeyboardInterrupt):
    """SIGTERM where the loop cannot stop cleanly (loading, distilling, exporting, or a second
    SIGTERM): like Ctrl-C there, it stops at once; complete checkpoints are kept."""

    word, exit_status = "terminated", 128 + signal.SIGTERM  # how lin_llm.cli.common.run_command reports it


def _raise_terminated(signum, frame):
    raise Terminated


class _StopFlag:
    """The first Ctrl-C or SIGTERM asks the loop to stop after the current step (it then saves a
    checkpoint and returns); a second one interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _handler(self, signum, frame):
        if self.requested:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        metrics.log(f"\n{name}: stopping after this step and saving a checkpoint ({name} again to abort)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_DFL if previous is None else previous)


# --------------------------------------------------------------------------- entry points


def train(cfg: Config, *, resume: bool = False, progress: bool = True, devices=None) -> TrainResult:
    """Run ``cfg`` to train.steps (or until Ctrl-C or SIGTERM). Multi-host set-up happens here
    first. SIGTERM outside the loop raises Terminated (a KeyboardInterrupt)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        shd.maybe_initialize_distributed(cfg.mesh)
        trainer = Trainer(cfg, resume=resume, progress=progress, devices=devices)
        try:
            return trainer.run()
        finally:
            trainer.close()
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def evaluate_model(model: LlamaModel, batches: list[np.ndarray]) -> float:
    """Mean loss of ``model`` over token batches [B, T + 1] (single device; for reports)."""

    @jax.jit
    def loss(model, tokens):
        return step_lib.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])

    return float(np.mean([float(loss(model, jax.numpy.asarray(b))) for b in batches]))
