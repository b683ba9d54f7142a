#!/usr/bin/env bash
# From a fresh clone: create a private virtual environment, install the package, run `blda demo`.
# Usage: bash scripts/demo.sh [blda demo options, e.g. --workdir DIR --overwrite]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BLDA_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# The CPU build of torch first: a bare requirement would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[plot]"
exec "$VENV/bin/blda" demo "$@"
