"""`python -m services.controller`: one controller replica until SIGTERM/SIGINT (then exit 0).

Start several against the same NATS: they share requests, the registry and the sweep.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from bus.log import configure_logging, get_logger
from services.controller.availability import AvailabilityPolicy
from services.controller.config import ControllerConfig, default_replica_id
from services.entry import serve_until_signalled


def parser() -> argparse.ArgumentParser:
    defaults = ControllerConfig()
    p = argparse.ArgumentParser(prog="python -m services.controller", description=__doc__)
    p.add_argument("--nats", required=True, help="center NATS URL(s), comma-separated")
    p.add_argument("--credentials", type=Path, help="NATS creds file of this service")
    p.add_argument("--heartbeat-interval-s", type=float, default=30.0)
    p.add_argument("--degraded-after-s", type=float, help="default: 2.5 x interval")
    p.add_argument("--offline-after-s", type=float, help="default: 4 x interval")
    p.add_argument("--backlog-age-degraded-s", type=float, default=300.0)
    p.add_argument("--lease-ttl-s", type=float, default=defaults.lease_ttl_s)
    p.add_argument("--sweep-interval-s", type=float, default=defaults.sweep_interval_s)
    p.add_argument("--persist-every-s", type=float, default=defaults.persist_every_s)
    p.add_argument("--max-persist-per-s", type=float, default=defaults.max_persist_per_s)
    p.add_argument(
        "--public-url",
        action="append",
        default=[],
        help="URL new sites reach the center at (put in tokens); default: --nats",
    )
    p.add_argument(
        "--leaf-url",
        action="append",
        default=[],
        help="leaf-node URL sites connect to (sent at onboarding), nats-leaf://host:port",
    )
    p.add_argument("--authority-dir", type=Path, help="CredentialAuthority keys: issue site JWTs")
    p.add_argument("--system-credentials", type=Path, help="system-account creds (revocations)")
    p.add_argument("--replica-id", default=None)
    p.add_argument("--log-level", default="info")
    return p


def config_from_args(args: argparse.Namespace) -> ControllerConfig:
    policy = AvailabilityPolicy.for_interval(
        args.heartbeat_interval_s,
        degraded_after_s=args.degraded_after_s,
        offline_after_s=args.offline_after_s,
        backlog_age_degraded_s=args.backlog_age_degraded_s,
    )
    public = args.public_url or [u.strip() for u in args.nats.split(",") if u.strip()]
    return ControllerConfig(
        policy=policy,
        public_urls=tuple(public),
        leaf_urls=tuple(args.leaf_url),
        replica_id=args.replica_id or default_replica_id(),
        lease_ttl_s=args.lease_ttl_s,
        sweep_interval_s=args.sweep_interval_s,
        persist_every_s=args.persist_every_s,
        max_persist_per_s=args.max_persist_per_s,
    )


async def serve(args: argparse.Namespace, config: ControllerConfig) -> None:
    # Imported after logging is configured (loggers bind at import in some modules).
    from bus.client import Bus
    from bus.config import NatsConfig
    from services.controller.credentials import PushingAuthority, SiteAuthority
    from services.controller.service import ControllerService

    async def run(bus: Bus, stop: asyncio.Event) -> None:
        system_bus: Bus | None = None
        authority: SiteAuthority | None = None
        try:
            if args.authority_dir is not None:
                from bus.auth import CredentialAuthority

                if args.system_credentials is None:
                    raise ValueError(
                        "--authority-dir needs --system-credentials (to push revocations)"
                    )
                system_bus = await Bus.connect(
                    NatsConfig.from_url(
                        args.nats,
                        name="edgebus-controller-system",
                        credentials=args.system_credentials,
                    ),
                    scope="center",
                )
                authority = PushingAuthority(CredentialAuthority(args.authority_dir), system_bus.nc)
            await ControllerService(bus, config, authority).run(stop)
        finally:
            if system_bus is not None:
                await system_bus.close()

    await serve_until_signalled(
        args.nats,
        args.credentials,
        name=f"edgebus-controller-{config.replica_id}",
        source="/center/controller",
        run=run,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        get_logger("controller").error("bad_arguments", error=str(exc))
        return 2
    try:
        asyncio.run(serve(args, config))
    except ValueError as exc:
        get_logger("controller").error("bad_arguments", error=str(exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
