"""Free TCP ports for the servers we start (nats-server, mosquitto, a site's listeners).

Taken from below the kernel's ephemeral range, where no outgoing connection can take them
between our check and the server's bind; stdlib only.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

__all__ = ["free_port"]

LOOPBACK = "127.0.0.1"
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
FIRST_PORT = 20_000  # above the well-known and most registered service ports
MIN_RANGE = 1_000  # fewer ports than this below the ephemeral range: let the kernel pick

_lock = threading.Lock()
_next: dict[int, int] = {}  # pid -> the next port to try (a forked child starts afresh)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on now, for a server about to bind it.

    A port the kernel picks (bind to 0) comes from its ephemeral range, and until our
    server binds it, any process's next outgoing connection may take it as its source
    port (the server then fails: "address already in use"; seen once in a suite run).
    So ports come from below that range, in turn from a random start: a process does not
    hand out one port twice until it has gone round (several thousand ports)."""
    low = _ephemeral_low()
    if low is None or low - FIRST_PORT < MIN_RANGE:
        return _kernel_port(host)
    with _lock:
        pid = os.getpid()
        port = _next.get(pid) or random.randrange(FIRST_PORT, low)
        for _ in range(low - FIRST_PORT):
            candidate, port = port, port + 1 if port + 1 < low else FIRST_PORT
            if _bindable(host, candidate):
                _next[pid] = port
                return candidate
    return _kernel_port(host)


def _ephemeral_low() -> int | None:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
