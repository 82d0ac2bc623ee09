"""`bus.ports.free_port`: ports below the kernel's ephemeral range (where an outgoing connection
cannot take them before our server binds them), never one twice, never one in use."""

from __future__ import annotations

import os
import socket

from bus import ports
from bus.ports import FIRST_PORT, free_port


def ephemeral_low() -> int:
    return int(ports.EPHEMERAL_RANGE.read_text().split()[0])


def test_ports_come_from_below_the_ephemeral_range_and_do_not_repeat() -> None:
    low = ephemeral_low()
    assert low - FIRST_PORT >= ports.MIN_RANGE  # as on Linux by default (32768): checked here
    handed = [free_port() for _ in range(500)]
    assert len(set(handed)) == 500
    assert all(FIRST_PORT <= port < low for port in handed)
    for port in handed[-20:]:  # free for a server to bind now
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((ports.LOOPBACK, port))


def test_a_port_someone_listens_on_is_passed_over() -> None:
    busy = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((ports.LOOPBACK, busy))
        listener.listen()
        ports._next[os.getpid()] = busy  # it would be the next one handed out
        port = free_port()
    low = ephemeral_low()
    expected = busy + 1 if busy + 1 < low else FIRST_PORT
    assert port != busy
    assert port == expected or not ports._bindable(ports.LOOPBACK, expected)
