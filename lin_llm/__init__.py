"""lin-llm: linearized LLaMA-family language models in JAX/Flax NNX."""

from lin_llm.config import Config, ConfigError, ModelConfig, load_config
from lin_llm.model import LlamaModel, build_model

__all__ = ["Config", "ConfigError", "LlamaModel", "ModelConfig", "build_model", "load_config"]
