"""The `edgebus` command and demo launcher: the one composition root over services and agents.

Keep it thin: it parses arguments and wires parts that live in `bus`, `services`, `edge_agent`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgebus")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"
