"""Benchmark ``fit-stats`` against plainly reading the same store.

Usage::

    python scripts/bench_fit.py                      # 32 images of 19x256x512, float16, gt labels
    python scripts/bench_fit.py --labels pseudo --repeat 5
    python scripts/bench_fit.py --logits-scale 4     # logits at 1/4 of the image size (resized)

The script writes a float16 gzip store of synthetic logits (smooth class maps plus noise, about
as compressible as real logits) with label maps, then measures in the same run:

- ``in-process``: :func:`blda_posthoc.pipelines.fit_stats.fit_store` on the open store, what
  ``blda fit-stats`` runs after start-up; reported as logit values binned per second (``C x H x W``
  per image at the image size) and CPU seconds;
- ``fit-stats``: the whole ``blda fit-stats STORE --out ...`` in a fresh process (start-up, reading,
  fitting, writing the statistics);
- ``read``: a fresh process that imports torch and h5py and reads every logits dataset of the
  store (the floor any tool reading this store in Python with torch pays);
- two parts in the script's process: reading every image with ``LogitStore.read`` with one torch
  thread and with all of them (chunks decompressed in that many threads), and the three
  calibration fits on the calibration sample.

The two processes alternate ``--repeat`` times; the best wall time of each is compared (all runs
are listed) and the peak resident set size of each process (``ru_maxrss``) is printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# As the blda command line does before torch starts its OpenMP threads (docs/scaling.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from blda_posthoc.io.store import LogitStore, StoreWriter  # noqa: E402
from blda_posthoc.pipelines.fit_stats import (  # noqa: E402
    FitOptions,
    calibration_sample,
    fit_calibrations,
    fit_store,
)

READ_ONLY = """
import sys, torch, h5py
with h5py.File(sys.argv[1], "r") as f:
    for group in f["images"].values():
        group["logits"][()]
"""


def write_store(path: Path, images: int, classes: int, size: tuple[int, int], scale: int) -> None:
    """Synthetic logits: blocky class maps, smooth per-class fields and noise, float16."""
    rng = np.random.default_rng(0)
    h, w = size
    lh, lw = h // scale, w // scale
    with StoreWriter(path, [f"class{i}" for i in range(classes)], overwrite=True) as writer:
        for i in range(images):
            blocks = rng.integers(0, classes, (max(1, h // 32), max(1, w // 32)))
            label = torch.from_numpy(blocks).repeat_interleave(32, 0).repeat_interleave(32, 1)
            label = F.pad(label, (0, w - label.shape[1], 0, h - label.shape[0]), value=0)
            base = torch.from_numpy(rng.normal(0, 2, (1, classes, lh // 8 + 1, lw // 8 + 1)))
            z = F.interpolate(base.float(), size=(lh, lw), mode="bilinear", align_corners=False)[0]
            z += torch.from_numpy(rng.normal(0, 0.3, (classes, lh, lw)).astype(np.float32))
            small = label[::scale, ::scale][:lh, :lw]
            z.scatter_add_(0, small[None], torch.full((1, lh, lw), 5.0))
            y = label.numpy().astype(np.uint8)
            y[rng.random((h, w)) < 0.02] = 255
            writer.write(f"img_{i:04d}", z.numpy(), y, size=(h, w))


def report_parts(store_path: Path, repeat: int) -> None:
    """Time two parts in this process: reading every image, and the three calibration fits.

    Reading: :meth:`LogitStore.read` of every image with 1 torch thread (chunks decompressed in
    the calling thread) and with this process's torch threads (chunks decompressed in a pool
    that many threads wide). Calibrations: temperature, vector scaling and bias fitted on the
    calibration sample ``fit-stats --label-source gt`` draws (its labelled pixels).
    """
    threads = torch.get_num_threads()
    timings = {}
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        runs = []
        for _ in range(repeat):
            with LogitStore([store_path]) as store:
                start = time.perf_counter()
                for name in store.names:
                    store.read(name, with_label=False)
                runs.append(time.perf_counter() - start)
        timings[count] = min(runs)
    torch.set_num_threads(threads)
    line = ", ".join(f"{t:.2f} s with {n} thread{'s' if n > 1 else ''}" for n, t in timings.items())
    ratio = timings[1] / timings[threads] if threads > 1 else 1.0
    print(f"read every image (LogitStore.read, best of {repeat}): {line} ({ratio:.2f}x)")
    with LogitStore([store_path]) as store:
        if not store.has_labels():
            return

        def images(names: Sequence[str] | None):  # the (name, logits, labels) fit-stats uses
            for record, z in store.iter_images(names, with_label=True):
                yield record.name, z, torch.from_numpy(record.label).long()

        sample = calibration_sample(images, store.names, store.num_classes, seed=0)
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fit_calibrations(sample)
        runs.append(time.perf_counter() - start)
    print(
        f"calibration fits (temperature, vector, bias) on {sample.labels.size} pixels: "
        f"best {min(runs):.3f} s"
    )


# A small launcher times the command and reads its peak RSS: a child forked from this (large)
# process would report this process's peak RSS as its own.
LAUNCHER = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"{wall} {peak}", file=sys.stderr)
sys.exit(code)
"""


