#!/usr/bin/env bash
# The two entry points of the README, each self-contained on a fresh machine:
#   ./run.sh demo   - the embedded demo (center + sites + devices), Ctrl-C stops it
#   ./run.sh test   - lint, type-check and the whole test suite against real servers
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY=${PYTHON:-python3}

setup_python() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    # Re-install only when the project definition changed since the last install.
    local stamp="$VENV/.edgebus-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install --quiet -e ".[dev,bench]"
        touch "$stamp"
    fi
}

setup_mosquitto() {
    # Tests start their own mosquitto instances; the Debian package provides the binary.
    if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
        local sudo=""
        if [ "$(id -u)" != "0" ]; then sudo="sudo"; fi
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
    fi
}

case "${1:-}" in
    demo)
        shift
        setup_python
        exec "$VENV/bin/edgebus" demo "$@"
        ;;
    test)
        shift
        setup_python
        setup_mosquitto
        "$VENV/bin/ruff" check bus schemas services edge_agent edgebus tests bench
        "$VENV/bin/mypy" --strict bus schemas
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: ./run.sh demo | test [pytest args]" >&2
        exit 2
        ;;
esac
