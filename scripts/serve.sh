#!/usr/bin/env bash
# Starts the MONAI Label server with the Raps-3D app on the sample data and the shipped default model.
# Usage: scripts/serve.sh [STUDIES] [extra monailabel start_server arguments]
#   STUDIES: a folder of NIfTI CT volumes or a DICOMweb URL (default: sample-data/images)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
studies=${1:-sample-data/images}
shift || true
exec .venv/bin/python -m monailabel.main start_server --app apps/raps3d --studies "$studies" \
    --host "${RAPS3D_HOST:-127.0.0.1}" --port "${RAPS3D_PORT:-8000}" "$@"
