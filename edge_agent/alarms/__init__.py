"""Alarms at the edge: raised and cleared locally (even offline), owed to the center.

`local.LocalAlarms` keeps the active set and publishes each change (center half: services/alarms).
"""

from edge_agent.alarms.local import LocalAlarms

__all__ = ["LocalAlarms"]
