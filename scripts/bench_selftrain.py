"""Does a corrected pseudo-label set train a better student? One self-training round, measured.

On a synthetic UDA case built with the real commands (``blda_posthoc.demo.cases``: rendered
street scenes, a source-trained network, ``dump-logits``, ``fit-stats``), the target
pseudo-labels of that one network are made several ways with ``blda relabel`` (and
``blda compare`` for the selected correction):

    argmax          relabel --method none                      (plain argmax)
    threshold       relabel --method none --min-confidence T   (DAFormer's cut, 0.968)
    quantile        relabel --method none --min-confidence Q   (Q: the confidence quantile
                                                                that keeps a share P of all
                                                                pixels, as cbst keeps per class)
    cbst            relabel --method none --keep-portion P     (CBST class-balanced keep)
    default         relabel --stats tgt --anchors src          (no --method: the default)
    compare         relabel --from-compare compare.json        (compare --select-on N picks)
    default+w       the default set, its --weights-out weights as per-pixel loss weights
    argmax+w        the argmax set, its --weights-out weights (the plain softmax confidence)

Then, per seed, one student per set starts from the same source-trained network and trains the
same steps on the same batches (source crops with their labels plus target crops with the set's
pseudo-labels; the seed fixes crops, flips and colour augmentation, identical across sets): the
students differ only in their pseudo-labels (and, for ``+w`` sets, in the per-pixel weights).
Every student is scored on the labelled target images that ``compare`` did not select on.

    .venv/bin/python scripts/bench_selftrain.py --quick      # reduced, about 10 minutes
    nice -n 10 .venv/bin/python scripts/bench_selftrain.py   # the full run

Prints a table (mean ± std over seeds of the students' mIoU, the paired gain over the argmax
student, the rare classes' IoU, and the pseudo-label sets' own quality) and writes
``results.md`` and ``results.json`` into ``WORKDIR/selftrain-{quick,full}/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from blda_posthoc import api
from blda_posthoc.core.classes import IGNORE_INDEX
from blda_posthoc.demo.cases import (
    BenchData,
    Case,
    build_case,
    load_network,
    read_images,
    read_labels,
    run_compare,
)
from blda_posthoc.demo.data import scene_name
from blda_posthoc.demo.net import DemoSegNet, normalise
from blda_posthoc.demo.run import Runner
from blda_posthoc.demo.synthesize import DEMO_CLASSES, class_frequencies, render_indexed
from blda_posthoc.demo.train import SourceTraining, class_weights, photometric
from blda_posthoc.io.images import find_files, read_label, read_rgb, write_png

C = len(DEMO_CLASSES)


@dataclass(frozen=True)
class Settings:
    """One run's settings (recorded in the JSON)."""

    data: BenchData
    source: SourceTraining
    steps: int
    seeds: tuple[int, ...]
    batch: int
    crop: tuple[int, int]
    lr: float
    select_on: int
    threshold: float
    keep_portion: float
    target_weight: float = 1.0


