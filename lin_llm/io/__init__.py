"""Every way weights come in and go out: lin_llm checkpoints, Hugging Face directories, GGUF files."""

from lin_llm.io.checkpoint import save_model
from lin_llm.io.load import load_checkpoint

__all__ = ["load_checkpoint", "save_model"]
