"""Every compute command at Cityscapes size, as real subprocesses, in one run: seconds and memory.

Builds a seeded synthetic 19-class store like a Cityscapes val dump: logits at the model's 1/4
resolution (19 x 256 x 512, float16) and 1024 x 2048 trainId labels (blobs, some ignore), then
fits the quickstart statistics (source ground truth with calibrations; target pseudo-labels with
``--calibration``) and runs ``correct`` (none, blda, calibrated-blda), ``compare`` (the default
grid; strided too when the command has ``--pixel-stride``), ``relabel`` (every pixel, and
``--keep-portion 0.8``) and the two ``fit-stats``
steps, each as its own ``blda`` process. Per step it prints seconds per image, the ratio to
``correct --method none`` of the same run, the process's peak RSS (``wait4``'s ``ru_maxrss``),
its CPU seconds per wall second (under 1 on a busy machine), and the time it would take for
500 (Cityscapes val) and 2,975 (Cityscapes train) images. Load averages before and after are
printed with the table: the ratios, measured side by side, are what to compare across runs.

With ``--devices cpu,cuda`` every step runs on each device, one column each, and compare's
figures on CUDA are checked against CPU's (``--check-agreement`` makes a difference an error).

    .venv/bin/python scripts/bench_realsize.py [--images 4] [--devices cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

C = 19
LOGIT_SIZE = (256, 512)
LABEL_SIZE = (1024, 2048)


def synthetic_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(C, h, w)`` float16 logits and ``(H, W)`` uint8 labels of one street-like image.

    Labels are rectangles of random classes (class frequencies skewed like a street scene) with
    a thin ignore border; the logits favour the label's class at 1/4 resolution, with noise
    and a per-class bias so that BLDA has something to correct.
    """
    h, w = LOGIT_SIZE
    label_small = np.zeros((h, w), np.uint8)
    shares = np.linspace(3.0, 0.3, C)
    shares /= shares.sum()
    for _ in range(6 * C):
        c = int(rng.choice(C, p=shares))
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        label_small[y : y + int(rng.integers(8, h // 3)), x : x + int(rng.integers(8, w // 3))] = c
    bias = np.linspace(-1.0, 1.0, C, dtype=np.float32)
    logits = rng.normal(0.0, 1.5, (C, h, w)).astype(np.float32) + bias[:, None, None]
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    logits[label_small, rows, cols] += 3.0
    label = np.repeat(np.repeat(label_small, 4, 0), 4, 1)
    label[:, :8] = 255
    label[-8:, :] = 255
    return logits.astype(np.float16), label


def write_store(path: Path, images: int, seed: int) -> None:
    """The seeded synthetic store (see :func:`synthetic_image`)."""
    from blda_posthoc.io.store import StoreWriter

    rng = np.random.default_rng(seed)
    names = [f"city_{i:04d}" for i in range(images)]
    with StoreWriter(path, [f"class{i}" for i in range(C)]) as writer:
        for name in names:
            logits, label = synthetic_image(rng)
            writer.write(name, logits, label=label, size=LABEL_SIZE)


def run(args: list[str], *, threads: int | None) -> dict[str, float]:
    """Run ``blda ARGS`` as a process; its wall seconds, CPU seconds and peak RSS (MB)."""
    command = [sys.executable, "-m", "blda_posthoc", *args]
    if threads is not None:
        command += ["--threads", str(threads)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all children).
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    out = process.stdout.read().decode() if process.stdout else ""
    err = process.stderr.read().decode() if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}\n{out}\n{err}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024.0,  # Linux: kilobytes
    }


def has_option(command: str, option: str) -> bool:
    """Whether ``blda COMMAND`` takes ``option`` (so the script also runs on older versions)."""
    done = subprocess.run(
        [sys.executable, "-m", "blda_posthoc", command, "-h"], capture_output=True, text=True
    )
    return option in done.stdout


def steps(
    store: Path, out: Path, device: str, stride: int, methods: list[str] | None = None
) -> dict[str, list[str]]:
    """The commands timed, by row name (fit-stats first: the others read their files).

    Each of ``methods`` (a ``--methods`` value) adds a compare row with that list (and a
    strided one), so that two versions with different default grids are timed on one grid.
    """
    src, tgt = out / "src.h5", out / "tgt.h5"
    stats = ["--stats", str(tgt), "--anchors", str(src)]
    dev = ["--device", device]
    plan = {
        "fit-stats --label-source gt": [
            "fit-stats", str(store), "--label-source", "gt", "--out", str(src), *dev
        ],
        "fit-stats pseudo --calibration": [
            "fit-stats", str(store), "--label-source", "pseudo", "--calibration", str(src),
            "--out", str(tgt), *dev,
        ],
        "correct --method none": [
            "correct", str(store), "--method", "none", "--out-dir", str(out / "none"), *dev
        ],
        "correct blda (tau 0.2)": [
            "correct", str(store), *stats, "--method", "blda", "--out-dir", str(out / "blda"),
            *dev,
        ],
        "correct calibrated-blda (tau 0.2)": [
            "correct", str(store), *stats, "--method", "calibrated-blda", "--out-dir",
            str(out / "cblda"), *dev,
        ],
        "relabel (blda, every pixel)": [
            "relabel", str(store), *stats, "--method", "blda", "--out-dir", str(out / "pl-all"),
            *dev,
        ],
        "relabel --keep-portion 0.8": [
            "relabel", str(store), *stats, "--method", "blda", "--keep-portion", "0.8",
            "--out-dir", str(out / "pl"), *dev,
        ],
        "compare (default grid)": [
            "compare", str(store), *stats, "--json", str(out / "compare.json"), *dev
        ],
    }  # fmt: skip
    if stride > 1 and has_option("compare", "--pixel-stride"):
        plan[f"compare --pixel-stride {stride}"] = [
            "compare", str(store), *stats, "--pixel-stride", str(stride), "--json",
            str(out / f"compare-s{stride}.json"), *dev,
        ]  # fmt: skip
    for k, value in enumerate(methods or []):
        label = f"compare --methods ({len(value.split(','))} methods)"
        grid = ["--methods", value]
        plan[label] = [
            "compare", str(store), *stats, *grid, "--json", str(out / f"compare-m{k}.json"), *dev,
        ]  # fmt: skip
        if stride > 1 and has_option("compare", "--pixel-stride"):
            plan[f"{label} --pixel-stride {stride}"] = [
                "compare", str(store), *stats, *grid, "--pixel-stride", str(stride), "--json",
                str(out / f"compare-m{k}-s{stride}.json"), *dev,
            ]  # fmt: skip
    return plan


def compare_rows(path: Path) -> dict[str, Any]:
    """``(method, tau, auto) -> miou`` and the selected row of a compare report."""
    report = json.loads(path.read_text())
    rows = {f"{r['method']} {r['tau']} {r['auto']}": r["miou"] for r in report["rows"]}
    sel = report["selected"]
    return {"rows": rows, "selected": f"{sel['method']} {sel['tau']} {sel['auto']}"}


def hours(seconds: float) -> str:
    """``1 h 05 min`` / ``12 min`` / ``40 s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--devices", default="cpu", help="comma-separated: cpu,cuda")
    parser.add_argument("--stride", type=int, default=4, help="compare --pixel-stride row")
    parser.add_argument("--threads", type=int, default=None, help="--threads of every command")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None, help="comma-separated row-name prefixes to run")
    parser.add_argument(
        "--methods",
        action="append",
        default=None,
        help="also time compare --methods VALUE (repeatable; e.g. another version's default)",
    )
    parser.add_argument("--json", dest="json_path", type=Path, default=None)
    parser.add_argument(
        "--check-agreement",
        action="store_true",
        help="exit 1 when compare's figures differ between devices",
    )
    args = parser.parse_args()
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if any(d.startswith("cuda") for d in devices):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --devices asks for cuda but CUDA is not available here")
    load_before = os.getloadavg()
    results: dict[str, dict[str, dict[str, float]]] = {}
    agreement: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "city.h5"
        write_store(store, args.images, args.seed)
        startup = {}
        for device in devices:
            out = Path(tmp) / device.replace(":", "_")
            plan = steps(store, out, device, args.stride, args.methods)
            for name, command in plan.items():
                wanted = args.only is None or name.startswith("fit-stats")
                wanted = wanted or any(name.startswith(p) for p in args.only.split(","))
                if not wanted:
                    continue
                print(f"[{device}] {name} ...", file=sys.stderr, flush=True)
                results.setdefault(name, {})[device] = run(command, threads=args.threads)
            for report in sorted(out.glob("compare*.json")):
                agreement.setdefault(report.name, {})[device] = compare_rows(report)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "blda_posthoc", "correct", "-h"], capture_output=True)
        startup["blda correct -h"] = time.perf_counter() - start
    load_after = os.getloadavg()
    n = args.images
    h, w = LABEL_SIZE
    print(
        f"{n} images: {C}x{LOGIT_SIZE[0]}x{LOGIT_SIZE[1]} float16 logits, {h}x{w} labels; "
        f"{os.cpu_count()} CPUs; load average before {load_before[0]:.2f} "
        f"{load_before[1]:.2f} {load_before[2]:.2f}, after {load_after[0]:.2f} "
        f"{load_after[1]:.2f} {load_after[2]:.2f}"
    )
    base_name = "correct --method none"
    head = "| command | device | s / image | vs none | peak RSS | CPU/wall | 500 images | 2,975 |"
    print(head)
    print("|---|---|---|---|---|---|---|---|")
    for name, by_device in results.items():
        for device, r in by_device.items():
            per = r["wall_s"] / n
            base = results.get(base_name, {}).get(device)
            ratio = f"{r['wall_s'] / base['wall_s']:.2f}x" if base else "-"
            print(
                f"| {name} | {device} | {per:.2f} | {ratio} | {r['peak_rss_mb'] / 1024:.2f} GB "
                f"| {r['cpu_s'] / r['wall_s']:.2f} | {hours(per * 500)} | {hours(per * 2975)} |"
            )
    print(f"start-up: blda correct -h {startup['blda correct -h']:.2f} s")
    failed = False
    for report, by_device in agreement.items():
        if len(by_device) < 2:
            continue
        first, *others = list(by_device)
        for other in others:
            a, b = by_device[first], by_device[other]
            diffs = [
                abs(a["rows"][k] - b["rows"][k])
                for k in a["rows"]
                if a["rows"][k] is not None and b["rows"].get(k) is not None
            ]
            same_rows = set(a["rows"]) == set(b["rows"])
            worst = max(diffs, default=0.0)
            ok = same_rows and a["selected"] == b["selected"] and worst <= 0.01
            failed |= not ok
            print(
                f"{report}: {other} vs {first}: largest mIoU difference {worst:.4f} points over "
                f"{len(diffs)} rows; selected {b['selected']!r} vs {a['selected']!r}: "
                + ("agree" if ok else "DIFFER")
            )
    if args.json_path is not None:
        args.json_path.write_text(
            json.dumps(
                {
                    "images": n,
                    "load_before": load_before,
                    "load_after": load_after,
                    "results": results,
                    "startup": startup,
                    "agreement": agreement,
                },
                indent=1,
            )
        )
    if failed and args.check_agreement:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
