#!/usr/bin/env bash
# The GPU checks, as one short script for a lent GPU machine (run from the repository root):
# CUDA and AMP paths of the test suite, then GPU timings beside the CPU baseline in the same run.
# The lent machines hold python3 with a CUDA build of torch, h5py, click, pillow, tqdm, numpy,
# matplotlib, onnxruntime and pytest, and reach no network: nothing is installed, the package is
# used from the working tree. Usage: bash scripts/gpu_check.sh   (about 5 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-/tmp/blda-gpu}"
mkdir -p "$OUT_DIR"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
echo "== tests (the GPU tests run when CUDA is present)"
"$PY" -m pytest -q -p no:warnings -rs -p no:cacheprovider tests
echo "== correct: CPU baseline, then CUDA"
"$PY" scripts/bench_correct.py --images 3 --direct-pixels 16384 --device cpu
"$PY" scripts/bench_correct.py --images 20 --direct-pixels 16384 --device cuda
echo "== every compute command on CPU and CUDA, one table (and CUDA vs CPU predictions)"
"$PY" scripts/bench_commands.py --images 8 --size 512x1024 --classes 19 --devices cpu,cuda
echo "== Cityscapes size (19x256x512 logits, 1024x2048 labels): every command on CPU and CUDA, one table;"
echo "   compare's figures on CUDA must agree with CPU's (exit 1 otherwise)"
"$PY" scripts/bench_realsize.py --images 2 --devices cpu,cuda --check-agreement --json "$OUT_DIR/realsize.json"
echo "== dump-logits on CUDA, fp32 and fp16 autocast"
"$PY" scripts/bench_dump.py --device cuda --images 100 --batch-size 4 --repeat 1
"$PY" scripts/bench_dump.py --device cuda --images 100 --batch-size 4 --repeat 1 --precision fp16
echo "== demo on CUDA"
"$PY" -m blda_posthoc demo --workdir "$OUT_DIR/demo" --overwrite --device cuda
