#!/usr/bin/env bash
# Create a private virtual environment, install the package with its test extras, run the suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BLDA_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# The CPU build of torch first: a bare requirement would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/ruff" check blda_posthoc tests scripts
"$VENV/bin/ruff" format --check blda_posthoc tests scripts
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest "$@"
