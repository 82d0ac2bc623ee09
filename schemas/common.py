"""Events shared by every concern: error replies to requests.

A request handler that fails answers with `ErrorReply` instead of leaving the caller to time out.
"""

from __future__ import annotations

from pydantic import Field

from schemas.catalog import event
from schemas.envelope import EventData


@event("edgebus.error", version=1)
class ErrorReply(EventData):
    """The answer to a request that could not be served."""

    code: str = Field(max_length=64)
    message: str = Field(max_length=4096)