def run_child(args: list[str]) -> tuple[float, float]:
    """Run a process; return its wall seconds and peak RSS in MiB."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stderr}")
    wall, peak_kib = proc.stderr.strip().splitlines()[-1].split()
    return float(wall), float(peak_kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--size", default="256x512", help="image size HxW")
    parser.add_argument("--logits-scale", type=int, default=1, help="logits at 1/SCALE size")
    parser.add_argument("--labels", choices=("gt", "pseudo"), default="gt")
    parser.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with gt labels: also fit the calibrations and calibrated statistics (second "
        "pass), as fit-stats does by default",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="write the store here and keep it")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        store_path = args.keep or Path(tmp) / "bench.h5"
        write_store(store_path, args.images, args.classes, (h, w), args.logits_scale)
        values = args.images * args.classes * h * w
        mib = store_path.stat().st_size / 2**20
        print(
            f"store: {args.images} images, {args.classes} classes, logits "
            f"{h // args.logits_scale}x{w // args.logits_scale} float16 for {h}x{w} images, "
            f"{mib:.0f} MiB; {values / 1e6:.1f} M logit values at image size; "
            f"labels={args.labels}, calibrate={args.calibrate and args.labels == 'gt'}; "
            f"torch threads {torch.get_num_threads()}, "
            f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
        )

        options = FitOptions(labels=args.labels, calibrate=args.calibrate)
        in_process = []
        for _ in range(args.repeat):
            with LogitStore([store_path]) as store:
                wall, cpu = time.perf_counter(), time.process_time()
                stats = fit_store(store, options)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            in_process.append((wall, cpu))
            assert stats.counts.sum() > 0
        best_wall, best_cpu = min(in_process)
        print(
            f"in-process fit_store: {values / best_wall / 1e6:.1f} M values/s "
            f"(best {best_wall:.2f} s wall, {best_cpu:.2f} s CPU; runs "
            + ", ".join(f"{t:.2f}" for t, _ in in_process)
            + ")"
        )

        report_parts(store_path, args.repeat)

        out = Path(tmp) / "stats.h5"
        blda = [sys.executable, "-m", "blda_posthoc", "fit-stats", str(store_path)]
        fit_cmd = [*blda, "--labels", args.labels, "--out", str(out), "--overwrite"]
        if not args.calibrate:
            fit_cmd.append("--no-calibrate")
        read_cmd = [sys.executable, "-c", READ_ONLY, str(store_path)]
        fits, reads = [], []
        for _ in range(args.repeat):
            reads.append(run_child(read_cmd))
            fits.append(run_child(fit_cmd))
        fit_best, read_best = min(fits), min(reads)
        print(
            f"process `blda fit-stats`: best {fit_best[0]:.2f} s, peak RSS "
            f"{max(r for _, r in fits):.0f} MiB (runs {', '.join(f'{t:.2f}' for t, _ in fits)})"
        )
        print(
            f"process import torch + h5py read: best {read_best[0]:.2f} s, peak RSS "
            f"{max(r for _, r in reads):.0f} MiB (runs {', '.join(f'{t:.2f}' for t, _ in reads)})"
        )
        print(f"ratio fit-stats / read: {fit_best[0] / read_best[0]:.2f}")
        self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"this process (store writing + in-process fits): peak RSS {self_rss:.0f} MiB")


if __name__ == "__main__":
    main()
