"""Log shipping: the agent's own records at or above the ship level, sent to the center.

A `bus.log` tap queues them (bounded, never blocking); `LogShipper.run` appends them to the
replay log as kind "log", key = level.
"""

from edge_agent.logship.queue import ShipQueue
from edge_agent.logship.shipper import LogShipper, ShipStats, ShipTuning

__all__ = ["LogShipper", "ShipQueue", "ShipStats", "ShipTuning"]
