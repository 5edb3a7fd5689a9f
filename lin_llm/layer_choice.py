"""Which layers of a hybrid model keep softmax attention (model.softmax_layers).

Two rules: every k-th layer, or the layers whose attention-transfer loss stays highest, measured
by the project's own distillation (lin_llm.training.distill) with every layer linear: the layers
linear attention imitates worst are the ones worth keeping softmax. ``python -m lin_llm.hybrid``
prints either list.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from lin_llm.config import Config
from lin_llm.errors import CheckpointError, ConfigError
from lin_llm.training import Trainer


def every_kth(n_layers: int, k: int, offset: int | None = None) -> list[int]:
    """Every k-th of n_layers layers: offset, offset + k, ... (0-based); the default offset k - 1
    takes the k-th, 2k-th, ... layer counted from one, so the last layer is kept when k divides
    n_layers."""
    if k < 1:
        raise ConfigError(f"every k-th layer: k={k} must be >= 1")
    offset = k - 1 if offset is None else offset
    if not 0 <= offset < k:
        raise ConfigError(f"every k-th layer: offset={offset} must be in [0, {k - 1}] (k={k})")
    layers = list(range(offset, n_layers, k))
    if not layers or len(layers) == n_layers:
        what = "no layer" if not layers else f"every one of the {n_layers} layers"
        raise ConfigError(f"every k-th layer with k={k}, offset={offset} keeps {what} softmax; choose k and offset "
                          "that keep some layers of each kind")
    return layers


def highest_transfer_loss(per_layer_losses: Mapping[int, float] | Sequence[float], n: int) -> list[int]:
    """The n layers with the highest loss (ties: the lower index), in increasing order.
    per_layer_losses maps layer index -> loss (a sequence counts from layer 0)."""
    losses = dict(per_layer_losses) if isinstance(per_layer_losses, Mapping) else dict(enumerate(per_layer_losses))
    if not 1 <= n <= len(losses):
        raise ConfigError(f"the {n} layers of highest transfer loss: n must be in [1, {len(losses)}] "
                          f"(losses were measured for {len(losses)} layers)")
    ranked = sorted(losses, key=lambda layer: (-losses[layer], layer))
    return sorted(ranked[:n])


def transfer_losses(cfg: Config, devices=None, progress: bool = False) -> dict[int, float]:
    """Each layer's relative attention MSE after train.distill_steps of attention transfer from
    train.init_from, with every layer linear (model.softmax_layers ignored). The Trainer runs the
    transfer in a temporary output directory; nothing is fine-tuned or kept."""
    if cfg.train.distill_steps == 0:
        raise ConfigError("choosing layers by transfer loss runs attention transfer: set train.distill_steps > 0 "
                          "(e.g. 200) and train.init_from to the softmax checkpoint")
    with tempfile.TemporaryDirectory(prefix="lin_llm-layer-choice-") as tmp:
        run = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, softmax_layers=()),
                                  train=dataclasses.replace(cfg.train, output_dir=tmp))
        trainer = Trainer(run, progress=progress, devices=devices)
        try:
            return dict(trainer.distill_layer_losses)
        finally:
            trainer.close()


def recorded_transfer_losses(run_dir: str | Path) -> dict[int, float]:
    """The per-layer losses a finished attention-transfer run recorded (run_dir/distill.json, written
    by the Trainer), so choosing layers needs no second transfer."""
    path = Path(run_dir) / "distill.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: give the output_dir of a training run with train.distill_steps > 0 "
                              "(the Trainer writes each layer's final transfer loss there)")
    try:
        return {int(layer): float(loss) for layer, loss in json.loads(path.read_text())["per_layer"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path} is not a transfer-loss record ({err}); rerun the transfer") from None
