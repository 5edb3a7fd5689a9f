"""What a path given as a model turns out to be, when it is not what was asked for: the messages
that say what it is and what to give instead."""

from __future__ import annotations

from pathlib import Path

from lin_llm.errors import CheckpointError


def require_model_directory(path: str | Path, what: str) -> Path:
    """``path`` if it is a directory that may hold a model; otherwise a CheckpointError naming
    ``what`` (a flag or field) and saying what the path is: missing, a GGUF or weights file, a
    training run's output directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if not path.is_dir():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            hint = (f"it is a GGUF file: convert it first with `python -m lin_llm.convert --gguf {path} --out DIR` "
                    "and give DIR")
        elif suffix in (".safetensors", ".bin", ".pt", ".pth"):
            hint = f"it is a weights file: give the directory that holds it and its config.json ({path.parent})"
        else:
            hint = "give a lin_llm checkpoint or Hugging Face model directory"
        raise CheckpointError(f"{what} {path} is a file, not a model directory; {hint}")
    run_parts = (path / "checkpoints").is_dir() or (path / "model" / "config.yaml").is_file()
    if run_parts and not (path / "params").is_dir():
        model = path / "model"
        where = (f"its trained model is {model}: give that" if model.is_dir() else
                 f"it has no {model.name}/ yet (the run has not finished: continue it with train.py --resume)")
        raise CheckpointError(f"{what} {path} is a training run's output directory, not a model; {where}")
    return path


def require_file(path: str | Path, what: str, kind: str) -> Path:
    """``path`` if it is a file; otherwise a CheckpointError naming ``what`` and the ``kind`` expected."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is a directory; give the {kind} file itself")
    return path
