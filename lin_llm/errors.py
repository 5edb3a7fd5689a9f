"""The errors lin_llm raises for input a user must change: one base class, one per subsystem.

Every CLI catches ``LinLLMError`` and prints its message (exit status 2): the message names the
file, field or flag at fault and what to do about it, so no traceback is needed.
"""


class LinLLMError(ValueError):
    """Bad input: a config, file, checkpoint, prompt or shape that must change before work starts."""


class ConfigError(LinLLMError):
    """A config field is unknown, mistyped, out of range or inconsistent with another."""


class CheckpointError(LinLLMError):
    """A checkpoint or model directory is missing, incomplete, damaged or does not fit the model."""


class DataError(LinLLMError):
    """The data source is missing, empty, unreadable or too small for the requested batches."""


class MeshError(LinLLMError):
    """The mesh does not fit the devices, or the batch does not fit the mesh."""


class TrainError(LinLLMError):
    """Something about a training run's inputs must change before training can start."""


class TokenizerError(LinLLMError):
    """A checkpoint has no tokenizer that fits its model."""


class EvaluationError(LinLLMError):
    """An evaluation request (data, window, contexts) does not fit the model or the text."""


class DecodeError(LinLLMError):
    """A decoding request (prompt, sampling arguments, draft or heads) cannot be served."""
