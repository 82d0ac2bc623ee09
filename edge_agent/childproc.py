"""Start a supervised child process: own session, output to a log file, dies with its parent.

Shared by the site supervisor (its agent) and the demo launcher (every process it starts).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:  # pragma: no cover - runs in the forked child
    # Linux: the child gets SIGTERM if its parent is killed outright (-9), so it stops
    # cleanly instead of running on as an orphan nobody supervises.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(1)


def spawn_logged(
    argv: Sequence[str], log_path: Path, extra_env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout+stderr appended to `log_path`.

    Own session: a terminal's Ctrl-C reaches only the parent, which then stops its children
    in the order it chooses.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    preexec: Callable[[], None] | None = None
    if sys.platform.startswith("linux"):
        preexec = functools.partial(die_with_parent, os.getpid())
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})},
        )
