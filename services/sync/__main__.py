"""`python -m services.sync --nats URL [--credentials F]`: run one sync-service replica.

Stops cleanly (lease handed over) on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from services.entry import serve_until_signalled, service_main
from services.sync.config import SyncConfig
from services.sync.status import PushPolicy


def parser() -> argparse.ArgumentParser:
    defaults = SyncConfig()
    p = argparse.ArgumentParser(prog="python -m services.sync", description=__doc__)
    p.add_argument("--nats", required=True, help="center NATS URL(s), comma-separated")
    p.add_argument("--credentials", type=Path, help="NATS creds file of this service")
    p.add_argument("--audit-interval-s", type=float, default=defaults.audit_interval_s)
    p.add_argument("--lease-ttl-s", type=float, default=defaults.lease_ttl_s)
    p.add_argument("--resend-after-s", type=float, default=defaults.policy.resend_after_s)
    p.add_argument("--replica-id", default=None)
    p.add_argument("--log-level", default="info")
    return p


def config_from_args(args: argparse.Namespace) -> SyncConfig:
    extra = {"replica_id": args.replica_id} if args.replica_id else {}
    return SyncConfig(
        audit_interval_s=args.audit_interval_s,
        lease_ttl_s=args.lease_ttl_s,
        policy=PushPolicy(resend_after_s=args.resend_after_s),
        **extra,
    )


async def serve(args: argparse.Namespace, config: SyncConfig) -> None:
    from services.sync.service import SyncService

    await serve_until_signalled(
        args.nats,
        args.credentials,
        name=f"edgebus-sync-{config.replica_id}",
        source="/center/sync",
        run=lambda bus, stop: SyncService(bus, config).run(stop),
    )


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(
        argv, parser=parser(), config_from_args=config_from_args, serve=serve, name="sync"
    )


if __name__ == "__main__":
    sys.exit(main())
