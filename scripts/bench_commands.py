"""Time every compute command on CPU and (when present) CUDA, in one run, as one table.

Builds a synthetic labelled store (random biased logits, blob labels) with `blda import-logits`,
then runs `fit-stats` (gt and pseudo), `correct`, `relabel` and `compare` as real subprocesses on
each device and checks that the CUDA predictions equal the CPU ones (within float tolerance: the
share of differing pixels is printed).

    .venv/bin/python scripts/bench_commands.py [--images 8] [--size 256x512] [--classes 19]
        [--devices cpu,cuda]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_case(root: Path, images: int, size: tuple[int, int], classes: int) -> Path:
    rng = np.random.default_rng(0)
    h, w = size
    bias = np.linspace(-1.0, 1.0, classes).astype(np.float32)
    for i in range(images):
        label = np.zeros((h, w), np.uint8)
        for _ in range(3 * classes):
            c = int(rng.integers(0, classes))
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            label[y : y + int(rng.integers(4, h // 2)), x : x + int(rng.integers(4, w // 2))] = c
        logits = rng.normal(0, 1.5, (classes, h, w)).astype(np.float32) + bias[:, None, None]
        logits[label, np.arange(h)[:, None], np.arange(w)[None, :]] += 3.0
        (root / "logits").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        np.save(root / "logits" / f"img_{i:03d}.npy", logits)
        Image.fromarray(label).save(root / "labels" / f"img_{i:03d}.png")
    return root


def blda(*args: object) -> float:
    start = time.perf_counter()
    command = [sys.executable, "-m", "blda_posthoc", *(str(a) for a in args)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", default="256x512")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--devices", default="cpu,cuda")
    args = parser.parse_args()
    import torch

    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    h, w = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = write_case(Path(tmp) / "case", args.images, (h, w), args.classes)
        store = Path(tmp) / "s.h5"
        blda("import-logits", root / "logits", "--labels", root / "labels", "--out", store)
        rows: dict[str, dict[str, float]] = {}
        for dev in devices:
            out = Path(tmp) / dev
            steps = {
                "fit-stats --labels gt": (
                    "fit-stats",
                    store,
                    "--label-source",
                    "gt",
                    "--out",
                    out / "src.h5",
                ),
                "fit-stats --labels pseudo": (
                    "fit-stats",
                    store,
                    "--label-source",
                    "pseudo",
                    "--calibration",
                    out / "src.h5",
                    "--out",
                    out / "tgt.h5",
                ),
                "correct (blda)": (
                    "correct",
                    store,
                    "--stats",
                    out / "tgt.h5",
                    "--anchors",
                    out / "src.h5",
                    "--out-dir",
                    out / "pred",
                ),
                "relabel --keep-portion": (
                    "relabel",
                    store,
                    "--stats",
                    out / "tgt.h5",
                    "--anchors",
                    out / "src.h5",
                    "--keep-portion",
                    "0.5",
                    "--out-dir",
                    out / "pl",
                ),
                "compare (all methods)": (
                    "compare",
                    store,
                    "--stats",
                    out / "tgt.h5",
                    "--anchors",
                    out / "src.h5",
                    "--json",
                    out / "c.json",
                ),
            }
            for name, step in steps.items():
                rows.setdefault(name, {})[dev] = blda(*step, "--device", dev)
        pixels = args.images * h * w
        print(f"{args.images} images of {args.classes}x{h}x{w} ({pixels / 1e6:.1f} Mpix)")
        print("| command | " + " | ".join(f"{d} s" for d in devices) + " |")
        print("|---|" + "---|" * len(devices))
        for name, times in rows.items():
            print(f"| {name} | " + " | ".join(f"{times[d]:.1f}" for d in devices) + " |")
        if "cuda" in devices:
            first = Path(tmp) / "cpu" / "pred"
            differ = total = 0
            for png in sorted(first.glob("*.png")):
                a = np.asarray(Image.open(png))
                b = np.asarray(Image.open(Path(tmp) / "cuda" / "pred" / png.name))
                differ += int((a != b).sum())
                total += a.size
            print(f"CUDA vs CPU predictions: {100 * differ / max(total, 1):.4f} % pixels differ")


if __name__ == "__main__":
    main()
