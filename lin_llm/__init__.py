"""lin-llm: linearized LLaMA-family language models in JAX/Flax NNX."""

from lin_llm.config import Config, ModelConfig, load_config
from lin_llm.decoding import generate, medusa_generate, speculative_generate
from lin_llm.errors import CheckpointError, ConfigError, LinLLMError
from lin_llm.io import load_checkpoint, save_model
from lin_llm.model import LlamaModel, build_model

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "LinLLMError",
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
