"""The process-wide registries: every edgebus event type, and every config kind sites apply.

Concern modules (`schemas/devices.py`, ...) decorate their payload models with `event(...)`
and their config documents with `config_kind(...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

from schemas.registry import EventRegistry

REGISTRY = EventRegistry()
event = REGISTRY.event
upcaster = REGISTRY.upcaster

CONFIG_KINDS: dict[str, type[BaseModel]] = {}
M = TypeVar("M", bound=BaseModel)


def config_kind(name: str) -> Callable[[type[M]], type[M]]:
    """Register a config document model (every field defaulted) as config kind `name`."""

    def register(model: type[M]) -> type[M]:
        if name in CONFIG_KINDS and CONFIG_KINDS[name] is not model:
            raise ValueError(f"config kind {name!r} is already registered")
        for field_name, field in model.model_fields.items():
            if field.is_required():
                raise TypeError(f"config kind {name!r}: field {field_name!r} needs a default")
        CONFIG_KINDS[name] = model
        return model

    return register
