"""Sharded training: ``train(cfg)`` is what train.py runs.

- state.py: which params train (train.trainable, LoRA), their shardings, the train state pytree;
- step.py: loss, AdamW + schedule, the jitted train/eval steps with explicit shardings;
- distill.py: attention transfer (LoLCATs stage 1) before fine-tuning;
- checkpoints.py: orbax checkpoints, resume checks, train.init_from, the exported model;
- metrics.py: metrics.jsonl / TensorBoard, process-0 logging;
- loop.py: the Trainer and its loop.
"""

from lin_llm.training.loop import Trainer, TrainResult, evaluate_model, train
from lin_llm.training.metrics import MetricsWriter, perplexity
from lin_llm.training.step import cross_entropy, lr_schedule, make_optimizer, model_logits

__all__ = [
    "MetricsWriter",
    "TrainResult",
    "Trainer",
    "cross_entropy",
    "evaluate_model",
    "lr_schedule",
    "make_optimizer",
    "model_logits",
    "perplexity",
    "train",
]
