"""Reporting: metrics.jsonl (+ TensorBoard when installed), log lines from process 0 only."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import jax

from lin_llm.io.atomic import write_text


def is_main() -> bool:
    return jax.process_index() == 0


def log(msg: str) -> None:
    if is_main():
        print(msg, flush=True)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


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
        record = _finite(record)
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
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


def _finite(value):
    """``value`` with every non-finite float (at any depth) as None: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


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
    atomically as strict JSON: a crash here leaves the old file or the new one, never a mix."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # the last line of a run killed mid-write
            continue
        step = record.get("step", record.get("summary", {}).get("steps", 0)) if isinstance(record, dict) else None
        if isinstance(step, int) and step <= last_step:  # NaN an older version wrote becomes null
            kept.append(json.dumps(_finite(record), allow_nan=False) + "\n")
    write_text(path, "".join(kept))
