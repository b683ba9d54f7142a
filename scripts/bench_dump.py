"""Benchmark ``dump-logits`` against a bare forward loop of the same model over the same images.

Usage::

    python scripts/bench_dump.py                  # CPU defaults (below)
    python scripts/bench_dump.py --serial         # also time dump without any overlap
    python scripts/bench_dump.py --device cuda --images 200 --batch-size 4

The script writes synthetic street-like PNGs (default 20 images of 512x1024) and a TorchScript
CNN: a stride-4 conv stem, ``--depth`` (4) 3x3 conv layers of ``--channels`` (256) channels at
1/4 resolution and a 1x1 classifier to ``--classes`` (19); about 87 G multiply-adds per image,
logits at 1/4 resolution as with most segmenters (a SegFormer-B5/DAFormer-class model costs
several times more). It then times, each in a fresh subprocess so that memory is per phase:

- ``bare``: read each image, normalise, forward, fetch the output (no store, no resize);
- ``dump``: :func:`blda_posthoc.pipelines.dump_logits.dump_logits`, what ``blda dump-logits``
  runs: decoding in
  worker processes, forward, logits kept at the model's resolution (``--logits-scale native``,
  the default; ``--logits-scale 1`` resizes them to full resolution), float16, chunks compressed by
  encoder threads and written by a writer thread;
- ``dump-serial`` (with ``--serial``): the same with decoding and writing in the main thread.

Both phases load the model and run one warm-up forward before the clock starts. Reported: wall
time (best of ``--repeat`` alternating runs, all runs listed), CPU seconds of the process and its
decoding workers (less sensitive to other load on the machine than wall time), peak resident
set size of the main process (``ru_maxrss``; the forked workers hold one batch each), and on
CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from blda_posthoc.core.infer import Preprocess, normalize
from blda_posthoc.io.images import read_rgb
from blda_posthoc.io.models import load_model
from blda_posthoc.pipelines.dump_logits import DumpOptions, collect_items, dump_logits

PHASES = ("bare", "dump", "dump-serial")


class BenchNet(nn.Module):
    """Stride-4 stem, ``depth`` 3x3 conv layers at 1/4 resolution, 1x1 classifier."""

    def __init__(self, num_classes: int, channels: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, channels // 2, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        ]
        for _ in range(depth):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(channels, num_classes, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def gflops(args: argparse.Namespace) -> float:
    """Multiply-adds of one forward pass, in G (convolutions only)."""
    h, w, c = args.height, args.width, args.channels
    px2, px4 = (h // 2) * (w // 2), (h // 4) * (w // 4)
    macs = px2 * 3 * (c // 2) * 9 + px4 * (c // 2) * c * 9
    macs += args.depth * px4 * c * c * 9 + px4 * c * args.classes
    return macs / 1e9


def make_images(folder: Path, count: int, height: int, width: int) -> None:
    """Write ``count`` smooth, street-like RGB PNGs (low-frequency colour fields plus noise)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        coarse = rng.uniform(0, 255, size=(1, 3, height // 32, width // 32)).astype(np.float32)
        field = torch.nn.functional.interpolate(
            torch.from_numpy(coarse), size=(height, width), mode="bilinear", align_corners=False
        )[0].permute(1, 2, 0)
        pixels = field.numpy() + rng.normal(0, 6, size=(height, width, 3))
        image = np.clip(pixels, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"img_{index:04d}.png")


def make_model(path: Path, args: argparse.Namespace) -> None:
    """Save a TorchScript :class:`BenchNet` with fixed random weights."""
    torch.manual_seed(0)
    model = BenchNet(args.classes, args.channels, args.depth).eval()
    torch.jit.script(model).save(str(path))


def peak_rss_mb(who: int) -> float:
    """Peak resident set size in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(who).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (decoding workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def run_bare(work: Path, args: argparse.Namespace) -> float:
    """Time read + normalise + forward over all images; return seconds."""
    device = torch.device(args.device)
    model = load_model(str(work / "model.pt"), None, device).forward
    paths = sorted((work / "images").glob("*.png"))
    pre = DumpOptions(out=work / "unused.h5").preprocess

    def forward(batch: list[Path]) -> None:
        pixels = torch.stack([torch.from_numpy(read_rgb(p).copy()) for p in batch]).to(device)
        with torch.inference_mode():
            model(normalize(pixels, pre)).cpu()

    forward(paths[:1])
    start = time.perf_counter()
    for first in range(0, len(paths), args.batch_size):
        forward(paths[first : first + args.batch_size])
    return time.perf_counter() - start


def run_dump(work: Path, args: argparse.Namespace) -> float:
    """Time :func:`dump_logits` over all images; return seconds.

    Phase ``dump-serial`` turns the overlap off (decoding and writing in the main thread).
    """
    device = torch.device(args.device)
    model = load_model(str(work / "model.pt"), None, device).forward
    items = collect_items(work / "images")
    out = work / "bench.h5"
    scale = None if args.logits_scale == "native" else float(args.logits_scale)
    options = DumpOptions(
        out=out,
        preprocess=Preprocess(logits_scale=scale),
        num_classes=args.classes,
        device=device,
        batch_size=args.batch_size,
        precision=args.precision,
        dtype=args.dtype,
        workers=0 if args.phase == "dump-serial" else args.workers,
        queue_size=0 if args.phase == "dump-serial" else 4,
        overwrite=True,
    )
    warm = DumpOptions(
        out=work / "warm.h5", num_classes=args.classes, device=device, overwrite=True
    )
    dump_logits(model, items[:1], warm)
    start = time.perf_counter()
    dump_logits(model, items, options)
    return time.perf_counter() - start


def phase(args: argparse.Namespace) -> None:
    """Run one phase in this process and print its figures as JSON."""
    work = Path(args.work)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = (run_bare if args.phase == "bare" else run_dump)(work, args)
    result = {
        "phase": args.phase,
        "seconds": seconds,
        "rss_mb": peak_rss_mb(resource.RUSAGE_SELF),
        "cpu_s": cpu_seconds(),
        "cuda_mb": (
            torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else 0.0
        ),
    }
    print(json.dumps(result))


def child(work: Path, name: str, args: argparse.Namespace) -> dict[str, float]:
    """Run a phase in a fresh interpreter; return its JSON figures."""
    command = [sys.executable, __file__, "--phase", name, "--work", str(work)]
    for key in ("images", "height", "width", "classes", "channels", "depth", "device"):
        command += [f"--{key}", str(getattr(args, key))]
    command += ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    command += [
        "--precision",
        args.precision,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--logits-scale",
        args.logits_scale,
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, rows: dict[str, list[dict[str, float]]]) -> None:
    """Print the table and the overhead ratio (best of the repeats for each phase)."""
    best = {name: min(runs, key=lambda r: r["seconds"]) for name, runs in rows.items()}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"\n{args.images} images {args.height}x{args.width}, {args.classes} classes, "
        f"model {gflops(args):.1f} GMAC/image, batch {args.batch_size}, "
        f"workers {args.workers}, {args.precision}, store {args.dtype}, {device}, "
        f"{torch.get_num_threads()} torch threads, best of {args.repeat}"
    )
    print(f"{'phase':<11} {'wall s':>8} {'img/s':>7} {'CPU s':>7} {'RSS MiB':>8} {'CUDA MiB':>9}")
    for name, r in best.items():
        print(
            f"{name:<11} {r['seconds']:8.2f} {args.images / r['seconds']:7.2f} {r['cpu_s']:7.1f} "
            f"{r['rss_mb']:8.0f} {r['cuda_mb']:9.0f}"
        )
    for name in names_after_bare(best):
        ratio = best[name]["seconds"] / best["bare"]["seconds"]
        print(f"overhead: {name} / bare = {ratio:.3f} ({100 * (ratio - 1):+.1f}%)")
    print("all runs (s):", {k: [round(r["seconds"], 2) for r in v] for k, v in rows.items()})


def names_after_bare(best: dict[str, dict[str, float]]) -> list[str]:
    """The dump phases that were run."""
    return [name for name in best if name != "bare"]


def parse() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=20, help="number of images (default 20)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--channels", type=int, default=256, help="conv width at 1/4 resolution")
    p.add_argument("--depth", type=int, default=4, help="3x3 conv layers at 1/4 resolution")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--logits-scale", default="native", help="native or a fraction in (0, 1]")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--repeat", type=int, default=2, help="alternating runs of each phase")
    p.add_argument("--work", default=None, help="keep the images and model in this folder")
    p.add_argument("--serial", action="store_true", help="also time dump without overlap")
    p.add_argument("--phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    """Set up the images and model, run both phases alternately, report."""
    args = parse()
    if args.phase is not None:
        phase(args)
        return
    with tempfile.TemporaryDirectory(prefix="blda-bench-") as tmp:
        work = Path(args.work or tmp)
        if not (work / "model.pt").exists():
            make_images(work / "images", args.images, args.height, args.width)
            make_model(work / "model.pt", args)
        names = PHASES if args.serial else PHASES[:2]
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for _ in range(args.repeat):
            for name in names:
                rows[name].append(child(work, name, args))
                print(f"{name}: {rows[name][-1]['seconds']:.2f} s", file=sys.stderr)
        report(args, rows)


if __name__ == "__main__":
    main()
