#!/usr/bin/env bash
# The GPU checks, as one short script for a lent GPU machine (run from the repository root):
# CUDA and AMP paths of the test suite, then GPU timings beside the CPU baseline in the same run.
# Usage: bash scripts/gpu_check.sh   (about 5 minutes; writes nothing outside /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BLDA_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# On the GPU machine a CUDA build of torch is wanted: take what pip resolves there.
"$VENV/bin/python" -m pip install -q torch || true
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
echo "== tests (GPU tests included when CUDA is present)"
"$VENV/bin/python" -m pytest -q -p no:warnings -rs tests
echo "== correct: CPU baseline, then CUDA"
"$VENV/bin/python" scripts/bench_correct.py --images 3 --direct-pixels 16384 --device cpu
"$VENV/bin/python" scripts/bench_correct.py --images 20 --direct-pixels 16384 --device cuda
echo "== dump-logits on CUDA, fp32 and fp16 autocast"
"$VENV/bin/python" scripts/bench_dump.py --device cuda --images 100 --batch-size 4 --repeat 1
"$VENV/bin/python" scripts/bench_dump.py --device cuda --images 100 --batch-size 4 --repeat 1 \
    --precision fp16
echo "== demo on CUDA"
"$VENV/bin/blda" demo --workdir /tmp/blda-demo-gpu --overwrite --device cuda
