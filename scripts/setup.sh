#!/usr/bin/env bash
# Creates or updates the project's Python environment in .venv/ (idempotent: re-installs only when
# requirements.txt or lib/pyproject.toml changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    rm -rf .venv  # absent, or left without pip by a creation that failed
    echo "creating .venv with $("$PYTHON" --version)"
    if ! "$PYTHON" -m venv .venv; then
        rm -rf .venv
        echo "cannot create .venv: $PYTHON has no working venv module (Debian: apt-get install python3.11-venv)" >&2
        exit 1
    fi
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
