"""The registry of attention presets selectable as ``model.attention=NAME``."""

from __future__ import annotations

from lin_llm.config import ConfigError

NAMES = ("softmax",)


def validate_name(name: str) -> None:
    if name not in NAMES:
        raise ConfigError(f"model.attention={name!r} is not a known preset; choose one of: {', '.join(NAMES)}")
