#!/usr/bin/env bash
# Sets up the environment and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-system.sh  # Debian packages of the viewer tests (Orthanc + DICOMweb, Chromium), when missing
bash scripts/setup.sh
# Tests that need real CT read it from RAPS3D_DATA (default: the shared data folder beside the project).
exec .venv/bin/python -m pytest -q tests "$@"
