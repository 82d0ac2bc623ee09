"""The edge half of site liveness: a periodic heartbeat with the site's inventory.

`sender` publishes `SiteHeartbeat` on `up.<site>.heartbeat`; `inventory` builds what it carries.
"""

from edge_agent.heartbeat.inventory import (
    build_inventory,
    collect_capacity,
    collect_load,
    inventory_from,
    package_version,
)
from edge_agent.heartbeat.sender import HeartbeatSender, HeartbeatStats, agent_heartbeat

__all__ = [
    "HeartbeatSender",
    "HeartbeatStats",
    "agent_heartbeat",
    "build_inventory",
    "collect_capacity",
    "collect_load",
    "inventory_from",
    "package_version",
]