QUICK = Settings(
    data=BenchData(size=(64, 128), source=60, target_train=60, target_val=40),
    source=SourceTraining(width=8, iters=250, seed=11, crop=(48, 96)),
    steps=30,
    seeds=(0, 1, 2),
    batch=8,
    crop=(48, 96),
    lr=1e-3,
    select_on=8,
    threshold=0.968,
    keep_portion=0.5,
)
FULL = Settings(
    data=BenchData(),
    source=SourceTraining(width=8, iters=600, seed=11),
    steps=100,
    seeds=(0, 1, 2),
    batch=8,
    crop=(64, 128),
    lr=1e-3,
    select_on=10,
    threshold=0.968,
    keep_portion=0.5,
)
SETS = ("argmax", "threshold", "quantile", "cbst", "default", "compare", "default+w", "argmax+w")
QUICK_SETS = SETS[:-1]
FULL_SETS = SETS[:-1]
CASE = "w8"
"""The case folder: the full run's data and network are those of ``bench_methods.py``'s ``w8``
case, so a copy of its work folder is reused as it is."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-selftrain"))
    parser.add_argument("--quick", action="store_true", help="the reduced run (about 10 min)")
    parser.add_argument(
        "--sets",
        default=None,
        help=f"comma-separated subset of {','.join(SETS)} [quick: all but argmax+w]",
    )
    parser.add_argument("--steps", type=int, default=None, help="student steps [per mode]")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds [per mode]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args()


# ------------------------------------------------------------------ pseudo-label sets


def relabel_args(
    key: str, files: Any, compare: Path, s: Settings, quantile: float | None
) -> list[str | Path]:
    """The ``blda relabel`` options that make set ``key`` (``+w`` sets reuse their base)."""
    stats = ["--stats", files.stats["tgt"], "--anchors", files.stats["src"]]
    return {
        "argmax": ["--method", "none"],
        "threshold": ["--method", "none", "--min-confidence", str(s.threshold)],
        "quantile": ["--method", "none", "--min-confidence", str(quantile)],
        "cbst": ["--method", "none", "--keep-portion", str(s.keep_portion)],
        "default": stats,
        "compare": ["--from-compare", compare],
    }[key]


def make_sets(
    keys: list[str], files: Any, compare: Path, out: Path, labels: Path, s: Settings
) -> dict[str, dict[str, Any]]:
    """Run ``blda relabel`` once per base set; read back labels, weights and manifests."""
    run = Runner(out, "cpu")
    made: dict[str, dict[str, Any]] = {}
    bases = list(dict.fromkeys(k.removesuffix("+w") for k in keys))
    if "quantile" in bases and "argmax" not in bases:
        bases.insert(0, "argmax")  # the quantile comes from the argmax set's confidences
    quantile = None
    for base in sorted(bases, key=lambda b: b != "argmax"):
        if base == "quantile":
            # The plain softmax confidence is the argmax set's weight (its PNG, 1/255 steps):
            # the cut that keeps the share keep_portion of all pixels.
            confidence = made["argmax"]["weights"]
            quantile = round(float(np.quantile(confidence, 1.0 - s.keep_portion)), 6)
        pseudo, weights = out / "pseudo" / base, out / "weights" / base
        start = time.perf_counter()
        run(
            "relabel", files.stores["tgt_train"], *relabel_args(base, files, compare, s, quantile),
            "--out-dir", pseudo, "--weights-out", weights, "--labels", labels, "--overwrite",
            device=True,
        )  # fmt: skip
        manifest = json.loads((pseudo / "manifest.json").read_text())
        quality = manifest["quality"]["relabelled"]
        made[base] = {
            "labels": np.stack([read_label(p) for p in find_files(pseudo, (".png",)).values()]),
            "weights": np.stack(
                [read_label(p) for p in find_files(weights, (".png",)).values()]
            ).astype(np.float32)
            / 255.0,
            "method": manifest["statistics"].get("method", manifest["settings"]["method"]),
            "tau": manifest["settings"]["tau"],
            "min_confidence": manifest["settings"]["min_confidence"],
            "keep_portion": manifest["settings"]["keep_portion"],
            "quality_miou": quality["miou"],
            "coverage": quality["coverage"],
            "ignore_fraction": manifest["ignore_fraction"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        log(
            f"set {base}: method {made[base]['method']} tau {made[base]['tau']}, pseudo-label "
            f"mIoU {quality['miou']:.1f} over coverage {quality['coverage']:.3f}"
        )
    return made


def reusable(report: Path, files: Any, select_on: int) -> bool:
    """Whether ``compare.json`` is of this case's stores and statistics, with these settings."""
    if not report.is_file():
        return False
    inputs = (files.stores["tgt_val"], files.stats["tgt"], files.stats["src"])
    if any(p.stat().st_mtime > report.stat().st_mtime for p in inputs):
        return False
    settings = json.loads(report.read_text()).get("settings", {})
    return bool(settings.get("select_on") == select_on and settings.get("seed") == 0)


def write_target_labels(data: BenchData, out: Path) -> Path:
    """The target-train scenes' true labels (for the manifests' quality only; never trained on)."""
    folder = out / "tgt_train_labels"
    done = folder / "done.json"
    if not done.is_file():
        for i in range(data.target_train):
            write_png(
                folder / f"{scene_name(i)}.png",
                render_indexed(data.seed, "target", i, data.size)[1],
            )
        done.write_text("{}\n")
    return folder


# ------------------------------------------------------------------ students


def windows(
    rng: np.random.Generator, n: int, size: tuple[int, int], batch: int, crop: tuple[int, int]
) -> list[tuple[int, int, int, bool]]:
    """``batch`` random crops ``(image, y, x, flip)``, the draws of ``demo.train.random_crops``."""
    h, w = size
    idx = rng.integers(0, n, batch)
    ys = rng.integers(0, h - crop[0] + 1, batch)
    xs = rng.integers(0, w - crop[1] + 1, batch)
    flips = rng.random(batch) < 0.5
    return [
        (int(i), int(y), int(x), bool(f)) for i, y, x, f in zip(idx, ys, xs, flips, strict=True)
    ]


