"""The process-wide registry every edgebus event type registers into.

Concern modules (`schemas/devices.py`, ...) decorate their payload models with `event(...)`.
"""

from __future__ import annotations

from schemas.registry import EventRegistry

REGISTRY = EventRegistry()
event = REGISTRY.event
upcaster = REGISTRY.upcaster
