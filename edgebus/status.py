"""What `edgebus status` reports about a center: server, JetStream usage and streams.

`collect_status` returns plain data (printed as JSON with --json); `status_table` renders it.
"""

from __future__ import annotations

from typing import Any

from nats.js.errors import APIError
from rich.table import Table

from bus.client import Bus


async def collect_status(bus: Bus) -> dict[str, Any]:
    info: dict[str, Any] = getattr(bus.nc, "_server_info", {}) or {}
    status: dict[str, Any] = {
        "server": {
            "url": str(bus.nc.connected_url.geturl()) if bus.nc.connected_url else None,
            "name": info.get("server_name"),
            "version": info.get("version"),
            "jetstream": bool(info.get("jetstream")),
            "max_payload": bus.nc.max_payload,
        },
        "streams": [],
    }
    try:
        account = await bus.js.account_info()
    except APIError as exc:
        status["jetstream_error"] = str(exc)
        return status
    status["jetstream"] = {
        "domain": account.domain,
        "streams": account.streams,
        "consumers": account.consumers,
        "storage_bytes": account.storage,
        "memory_bytes": account.memory,
    }
    for stream in await bus.js.streams_info():
        state = stream.state
        status["streams"].append(
            {
                "name": stream.config.name,
                "subjects": list(stream.config.subjects or []),
                "messages": state.messages,
                "bytes": state.bytes,
                "consumers": state.consumer_count,
            }
        )
    status["dead_letters"] = next(
        (s["messages"] for s in status["streams"] if s["name"] == "DEADLETTER"), 0
    )
    return status


def status_table(status: dict[str, Any]) -> Table:
    server = status["server"]
    js = status.get("jetstream", {})
    table = Table(
        title=f"edgebus center {server.get('name')} (nats-server {server.get('version')}, "
        f"JetStream domain {js.get('domain')})"
    )
    for column in ("stream", "subjects", "messages", "bytes", "consumers"):
        table.add_column(column)
    for stream in status["streams"]:
        table.add_row(
            stream["name"],
            " ".join(stream["subjects"]),
            str(stream["messages"]),
            str(stream["bytes"]),
            str(stream["consumers"]),
        )
    return table