def cut(
    array: np.ndarray, wins: list[tuple[int, int, int, bool]], crop: tuple[int, int]
) -> np.ndarray:
    """The crops of ``(N, H, W, ...)`` ``array`` at ``wins``."""
    out = []
    for i, y, x, flip in wins:
        piece = array[i, y : y + crop[0], x : x + crop[1]]
        out.append(piece[:, ::-1] if flip else piece)
    return np.ascontiguousarray(np.stack(out))


def train_student(
    init: DemoSegNet,
    source: tuple[np.ndarray, np.ndarray],
    target: np.ndarray,
    pseudo: np.ndarray,
    weights: np.ndarray | None,
    s: Settings,
    seed: int,
) -> DemoSegNet:
    """Fine-tune a copy of ``init`` on source labels plus the target pseudo-labels.

    Each step: a source batch (class-weighted cross-entropy, as the source training) and a
    target batch whose loss is the cross-entropy over the pixels with a label (255 skipped),
    each pixel multiplied by its weight when ``weights`` are given, divided by the labelled
    pixels. Every random draw depends on ``seed`` only, so all sets see the same crops.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    src_images, src_labels = source
    student = copy.deepcopy(init).train()
    optimiser = torch.optim.AdamW(student.parameters(), lr=s.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, s.lr, total_steps=s.steps)
    cw = class_weights(src_labels, C)
    for _ in range(s.steps):
        ws = windows(rng, len(src_images), src_images.shape[1:3], s.batch, s.crop)
        xs = normalise(
            torch.from_numpy(photometric(rng, cut(src_images, ws, s.crop).astype(np.float32)))
        )
        ys = torch.from_numpy(cut(src_labels, ws, s.crop)).long()
        wt = windows(rng, len(target), target.shape[1:3], s.batch, s.crop)
        xt = normalise(
            torch.from_numpy(photometric(rng, cut(target, wt, s.crop).astype(np.float32)))
        )
        yt = torch.from_numpy(cut(pseudo, wt, s.crop)).long()
        loss = F.cross_entropy(student(xs), ys, weight=cw, ignore_index=IGNORE_INDEX)
        per_pixel = F.cross_entropy(student(xt), yt, ignore_index=IGNORE_INDEX, reduction="none")
        if weights is not None:
            per_pixel = per_pixel * torch.from_numpy(cut(weights, wt, s.crop))
        labelled = (yt != IGNORE_INDEX).sum().clamp_min(1)
        loss = loss + s.target_weight * per_pixel.sum() / labelled
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    return student.eval()


@torch.no_grad()
def score(model: DemoSegNet, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """mIoU and per-class IoU (percent) on labelled images, as ``blda evaluate`` counts them."""
    preds = []
    for start in range(0, len(images), 16):
        x = normalise(torch.from_numpy(images[start : start + 16].astype(np.float32)))
        preds.append(model(x).argmax(1))
    summary = api.evaluate(torch.cat(preds), torch.from_numpy(labels.astype(np.int64)), C)
    return {"miou": summary["miou"], "iou": summary["iou"]}


# ------------------------------------------------------------------ report


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def pm(values: list[float]) -> str:
    m, sd = mean_std(values)
    return f"{m:5.1f} ± {sd:3.1f}"


def table(results: dict[str, Any], keys: list[str], rare: list[int], made: dict[str, Any]) -> str:
    rare_names = [DEMO_CLASSES[k] for k in rare]
    head = (
        "| pseudo-labels | made by | PL mIoU | PL coverage | student mIoU | gain vs argmax | "
        + " | ".join(f"{n} IoU" for n in rare_names)
        + " |\n|---|---|---|---|---|---|"
        + "---|" * len(rare)
        + "\n"
    )
    rows = []
    base = results["students"]["argmax"]["miou"] if "argmax" in results["students"] else None
    src = results["source_only"]
    rows.append(
        f"| (source only) | the starting network | | | {src['miou']:5.1f} | | "
        + " | ".join(f"{src['iou'][k] or 0:4.1f}" for k in rare)
        + " |"
    )
    for key in keys:
        st = results["students"][key]
        info = made[key.removesuffix("+w")]
        made_by = f"{info['method']} τ={info['tau']:g}" + (
            " + weights" if key.endswith("+w") else ""
        )
        gain = "" if base is None else pm([a - b for a, b in zip(st["miou"], base, strict=True)])
        rares = " | ".join(pm([iou[k] or 0.0 for iou in st["iou"]]) for k in rare)
        rows.append(
            f"| {key} | {made_by} | {info['quality_miou']:.1f} | {info['coverage']:.3f} | "
            f"{pm(st['miou'])} | {gain} | {rares} |"
        )
    return head + "\n".join(rows) + "\n"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    if args.steps is not None:
        s = replace(s, steps=args.steps)
    if args.seeds is not None:
        s = replace(s, seeds=tuple(range(args.seeds)))
    wanted = args.sets or ",".join(QUICK_SETS if args.quick else FULL_SETS)
    keys = [k.strip() for k in wanted.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SETS]
    if unknown:
        raise SystemExit(f"error: unknown set(s) {', '.join(unknown)}; known: {', '.join(SETS)}")
    load_start = os.getloadavg()
    start = time.perf_counter()
    workdir = args.workdir.resolve()
    out = workdir / f"selftrain-{'quick' if args.quick else 'full'}"
    out.mkdir(parents=True, exist_ok=True)
    case = Case(CASE, s.source, note="source-only network of the self-training bench")
    files = build_case(workdir, case, s.data, device="cpu", log=log)
    t_case = time.perf_counter() - start
    compare = files.folder / "compare.json"
    if not reusable(compare, files, s.select_on):
        compare = run_compare(files, select_on=str(s.select_on), seed=0, device="cpu")
    split = json.loads(compare.read_text())["split"]
    labels_dir = write_target_labels(s.data, out)
    made = make_sets(keys, files, compare, out, labels_dir, s)
    t_sets = time.perf_counter() - start - t_case
    sets_dir = workdir / "data" / s.data.key
    src_images = read_images(sets_dir / f"source-{s.data.source}" / "images")
    src_labels = read_labels(sets_dir / f"source-{s.data.source}" / "labels")
    target = read_images(sets_dir / f"target_train-{s.data.target_train}" / "images")
    val_dir = sets_dir / f"target_val-{s.data.target_val}"
    val_images = find_files(val_dir / "images", (".png",))
    held = split["held_out"]
    eval_images = np.stack([read_rgb(val_images[n]) for n in held])
    eval_labels = np.stack([read_label(val_dir / "labels" / f"{n}.png") for n in held])
    init = load_network(files.model)
    freq = class_frequencies(src_labels, C)
    rare = [int(k) for k in np.argsort(freq)[:3]]
    results: dict[str, Any] = {"source_only": score(init, eval_images, eval_labels), "students": {}}
    log(f"source-only network: held-out mIoU {results['source_only']['miou']:.1f}")
    for key in keys:
        info = made[key.removesuffix("+w")]
        entry: dict[str, Any] = {"miou": [], "iou": [], "seconds": []}
        for seed in s.seeds:
            t0 = time.perf_counter()
            student = train_student(
                init,
                (src_images, src_labels),
                target,
                info["labels"],
                info["weights"] if key.endswith("+w") else None,
                s,
                seed,
            )
            got = score(student, eval_images, eval_labels)
            entry["miou"].append(got["miou"])
            entry["iou"].append(got["iou"])
            entry["seconds"].append(round(time.perf_counter() - t0, 1))
            log(f"student {key} seed {seed}: mIoU {got['miou']:.1f} ({entry['seconds'][-1]:.0f} s)")
        results["students"][key] = entry
    total = time.perf_counter() - start
    text = table(results, keys, rare, made)
    load_end = os.getloadavg()
    settings = {
        "data": asdict(s.data),
        "source": asdict(s.source),
        **{k: v for k, v in asdict(s).items() if k not in ("data", "source")},
        "held_out_images": len(held),
        "selection_images": len(split["select"]),
        "rare_classes": [DEMO_CLASSES[k] for k in rare],
        "threads": args.threads,
    }
    seconds = {
        "case": round(t_case, 1),
        "compare_and_relabel": round(t_sets, 1),
        "students": round(total - t_case - t_sets, 1),
        "total": round(total, 1),
    }
    header = (
        f"Self-training bench ({'quick' if args.quick else 'full'}): {len(s.seeds)} seeds, "
        f"{s.steps} student steps (batch {s.batch}, crop {s.crop[0]}x{s.crop[1]}), "
        f"{s.data.target_train} target-train scenes {s.data.size[0]}x{s.data.size[1]}, "
        f"students scored on {len(held)} held-out labelled target scenes "
        f"(compare selected on {len(split['select'])}). PL = the pseudo-label set's own "
        f"mIoU over the pixels it keeps. Mean ± std over seeds; gain = paired difference to the "
        f"argmax student. {total:.0f} s, load {load_start[0]:.1f} -> {load_end[0]:.1f}.\n\n"
    )
    (out / "results.md").write_text(header + text)
    payload = {
        "settings": settings,
        "sets": {
            k: {n: v for n, v in made[k].items() if n not in ("labels", "weights")} for k in made
        },
        "results": results,
        "seconds": seconds,
        "load": {"start": load_start, "end": load_end},
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(header + text, end="")
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
