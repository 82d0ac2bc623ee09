"""Alarms at the edge: raised and cleared locally (even offline), owed to the center.

`local.LocalAlarms` keeps the active set (on disk too: `store`) and publishes each change (center
half: services/alarms);
`engine.AlarmRuleEngine` raises and clears them from the site's alarm rules (`rules`).
"""

from edge_agent.alarms.engine import AlarmRuleEngine
from edge_agent.alarms.local import LocalAlarms

__all__ = ["AlarmRuleEngine", "LocalAlarms"]
