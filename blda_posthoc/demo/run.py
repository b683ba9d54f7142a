"""``blda demo``: the whole pipeline on the built-in synthetic UDA case.

Every step runs the real ``blda`` command with the arguments a user would type (no demo-only
shortcuts); the demo only generates the data first and summarises the results last.

Work folder layout::

    data/{source,target}/{images,labels}/   the synthetic benchmark
    src.h5, tgt.h5                          logits stores (dump-logits)
    src_stats.h5, tgt_stats.h5              statistics (fit-stats: source gt, target pseudo)
    diagnose.json                           over/under-prediction report
    pred_paper/, pred_source/               corrected trainId PNGs of the two settings
    eval_*.json                             evaluate reports
    report.md, iou.png, examples/*.png      the summary, the chart and side-by-side pictures
    commands.log                            every command run and its standard output
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from blda_posthoc.core.classes import colorize, palette_for
from blda_posthoc.demo.data import DEFAULT_COUNT, DEFAULT_SEED, scene_name, write_domain
from blda_posthoc.demo.synthesize import DEMO_CLASSES, DOMAINS
from blda_posthoc.errors import InputError
from blda_posthoc.io.images import read_label, read_rgb
from blda_posthoc.outputs import write_text
from blda_posthoc.pipelines.console import info
from blda_posthoc.report.plots import (
    CHANGE_COLORS,
    Panel,
    change_map,
    overlay,
    plot_iou_series,
    plot_panels,
)
from blda_posthoc.report.tables import fmt_or_dash

TAU = 0.2
COMPARE_TAUS = "0.2,0.5,1"
"""Strengths the demo's compare run tries (the default grid has seven)."""
"""The paper's post-hoc tau, used unchanged for both settings (no demo-specific tuning)."""

MODEL = "blda_posthoc.demo.net:build"
CHECKPOINT = Path(__file__).with_name("model.pt")
NUM_EXAMPLES = 3


@dataclass
class Setting:
    """One correction setting the demo compares against the plain argmax."""

    key: str
    title: str
    stats: str
    anchors: str | None


SETTINGS = (
    Setting(
        "paper", "target pseudo-label conditionals + source anchors", "tgt_stats.h5", "src_stats.h5"
    ),
    Setting("source", "source ground-truth conditionals and anchors", "src_stats.h5", None),
)


class Runner:
    """Runs ``blda`` commands in a work folder, logging each command line and its output."""

    def __init__(self, workdir: Path, device: str) -> None:
        self.workdir = workdir
        self.device = device
        self.log = workdir / "commands.log"
        self.timings: list[tuple[str, float]] = []

    def __call__(self, *args: str | Path, device: bool = False) -> None:
        """Run ``blda ARGS`` (paths relative to the work folder), failing on a non-zero exit."""
        from blda_posthoc.cli import main

        words = [str(a) for a in args] + (["--device", self.device] if device else [])
        line = "blda " + " ".join(shlex.quote(w) for w in words)
        info(f"$ {line}")
        out = io.StringIO()
        start = time.perf_counter()
        with contextlib.chdir(self.workdir), contextlib.redirect_stdout(out):
            try:
                main.main(args=words, prog_name="blda", standalone_mode=False)
            except SystemExit as exc:
                if exc.code not in (0, None):
                    raise InputError(f"demo step failed: {line}") from exc
        self.timings.append((words[0], time.perf_counter() - start))
        with self.log.open("a") as f:
            f.write(f"$ {line}\n{out.getvalue()}\n")


MARKER = ".blda-demo.json"
"""Written first into the work folder: marks it as the demo's own, so a rerun may replace it."""


def demo_outputs(workdir: Path) -> list[Path]:
    """Everything the demo writes (but its marker), for the overwrite check."""
    names = [
        "data",
        "src.h5",
        "tgt.h5",
        "src_stats.h5",
        "tgt_stats.h5",
        "diagnose.json",
        "eval_plain.json",
        "report.md",
        "iou.png",
        "examples",
        "commands.log",
        "compare.json",
        "compare.png",
    ]
    names += [f"pred_{s.key}" for s in SETTINGS] + [f"eval_{s.key}.json" for s in SETTINGS]
    partial = [f"{n}.partial" for n in ("src.h5", "tgt.h5")]
    return [workdir / n for n in names + partial]


