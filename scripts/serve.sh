#!/usr/bin/env bash
# Starts the MONAI Label server with the Raps-3D app on the sample data and the shipped default model.
# Usage: scripts/serve.sh [STUDIES] [extra monailabel start_server arguments]
#   STUDIES: a folder of CT volumes or a DICOMweb URL (default: sample-data/images); arguments that start with "-"
#   all go to start_server (e.g. scripts/serve.sh --conf device cuda)
set -euo pipefail
caller=$(pwd)
cd "$(dirname "$0")/.."
studies=sample-data/images
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
    studies=$1
    shift
    case "$studies" in
        http://* | https://*) ;;
        *) studies=$(cd "$caller" && realpath -m -- "$studies") ;;  # relative to where the script was called
    esac
fi
bash scripts/setup.sh
exec .venv/bin/python -m monailabel.main start_server --app apps/raps3d --studies "$studies" \
    --host "${RAPS3D_HOST:-127.0.0.1}" --port "${RAPS3D_PORT:-8000}" "$@"
