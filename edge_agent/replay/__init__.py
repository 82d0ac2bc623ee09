"""The edge half of the replay log: its alarm policy (pure) and the monitor that applies it.

Moving entries to the center is `bus.forwarder.Forwarder`; this package watches and configures it.
"""

from bus.forwarder import ForwarderConfig
from edge_agent.config import ReplayConfig
from edge_agent.replay.monitor import ReplayMonitor
from edge_agent.replay.policy import AlarmChange, PolicyState, evaluate


def forwarder_config(replay: ReplayConfig) -> ForwarderConfig:
    """The forwarder's pacing from the agent's replay settings (same batch as the consumer's)."""
    return ForwarderConfig(
        batch_size=replay.batch_size,
        publish_timeout_s=replay.publish_timeout_s,
        backoff_min_s=replay.backoff_min_s,
        backoff_max_s=replay.backoff_max_s,
    )


__all__ = ["AlarmChange", "PolicyState", "ReplayMonitor", "evaluate", "forwarder_config"]
