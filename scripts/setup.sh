#!/usr/bin/env bash
# Creates or updates the project's Python environment in .venv/ (idempotent: re-installs only when
# requirements.txt or lib/pyproject.toml changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.raps3d-installed
want=$(cat requirements.txt lib/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    start=$(date +%s)
    quiet_pip() {  # hide pip's warnings about configured local package folders that do not exist
        .venv/bin/python -m pip "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
    }
    quiet_pip install --quiet --upgrade pip
    quiet_pip install --quiet -r requirements.txt
    quiet_pip install --quiet --no-deps -e lib
    echo "$want" > "$stamp"
    echo "environment installed in $(( $(date +%s) - start )) s ($(du -sh .venv | cut -f1))"
fi
