"""How each config kind takes effect in this agent: one async function per kind.

An applier raises `ApplyRefused` (or any error) when this site cannot run the config.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


class ApplyRefused(Exception):
    """This site cannot run the config; the message says why (reported to the center)."""


@dataclass(frozen=True)
class Applier:
    kind: str
    model: type[BaseModel]
    apply: Callable[[Any], Awaitable[None]]
