"""Config sync, edge half: apply what the center desires, keep it for offline restarts, report."""

from edge_agent.sync.agent import ConfigSync, SyncTuning
from edge_agent.sync.appliers import Applier, ApplyRefused
from edge_agent.sync.store import AppliedStore, store_dir

__all__ = ["AppliedStore", "Applier", "ApplyRefused", "ConfigSync", "SyncTuning", "store_dir"]
