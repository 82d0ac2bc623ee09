"""Shared pytest fixtures for edgebus; each section belongs to one area, append new ones below."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.natsserver import NatsServerProcess
from bus.testing import EdgeTopology

# ---------------------------------------------------------------------------
# Real NATS servers (bus.natsserver / bus.testing)
# ---------------------------------------------------------------------------


@pytest.fixture
def edge_topology(tmp_path: Path) -> Iterator[EdgeTopology]:
    """A running hub (domain "hub"); add sites with edge_topology.add_site("s1")."""
    topology = EdgeTopology(tmp_path / "edge")
    try:
        topology.start_hub()
        yield topology
    finally:
        topology.stop()


@pytest.fixture
def hub(edge_topology: EdgeTopology) -> NatsServerProcess:
    return edge_topology.hub
