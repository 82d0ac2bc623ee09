"""`python -m edge_agent`: run one site's edge agent until SIGTERM/SIGINT (then exit 0).

The site supervisor spawns exactly this command; keep the flags stable.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from bus import subjects
from bus.log import configure_logging, get_logger
from bus.streams import ReplayFullPolicy
from edge_agent.config import AgentConfig, ExternalBroker, ReplayConfig
from edge_agent.ingest.convert import IngestLimits
from schemas.alarms import AlarmRulesConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edge_agent", description=__doc__)
    p.add_argument("--site", required=True, help="this site's id")
    p.add_argument("--nats", required=True, help="the site's own nats-server, nats://host:port")
    p.add_argument("--data-dir", required=True, type=Path, help="the agent's local files")
    p.add_argument(
        "--mqtt-broker",
        help="read devices from an existing broker: mqtt://host:port (3.1.1) or mqtt5://host:port",
    )
    defaults = ReplayConfig()
    p.add_argument("--replay-max-bytes", type=int, default=defaults.max_bytes)
    p.add_argument("--replay-max-age-s", type=float, default=defaults.max_age_s)
    p.add_argument("--replay-policy", choices=ReplayFullPolicy.ALL, default=defaults.policy)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument(
        "--ack-wait-s",
        type=float,
        default=defaults.ack_wait_s,
        help="after a crash, unacked replay-log and device entries come back after this",
    )
    p.add_argument(
        "--publish-timeout-s",
        type=float,
        default=defaults.publish_timeout_s,
        help="how long the forwarder waits for the center's acks of one batch",
    )
    p.add_argument(
        "--backoff-max-s",
        type=float,
        default=defaults.backoff_max_s,
        help="longest pause between the forwarder's retries while the center is unreachable",
    )
    p.add_argument("--max-payload-bytes", type=int, default=IngestLimits().max_payload_bytes)
    p.add_argument(
        "--message-id-field",
        default=None,
        help="payload field a device sets uniquely per message: QoS 1 re-sends dedup on it",
    )
    p.add_argument("--credentials", type=Path, help="NATS credentials file for the site server")
    p.add_argument(
        "--heartbeat-interval-s", type=float, default=30.0, help="seconds between heartbeats"
    )
    p.add_argument(
        "--sync-report-interval-s",
        type=float,
        default=60.0,
        help="seconds between reports of the config this site runs",
    )
    p.add_argument(
        "--alarm-rules", type=Path, help="JSON file of alarm rules to start with (AlarmRulesConfig)"
    )
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--log-ship-level",
        choices=("debug", "info", "warning", "error"),
        default="warning",
        help="own log records at this level and above are sent to the center",
    )
    return p


def load_alarm_rules(path: Path) -> AlarmRulesConfig:
    """An `AlarmRulesConfig` JSON file; ValueError (a bad argument) if unreadable or invalid."""
    try:
        return AlarmRulesConfig.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read --alarm-rules {path}: {exc}") from None


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    replay = ReplayConfig(
        max_bytes=args.replay_max_bytes,
        max_age_s=args.replay_max_age_s,
        policy=args.replay_policy,
        batch_size=args.batch_size,
        ack_wait_s=args.ack_wait_s,
        publish_timeout_s=args.publish_timeout_s,
        backoff_max_s=args.backoff_max_s,
    )
    return AgentConfig(
        site=subjects.site_id(args.site),
        nats_url=args.nats,
        data_dir=args.data_dir,
        ingest=IngestLimits(
            max_payload_bytes=args.max_payload_bytes, message_id_field=args.message_id_field
        ),
        replay=replay,
        external_broker=ExternalBroker.from_url(args.mqtt_broker) if args.mqtt_broker else None,
        credentials=args.credentials,
        heartbeat_interval_s=args.heartbeat_interval_s,
        alarm_rules=load_alarm_rules(args.alarm_rules) if args.alarm_rules else None,
        log_ship_level=args.log_ship_level,
        sync_report_interval_s=args.sync_report_interval_s,
    )


async def serve(config: AgentConfig) -> None:
    from edge_agent.runtime import EdgeAgent  # after logging is configured

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await EdgeAgent(config).run(stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        get_logger("edge_agent").error("bad_arguments", error=str(exc))
        return 2
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
