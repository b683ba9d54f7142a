#!/usr/bin/env bash
# The GPU checks, as one short script for a lent GPU machine (run from the repository root):
# the Cityscapes-size benchmark on CPU and CUDA side by side (with a CPU-vs-CUDA agreement check
# of compare's figures), the test suite (its CLI tests run on CUDA there, since --device defaults
# to auto), then the smaller GPU timings beside their CPU baselines.
# The lent machines hold python3 with a CUDA build of torch, h5py, click, pillow, tqdm, numpy,
# matplotlib, onnxruntime, hypothesis, pytest and pytest-xdist, and reach no network: nothing is
# installed, the package is used from the working tree.
# Every section has its own time limit and a failing section does not stop the next one; each
# section's output is kept in $OUT (default /tmp/blda-gpu) and the script exits 1 if any failed.
# Usage: bash scripts/gpu_check.sh   (about 6 minutes; BLDA_GPU_DEVICE=cpu runs it without a GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
DEV="${BLDA_GPU_DEVICE:-cuda}"
OUT_DIR="${OUT:-/tmp/blda-gpu}"
mkdir -p "$OUT_DIR"
failed=()

section() {  # section NAME SECONDS COMMAND...: run COMMAND under a time limit, log to $OUT_DIR
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "-- $name: exit $rc in $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
nproc
section realsize 200 "$PY" scripts/bench_realsize.py --images 4 --devices "cpu,$DEV" \
    --check-agreement --json "$OUT_DIR/realsize.json"
workers=()  # one torch thread per test process: 16 threads in each of 15 workers crawl
"$PY" -c "import xdist" 2>/dev/null && workers=(-n "$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))")
section tests 150 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" -m pytest -p no:warnings \
    -p no:cacheprovider -p no:benchmark -rfEs --tb=short "${workers[@]}" tests
section correct 45 bash -c "'$PY' scripts/bench_correct.py --images 3 --direct-pixels 16384 \
    --device cpu && '$PY' scripts/bench_correct.py --images 20 --direct-pixels 16384 --device $DEV"
section commands 90 "$PY" scripts/bench_commands.py --images 2 --size 512x1024 --classes 19 \
    --devices "cpu,$DEV"
section dump 90 bash -c "'$PY' scripts/bench_dump.py --device $DEV --images 50 --batch-size 4 \
    --repeat 1 && '$PY' scripts/bench_dump.py --device $DEV --images 50 --batch-size 4 \
    --repeat 1 --precision tf32 && '$PY' scripts/bench_dump.py --device $DEV --images 50 \
    --batch-size 4 --repeat 1 --precision fp16"
section demo 60 "$PY" -m blda_posthoc demo --workdir "$OUT_DIR/demo-run" --overwrite --device "$DEV"
rm -rf "$OUT_DIR/demo-run"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED sections: ${failed[*]}"
    exit 1
fi
echo "all sections passed"
