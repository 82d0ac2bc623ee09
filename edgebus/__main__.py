"""`python -m edgebus`: the same command line as the `edgebus` script.

The demo starts its sites this way, so it never depends on the script being on PATH.
"""

from edgebus.cli import app

app(prog_name="edgebus")
