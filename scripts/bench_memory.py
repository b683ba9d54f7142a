"""Peak memory of ``blda evaluate --method blda`` for many classes, against a plain evaluate.

Usage::

    python scripts/bench_memory.py                          # C = 19, 64, 128 at 4096 bins
    python scripts/bench_memory.py --classes 128 192 255 --bins 4096 1024

For each class count ``C`` and bin count ``B`` the script writes, row by row (so the script
itself stays small), a logits store of two 32x32 images with labels, a target stats file (one
group of ``(C, C, B)`` counts, as ``fit-stats --label-source pseudo`` writes) and a source stats
file holding what ``fit-stats --label-source gt`` writes (counts, calibrations and the
statistics of calibrated logits: two groups). It then runs, each in a fresh process:

- ``plain``: ``blda evaluate STORE`` (the floor: start-up, reading the store);
- ``blda``: ``blda evaluate STORE --method blda --stats TGT --anchors SRC``;

and prints each process's peak resident set size (``ru_maxrss`` of the child, from ``wait4``),
with :func:`blda_posthoc.core.align.table_memory`, the statistics' size and the whole estimate
the commands check against their memory budget before reading
(:func:`blda_posthoc.core.align.correction_memory`) for comparison. A run that the command
refuses prints its one-line error instead. ``--limit-gb`` also runs the
``blda`` process under ``RLIMIT_AS`` (address space) of that size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from blda_posthoc.core.align import correction_memory, table_memory
from blda_posthoc.io.store import StoreWriter


def write_store(path: Path, c: int) -> None:
    rng = np.random.default_rng(0)
    with StoreWriter(path, [f"k{i}" for i in range(c)], dtype="float16") as writer:
        for index in range(2):
            label = rng.integers(0, c, (32, 32)).astype(np.uint8)
            logits = rng.normal(0, 2, (c, 32, 32)).astype(np.float32)
            logits += 4 * (np.arange(c)[:, None, None] == label[None])
            writer.write(f"img_{index}", logits, label)


def write_group(group: h5py.Group, c: int, bins: int, calibrated: bool) -> None:
    """One group of statistics, ``(C, C, B)`` counts written one row at a time."""
    names = [f"k{i}" for i in range(c)]
    settings = {"labels": "gt", "min_pixels": 1, "bins": bins, "num_images": 2}
    if calibrated:
        settings["calibration"] = {"kind": "vector", "fingerprint": "0" * 16, "source": None}
    a = group.attrs
    a["class_names"], a["num_classes"], a["estimator"] = json.dumps(names), c, "hist"
    a["grid_lo"], a["grid_hi"], a["grid_bins"] = -12.0, 12.0, bins
    a["fingerprint"], a["settings"] = "0" * 16, json.dumps(settings)
    group.create_dataset("edges", data=np.linspace(-12, 12, bins + 1))
    counts = group.create_dataset(
        "cells/counts", (c, c, bins), np.int64, chunks=(1, c, bins), compression="gzip"
    )
    rng = np.random.default_rng(c)
    centre = np.arange(bins)
    for i in range(c):
        # Each cell a bump of 64 bins: positive cells high, negative cells low.
        row = np.zeros((c, bins), np.int64)
        for j in range(c):
            mid = bins * (0.7 if i == j else 0.35) + rng.integers(-bins // 16, bins // 16)
            row[j] = np.where(np.abs(centre - mid) < 32, 5, 0)
        counts[i] = row
    group.create_dataset("cells/pixels", data=np.full((c, c), 64 * 5, np.int64))
    anchors = np.zeros((2, bins), np.int64)
    anchors[0, int(0.6 * bins) : int(0.8 * bins)] = 50
    anchors[1, int(0.2 * bins) : int(0.5 * bins)] = 50
    group.create_dataset("anchors/counts", data=anchors)


def write_stats(path: Path, c: int, bins: int, with_extras: bool) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["format"], f.attrs["version"], f.attrs["created_by"] = "blda-stats", 2, "bench"
        write_group(f, c, bins, calibrated=False)
        if not with_extras:
            return
        f.create_dataset("predicted", data=np.full(c, 100, np.int64))
        conf = f.create_dataset("confidence/counts", data=np.ones((c, 64), np.int64))
        conf.attrs["lo"], conf.attrs["hi"], conf.attrs["bins"] = -6.0, 64.0, 64
        f.create_dataset("sample/logits", data=np.zeros((16, c), np.float32))
        f.create_dataset("sample/labels", data=np.arange(16, dtype=np.uint8) % c)
        f.create_dataset("calibration/vector/scale", data=np.ones(c))
        f.create_dataset("calibration/vector/bias", data=np.zeros(c))
        write_group(f.create_group("calibrated"), c, bins, calibrated=True)


def run(args: list[str], limit_gb: float | None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GiB) and the last stderr line of one fresh process."""

    def limit() -> None:
        if limit_gb is not None:
            size = int(limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "blda_posthoc", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=limit,
    )
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    lines = [line for line in err.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    tag = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {last[:160]}"
    return wall, usage.ru_maxrss / 2**20, tag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[19, 64, 128])
    parser.add_argument("--bins", type=int, nargs="+", default=[4096])
    parser.add_argument("--limit-gb", type=float, default=None)
    parser.add_argument("--extra", nargs="*", default=[], help="more options for the blda run")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="blda-bench-memory-"))
    print(f"# {os.cpu_count()} CPUs; peak RSS per fresh process (ru_maxrss)")
    print(
        "C    B      stats GiB  tables GiB (est.)  estimate GiB  plain RSS GiB  blda RSS GiB  "
        "blda s  result"
    )
    for c in options.classes:
        store = work / f"store-{c}.h5"
        write_store(store, c)
        for bins in options.bins:
            src, tgt = work / f"src-{c}-{bins}.h5", work / f"tgt-{c}-{bins}.h5"
            write_stats(src, c, bins, with_extras=True)
            write_stats(tgt, c, bins, with_extras=False)
            stats_gib = 3 * 8 * c * c * bins / 2**30  # target: one group, source: two
            tables_gib = table_memory(c, bins + 1) / 2**30
            estimate_gib = correction_memory(c, bins, groups=3) / 2**30
            _, plain, _ = run(["evaluate", str(store)], None)
            blda = ["evaluate", str(store), "--method", "blda", "--stats", str(tgt)]
            blda += ["--anchors", str(src)]
            wall, peak, tag = run(blda + options.extra, options.limit_gb)
            print(
                f"{c:<4} {bins:<6} {stats_gib:9.2f}  {tables_gib:17.2f}  {estimate_gib:12.2f}  "
                f"{plain:13.2f}  "
                f"{peak:12.2f}  {wall:6.1f}  {tag}",
                flush=True,
            )
            src.unlink()
            tgt.unlink()
        store.unlink()


if __name__ == "__main__":
    main()
