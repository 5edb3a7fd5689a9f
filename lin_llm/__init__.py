"""lin-llm: linearized LLaMA-family language models in JAX/Flax NNX."""

from lin_llm.config import Config, ConfigError, ModelConfig, load_config
from lin_llm.model import LlamaModel, build_model
from lin_llm.checkpoint import CheckpointError, load_checkpoint, save_model
from lin_llm.generation import generate, speculative_generate
from lin_llm.medusa import medusa_generate

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "LlamaModel",
    "ModelConfig",
    "build_model",
    "generate",
    "load_checkpoint",
    "load_config",
    "medusa_generate",
    "save_model",
    "speculative_generate",
]