def read_marker(workdir: Path) -> dict[str, Any] | None:
    """The marker of an earlier demo run in ``workdir``, or None."""
    try:
        marker = json.loads((workdir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == "blda-demo" else None


def write_marker(workdir: Path, count: int, seed: int, data_complete: bool) -> None:
    """Record what the demo folder holds (``data_complete``: the benchmark is fully written)."""
    marker = {
        "format": "blda-demo",
        "version": 1,
        "images": count,
        "seed": seed,
        "data_complete": data_complete,
    }
    write_text(workdir / MARKER, json.dumps(marker, sort_keys=True) + "\n")


def prepare(
    workdir: Path, overwrite: bool, count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED
) -> bool:
    """Make ``workdir`` ready for a run; return whether its benchmark data can be reused.

    A folder that an earlier demo run marked as its own is cleaned and reused without asking
    (so ``bash scripts/demo.sh`` works every time); its generated data is kept when it was
    complete and made with the same ``count`` and ``seed`` (it is deterministic). Demo outputs in
    an unmarked folder are replaced only with ``overwrite``. Files the demo does not write are
    never touched.
    """
    import shutil

    marker = read_marker(workdir)
    existing = [p for p in demo_outputs(workdir) if p.exists()]
    if existing and marker is None and not overwrite:
        raise InputError(
            f"{existing[0]}: already exists and {workdir} is not a folder the demo made "
            "(use --overwrite to replace the demo's files there, or another --workdir)"
        )
    reuse = (
        marker is not None
        and not overwrite
        and marker.get("data_complete") is True
        and marker.get("images") == count
        and marker.get("seed") == seed
        and (workdir / "data").is_dir()
    )
    for path in existing:
        if reuse and path == workdir / "data":
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    write_marker(workdir, count, seed, data_complete=reuse)
    return reuse


def run_demo(
    workdir: Path,
    count: int = DEFAULT_COUNT,
    seed: int = DEFAULT_SEED,
    device: str = "auto",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate the benchmark, run the pipeline, and write the summary.

    Args:
        workdir: Work folder.
        count: Scenes per domain.
        seed: Data seed.
        device: ``--device`` for the commands that compute.
        overwrite: Replace an earlier demo's outputs.

    Returns:
        The summary (also written to ``report.md``).
    """
    start = time.perf_counter()
    reuse = prepare(workdir, overwrite, count, seed)
    run = Runner(workdir, device)
    names = ",".join(DEMO_CLASSES)
    if reuse:
        info(f"reusing the {count} source and {count} target scenes in {workdir / 'data'}")
    else:
        info(f"generating {count} source and {count} target scenes in {workdir / 'data'}")
        for domain in DOMAINS:
            write_domain(workdir / "data", domain, count, seed)
        write_marker(workdir, count, seed, data_complete=True)
    for domain, store in (("source", "src.h5"), ("target", "tgt.h5")):
        run(
            "dump-logits",
            "--model",
            MODEL,
            "--checkpoint",
            CHECKPOINT,
            "--images",
            f"data/{domain}/images",
            "--labels",
            f"data/{domain}/labels",
            "--class-names",
            names,
            "--out",
            store,
            device=True,
        )
    run("fit-stats", "src.h5", "--label-source", "gt", "--out", "src_stats.h5", device=True)
    run(
        "fit-stats",
        "tgt.h5",
        "--label-source",
        "pseudo",
        "--calibration",
        "src_stats.h5",
        "--out",
        "tgt_stats.h5",
        device=True,
    )
    run(
        "diagnose",
        "tgt.h5",
        "--stats",
        "tgt_stats.h5",
        "--anchors",
        "src_stats.h5",
        "--json",
        "diagnose.json",
        device=True,
    )
    run("evaluate", "tgt.h5", "--json", "eval_plain.json", device=True)
    for s in SETTINGS:
        anchors = ["--anchors", s.anchors] if s.anchors else []
        run(
            "correct",
            "tgt.h5",
            "--stats",
            s.stats,
            *anchors,
            "--method",
            "blda",
            "--tau",
            str(TAU),
            "--out-dir",
            f"pred_{s.key}",
            device=True,
        )
        run(
            "evaluate",
            "--pred-dir",
            f"pred_{s.key}",
            "--labels",
            "data/target/labels",
            "--class-names",
            names,
            "--json",
            f"eval_{s.key}.json",
        )
    run(
        "compare",
        "tgt.h5",
        "--stats",
        "tgt_stats.h5",
        "--anchors",
        "src_stats.h5",
        "--tau",
        COMPARE_TAUS,
        "--select-on",
        str(max(1, count // 10)),
        "--json",
        "compare.json",
        "--plot",
        "compare.png",
        device=True,
    )
    summary = summarise(workdir)
    draw_examples(workdir, count)
    plot_iou_series(
        workdir / "iou.png",
        list(DEMO_CLASSES),
        [
            (label, [summary["per_class"][c][key] for c in DEMO_CLASSES], summary["miou"][key])
            for key, label in (
                ("plain", "plain argmax"),
                ("paper", f"BLDA paper setting, τ={TAU}"),
                ("source", f"BLDA source statistics, τ={TAU}"),
            )
        ],
    )
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["timings"] = run.timings
    summary["reused_data"] = reuse
    write_text(workdir / "report.md", format_report(summary, count))
    return summary


def summarise(workdir: Path) -> dict[str, Any]:
    """Per-class IoU and mIoU of the plain argmax and both settings, plus the diagnosis."""
    reports = {
        key: json.loads((workdir / f"eval_{key}.json").read_text())
        for key in ("plain", "paper", "source")
    }
    diagnosis = json.loads((workdir / "diagnose.json").read_text())["per_class"]
    per_class = {
        c: {
            **{k: r["per_class"][c]["iou"] for k, r in reports.items()},
            "verdict": diagnosis[c]["verdict"],
            "ratio": reports["plain"]["per_class"][c]["pred_true_ratio"],
        }
        for c in DEMO_CLASSES
    }
    comparison = json.loads((workdir / "compare.json").read_text())
    return {
        "compare": {
            "selected": comparison["selected"],
            "rows": [
                {key: row[key] for key in ("method", "tau", "auto", "miou", "selection_miou")}
                for row in comparison["rows"]
            ],
            "select": len(comparison["split"]["select"]),
            "held_out": len(comparison["split"]["held_out"]),
        },
        "per_class": per_class,
        "miou": {k: r["miou"] for k, r in reports.items()},
        "macc": {k: r["macc"] for k, r in reports.items()},
    }


def _fmt(value: float | None) -> str:
    return fmt_or_dash(value, ".1f")


def _delta(after: float | None, before: float | None) -> str:
    return "-" if after is None or before is None else f"{after - before:+.1f}"


def format_table(summary: dict[str, Any]) -> str:
    """The before/after per-class IoU table (plain text, also valid Markdown)."""
    rows = [["class", "pred/true", "verdict", "plain", "paper τ=0.2", "Δ", "source τ=0.2", "Δ"]]
    for c, v in summary["per_class"].items():
        rows.append(
            [
                c,
                _fmt(v["ratio"]) if v["ratio"] is None else f"{v['ratio']:.2f}",
                v["verdict"],
                _fmt(v["plain"]),
                _fmt(v["paper"]),
                _delta(v["paper"], v["plain"]),
                _fmt(v["source"]),
                _delta(v["source"], v["plain"]),
            ]
        )
    for metric, title in (("miou", "mIoU"), ("macc", "mAcc")):
        m = summary[metric]
        rows.append(
            [
                f"**{title}**",
                "",
                "",
                _fmt(m["plain"]),
                _fmt(m["paper"]),
                _delta(m["paper"], m["plain"]),
                _fmt(m["source"]),
                _delta(m["source"], m["plain"]),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) + " |"
        for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_report(summary: dict[str, Any], count: int) -> str:
    """The Markdown report written to ``report.md``."""
    steps = "\n".join(f"| `{name}` | {seconds:.1f} |" for name, seconds in summary["timings"])
    return f"""# blda demo

Synthetic street scenes: {count} source images (the frozen model's training domain) and {count}
target images (appearance and label shift). Statistics: `src_stats.h5` from source ground
truth, `tgt_stats.h5` from target pseudo-labels. τ = {TAU} for both settings (the paper's
post-hoc value; nothing tuned for this case).

- **paper setting**: conditionals from target pseudo-labels, anchors from source ground truth;
- **source setting**: conditionals and anchors from source ground truth.

Target IoU (%) per class; `pred/true` and the verdict come from `blda diagnose` / `blda evaluate`
on the plain predictions.

{format_table(summary)}

![per-class IoU](iou.png)

Examples (`examples/`): the target image, its ground truth, the plain argmax over the image,
both settings' predictions, and change maps of the pixels each setting changed (green fixed,
red broken, amber wrong before and after), with a colour legend.

## Which correction to trust: `blda compare`

Every method × strength on the labelled target images; the choice is made on
{summary["compare"]["select"]} images drawn at random and every figure below comes from the other
{summary["compare"]["held_out"]} (`compare.json`, `compare.png`).

{format_compare(summary["compare"])}

![compare](compare.png)

| step | seconds |
|---|---|
{steps}

Total: {summary["seconds"]:.1f} s. Every command is in `commands.log`.
"""


def format_compare(compare: dict[str, Any], top: int = 8) -> str:
    """The ``none`` row, the selected row and the best held-out rows as a Markdown table."""
    rows = compare["rows"]
    none = rows[0]["miou"]
    selected = compare["selected"]
    best = sorted(rows[1:], key=lambda r: -(r["miou"] or 0.0))[:top]
    lines = ["| method | τ | held-out mIoU | Δ none | selection mIoU |", "|---|---|---|---|---|"]
    for row in [rows[0], *best]:
        mark = (row["method"], row["tau"], row["auto"]) == (
            selected["method"],
            selected["tau"],
            selected["auto"],
        )
        tau = "-" if row["tau"] is None else f"{row['tau']:g}" + (" (auto)" if row["auto"] else "")
        name = f"**{row['method']}** (selected)" if mark else row["method"]
        lines.append(
            f"| {name} | {tau} | {_fmt(row['miou'])} | {_delta(row['miou'], none)} | "
            f"{_fmt(row['selection_miou'])} |"
        )
    return "\n".join(lines)


def draw_examples(workdir: Path, count: int) -> None:
    """One picture per example scene: what the model sees, what it predicts, what BLDA changes.

    Rows: image | ground truth | plain argmax over the image; the plain argmax and the two
    settings' predictions side by side; the source setting over the image | the two settings'
    change maps (pixels whose class the correction changed: fixed, broken, wrong both times).
    A colour legend goes under the grid.
    """
    palette = palette_for(list(DEMO_CLASSES))
    classes = [(c, rgb(palette[k])) for k, c in enumerate(DEMO_CLASSES)]
    classes.append(("ignore (255)", (0, 0, 0)))
    from blda_posthoc.io.store import LogitStore

    with LogitStore([workdir / "tgt.h5"]) as store:
        for index in range(min(NUM_EXAMPLES, count)):
            name = scene_name(index)
            image = read_rgb(workdir / "data" / "target" / "images" / f"{name}.png")
            label = read_label(workdir / "data" / "target" / "labels" / f"{name}.png")
            plain = store.read(name, with_label=False).logits.argmax(0).astype(np.uint8)
            preds = {s.key: read_label(workdir / f"pred_{s.key}" / f"{name}.png") for s in SETTINGS}
            panels = [
                Panel("target image", image),
                Panel("ground truth", colorize(label, palette)),
                Panel("plain argmax over the image", overlay(image, plain, palette)),
                Panel(f"plain argmax ({accuracy(plain, label)})", colorize(plain, palette)),
            ]
            for s in SETTINGS:
                title = f"{s.key} setting, τ={TAU} ({accuracy(preds[s.key], label)})"
                panels.append(Panel(title, colorize(preds[s.key], palette)))
            panels.append(
                Panel("source setting over the image", overlay(image, preds["source"], palette))
            )
            for s in SETTINGS:
                picture, counts = change_map(plain, preds[s.key], label, image)
                fixed, broken = counts["fixed (wrong -> right)"], counts["broken (right -> wrong)"]
                changed = int((plain != preds[s.key]).sum())
                title = f"{s.key} setting changed {changed} px\n{fixed} fixed, {broken} broken"
                panels.append(Panel(title, picture))
            plot_panels(
                workdir / "examples" / f"{name}.png",
                panels,
                columns=3,
                legends=[
                    ("classes", classes),
                    ("change maps (against the plain argmax)", list(CHANGE_COLORS.items())),
                ],
                title=f"{name}: target scene, frozen source-only model, BLDA correction",
            )


def rgb(color: np.ndarray) -> tuple[int, int, int]:
    """A palette row as an ``(r, g, b)`` tuple."""
    return int(color[0]), int(color[1]), int(color[2])


def accuracy(pred: np.ndarray, label: np.ndarray) -> str:
    """Pixel accuracy of one picture over its labelled pixels, for a panel title."""
    valid = label != 255
    return (
        f"pixel acc {100.0 * float((pred[valid] == label[valid]).mean()):.1f}%"
        if valid.any()
        else "-"
    )


def echo_summary(summary: dict[str, Any], workdir: Path) -> None:
    """Print the table and where everything is."""
    click.echo(format_table(summary))
    chosen = summary["compare"]["selected"]
    tau = "" if chosen["tau"] is None else f", τ {chosen['tau']:g}"
    click.echo(
        f"\nblda compare selected {chosen['method']}{tau} on "
        f"{summary['compare']['select']} images: held-out mIoU {_fmt(chosen['miou'])} "
        f"({_delta(chosen['miou'], summary['compare']['rows'][0]['miou'])} over the plain argmax "
        f"on the other {summary['compare']['held_out']})"
    )
    click.echo(f"work folder: {workdir} (report.md, iou.png, compare.png, examples/, commands.log)")
    click.echo(f"demo finished in {summary['seconds']:.1f} s")
