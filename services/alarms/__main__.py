"""`python -m services.alarms`: one alarms-service replica until SIGTERM/SIGINT (then exit 0).

Start several against the same NATS: they share requests; one leads each partition (consumes,
writes state).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from services.alarms.config import AlarmsConfig, default_replica_id
from services.alarms.state import FlapPolicy
from services.alarms.storm import StormPolicy
from services.entry import serve_until_signalled, service_main


def parser() -> argparse.ArgumentParser:
    defaults, flap, storm = AlarmsConfig(), FlapPolicy(), StormPolicy()
    p = argparse.ArgumentParser(prog="python -m services.alarms", description=__doc__)
    p.add_argument("--nats", required=True, help="center NATS URL(s), comma-separated")
    p.add_argument("--credentials", type=Path, help="NATS creds file of this service")
    p.add_argument("--replica-id", default=None)
    p.add_argument(
        "--partitions",
        type=int,
        default=defaults.partitions,
        help="alarm partitions (by site): one leader each, spread over the replicas",
    )
    p.add_argument("--lease-ttl-s", type=float, default=defaults.lease_ttl_s)
    p.add_argument("--flush-every-s", type=float, default=defaults.flush_every_s)
    p.add_argument("--busy-flush-every-s", type=float, default=defaults.busy_flush_every_s)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--tick-s", type=float, default=defaults.tick_s)
    p.add_argument(
        "--flap-window-s", type=float, default=flap.window_s, help="flap detection window"
    )
    p.add_argument(
        "--flap-threshold", type=int, default=flap.threshold, help="changes in a window: flapping"
    )
    p.add_argument("--flap-quiet-s", type=float, default=flap.quiet_s, help="then settled")
    p.add_argument("--site-notices-per-s", type=float, default=storm.site_rate_per_s)
    p.add_argument("--site-notice-burst", type=int, default=storm.site_burst)
    p.add_argument("--fleet-notices-per-s", type=float, default=storm.fleet_rate_per_s)
    p.add_argument("--fleet-notice-burst", type=int, default=storm.fleet_burst)
    p.add_argument("--summary-every-s", type=float, default=storm.summary_every_s)
    p.add_argument("--retention-days", type=float, default=defaults.retention_s / 86400)
    p.add_argument("--log-level", default="info")
    return p


def config_from_args(args: argparse.Namespace) -> AlarmsConfig:
    return AlarmsConfig(
        replica_id=args.replica_id or default_replica_id(),
        flap=FlapPolicy(
            window_s=args.flap_window_s, threshold=args.flap_threshold, quiet_s=args.flap_quiet_s
        ),
        storm=StormPolicy(
            site_rate_per_s=args.site_notices_per_s,
            site_burst=args.site_notice_burst,
            fleet_rate_per_s=args.fleet_notices_per_s,
            fleet_burst=args.fleet_notice_burst,
            summary_every_s=args.summary_every_s,
        ),
        partitions=args.partitions,
        lease_ttl_s=args.lease_ttl_s,
        flush_every_s=args.flush_every_s,
        busy_flush_every_s=args.busy_flush_every_s,
        batch_size=args.batch_size,
        tick_s=args.tick_s,
        retention_s=args.retention_days * 86400,
    )


async def serve(args: argparse.Namespace, config: AlarmsConfig) -> None:
    from services.alarms.service import AlarmsService

    await serve_until_signalled(
        args.nats,
        args.credentials,
        name=f"edgebus-alarms-{config.replica_id}",
        source="/center/alarms",
        run=lambda bus, stop: AlarmsService(bus, config).run(stop),
    )


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(
        argv, parser=parser(), config_from_args=config_from_args, serve=serve, name="alarms"
    )


if __name__ == "__main__":
    sys.exit(main())
