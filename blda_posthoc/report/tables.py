"""Rendering evaluation results: the JSON report, a terminal table, Markdown and a bar chart.

JSON report (``evaluate --json``), percentages in percent, undefined values ``null``::

    {"format": "blda-evaluate", "version": 1,
     "miou": 68.3, "macc": 75.1, "pixel_acc": 94.2, "iou_std": 14.8, "ece": 3.1,
     "num_pixels": 123456, "out_of_range_pixels": 0,
     "confusion": [[1000, 3, ...], ...],
     "per_class": {"road": {"iou": 97.1, "acc": 98.4, "bias": 1.2, "pred_true_ratio": 1.02,
                            "labelled_pixels": 1000, "predicted_pixels": 1020}, ...},
     "num_images": 500, "settings": {...}}

With a before/after run the metrics nest under ``"before"`` and ``"after"`` (same keys as
above, without ``num_images`` and ``settings``), beside ``"delta"`` (after minus before of the
mean metrics), ``"gain_ci95"`` (the 95 % paired bootstrap interval over images of the mIoU
gain, ``[lo, hi]``, or null), ``"num_images"`` and ``"settings"``. ``confusion[t][p]`` counts
the labelled pixels of class ``t`` predicted as ``p`` (rows true, columns predicted, in
``per_class`` order; predictions outside the classes only in ``out_of_range_pixels``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from blda_posthoc.core.evaluate import Summary

DECIMALS = 4
"""Decimals kept for floats in the JSON report."""

MEAN_KEYS = ("miou", "macc", "pixel_acc", "iou_std", "ece")
MEAN_LABELS = {
    "miou": "mIoU",
    "macc": "mAcc",
    "pixel_acc": "pixel acc",
    "iou_std": "IoU std",
    "ece": "ECE",
}


@dataclass
class Result:
    """The metrics of one set of predictions.

    Attributes:
        summary: Confusion-matrix metrics (:func:`blda_posthoc.core.evaluate.summarize`).
        ece: Expected calibration error in percent, or None when there were no probabilities.
        confusion: ``(C, C)`` or ``(C, C + 1)`` counts the summary was computed from (rows
            true, columns predicted), or None.
    """

    summary: Summary
    ece: float | None = None
    confusion: np.ndarray | None = None


def round_or_none(value: float | None, decimals: int = DECIMALS) -> float | None:
    """``value`` rounded for JSON; None (``null``) when undefined or not finite."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), decimals)


def metrics_dict(class_names: Sequence[str], result: Result) -> dict[str, Any]:
    """The JSON form of one result: mean metrics and ``per_class`` keyed by class name."""
    s = result.summary
    if len(class_names) != s["num_classes"]:
        raise ValueError(f"{len(class_names)} class names for {s['num_classes']} classes")
    per_class = {
        name: {
            "iou": round_or_none(s["iou"][k]),
            "acc": round_or_none(s["acc"][k]),
            "bias": round_or_none(s["bias"][k]),
            "pred_true_ratio": round_or_none(s["pred_true_ratio"][k]),
            "labelled_pixels": s["labelled_pixels"][k],
            "predicted_pixels": s["predicted_pixels"][k],
        }
        for k, name in enumerate(class_names)
    }
    confusion = None
    if result.confusion is not None:
        confusion = np.asarray(result.confusion)[:, : s["num_classes"]].tolist()
    return {
        "miou": round_or_none(s["miou"]),
        "macc": round_or_none(s["macc"]),
        "pixel_acc": round_or_none(s["pixel_acc"]),
        "iou_std": round_or_none(s["iou_std"]),
        "ece": round_or_none(result.ece),
        "num_pixels": s["num_pixels"],
        "out_of_range_pixels": s["out_of_range_pixels"],
        **({"confusion": confusion} if confusion is not None else {}),
        "per_class": per_class,
    }


def _difference(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else round_or_none(after - before)


def build_report(
    class_names: Sequence[str],
    before: Result,
    after: Result | None = None,
    *,
    counts: dict[str, int] | None = None,
    settings: dict[str, Any] | None = None,
    gain_ci95: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """Assemble the JSON report (see the module docstring for its form).

    Args:
        class_names: ``C`` names.
        before: The plain (or only) result.
        after: The corrected result, for a before/after report.
        counts: Top-level counts such as ``num_images``.
        settings: How the run was made (sources, tau, clamp, stats fingerprints, ...).
        gain_ci95: With ``after``: the interval of the mIoU gain (None: not computed).

    Returns:
        A JSON-ready dict (no NaN: undefined values are None).
    """
    report: dict[str, Any] = {"format": "blda-evaluate", "version": 1}
    if after is None:
        report.update(metrics_dict(class_names, before))
    else:
        b, a = metrics_dict(class_names, before), metrics_dict(class_names, after)
        delta = {key: _difference(a[key], b[key]) for key in MEAN_KEYS}
        interval = None if gain_ci95 is None else list(gain_ci95)
        report.update({"before": b, "after": a, "delta": delta, "gain_ci95": interval})
    report.update(counts or {})
    report["settings"] = settings or {}
    return report


def fmt_or_dash(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec`` for a table; ``-`` when undefined."""
    return "-" if value is None else format(value, spec)


@dataclass
class Column:
    """One table column: a header, one cell per row (already formatted), an optional group.

    ``group`` names the metric of a before / after / Δ column (the terminal table prints it on
    a line above the headers; Markdown prefixes the header with it).
    """

    header: str
    cells: list[str]
    group: str = ""

    @property
    def full_header(self) -> str:
        """Header with its group, for one-line headers."""
        return f"{self.group} {self.header}".strip()


def _columns(class_names: Sequence[str], before: Summary, after: Summary | None) -> list[Column]:
    """The per-class columns: plain, or before / after / Δ side by side."""
    cols = [Column("class", list(class_names))]
    specs: list[tuple[str, str, str, bool]] = [
        ("IoU", "iou", ".2f", True),
        ("Acc", "acc", ".2f", True),
        ("Bias", "bias", "+.2f", False),
        ("pred/true", "pred_true_ratio", ".2f", False),
    ]
    for title, key, spec, with_delta in specs:
        b: list[float | None] = before[key]  # type: ignore[literal-required]
        if after is None:
            cols.append(Column(title, [fmt_or_dash(v, spec) for v in b]))
            continue
        a: list[float | None] = after[key]  # type: ignore[literal-required]
        cols.append(Column("before", [fmt_or_dash(v, spec) for v in b], title))
        cols.append(Column("after", [fmt_or_dash(v, spec) for v in a], title))
        if with_delta:
            deltas = [fmt_or_dash(_difference(x, y), "+.2f") for x, y in zip(a, b, strict=True)]
            cols.append(Column("Δ", deltas, title))
    return cols


def _mean_rows(
    before: Result, after: Result | None, gain_ci95: Sequence[float | None] | None = None
) -> list[tuple[str, str]]:
    """``(label, text)`` lines for the mean metrics (and the mIoU gain's interval)."""
    rows = []
    for key in MEAN_KEYS:
        b = before.ece if key == "ece" else before.summary[key]  # type: ignore[literal-required]
        if after is None:
            if key != "ece" or b is not None:
                rows.append((MEAN_LABELS[key], fmt_or_dash(b, ".2f")))
            continue
        a = after.ece if key == "ece" else after.summary[key]  # type: ignore[literal-required]
        if key == "ece" and a is None and b is None:
            continue
        change = fmt_or_dash(_difference(a, b), "+.2f")
        text = f"{fmt_or_dash(b, '.2f')} -> {fmt_or_dash(a, '.2f')} ({change})"
        rows.append((MEAN_LABELS[key], text))
        if key == "miou" and gain_ci95 is not None:
            lo, hi = (fmt_or_dash(v, "+.2f") for v in gain_ci95)
            rows.append(("mIoU gain 95%", f"[{lo}, {hi}] (paired bootstrap over images)"))
    return rows


def _widths(cols: list[Column]) -> list[int]:
    return [max(len(c.header), *(len(x) for x in c.cells)) for c in cols]


def _render(
    cols: list[Column],
    row: Callable[[list[str], list[int]], str],
    rule: Callable[[list[int]], str],
) -> list[str]:
    """Header, rule and one line per row, given how to draw a row and the rule."""
    widths = _widths(cols)
    lines = [row([c.header for c in cols], widths), rule(widths)]
    for i in range(len(cols[0].cells)):
        lines.append(row([c.cells[i] for c in cols], widths))
    return lines


def _group_line(cols: list[Column], widths: list[int]) -> str:
    """Group titles centred over their columns (``widths`` as drawn, two-space gaps)."""
    parts: list[str] = []
    k = 0
    while k < len(cols):
        end = k
        while end + 1 < len(cols) and cols[end + 1].group == cols[k].group:
            end += 1
        span = sum(widths[k : end + 1]) + 2 * (end - k)
        parts.append(cols[k].group.center(span) if cols[k].group else " " * span)
        k = end + 1
    return "  ".join(parts).rstrip()


def format_table(
    class_names: Sequence[str],
    before: Result,
    after: Result | None = None,
    gain_ci95: Sequence[float | None] | None = None,
) -> str:
    """The terminal table: one row per class, then the mean metrics.

    Undefined values print as ``-``. With ``after``, every metric gets before and after columns
    and IoU and Acc a Δ (after minus before) column; ``gain_ci95`` adds the interval of the
    mIoU gain below the mIoU line.
    """
    cols = _columns(class_names, before.summary, after.summary if after else None)

    def row(cells: list[str], widths: list[int]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    lines = _render(cols, row, lambda widths: "  ".join("-" * w for w in widths))
    if any(c.group for c in cols):
        lines.insert(0, _group_line(cols, _widths(cols)))
    means = _mean_rows(before, after, gain_ci95)
    width = max(len(label) for label, _ in means)
    lines.append("")
    lines.extend(f"{label.ljust(width)}  {text}" for label, text in means)
    return "\n".join(lines)


def format_markdown(
    class_names: Sequence[str],
    before: Result,
    after: Result | None = None,
    *,
    counts: dict[str, int] | None = None,
    settings: dict[str, Any] | None = None,
    gain_ci95: Sequence[float | None] | None = None,
) -> str:
    """A Markdown report: mean metrics, the per-class table and the settings."""
    lines = ["# Evaluation", ""]
    means = _mean_rows(before, after, gain_ci95)
    lines.extend(f"- **{label}**: {text}" for label, text in means)
    for key, value in (counts or {}).items():
        lines.append(f"- {key.replace('_', ' ')}: {value}")
    lines.append("")
    cols = _columns(class_names, before.summary, after.summary if after else None)

    for col in cols:
        col.header = col.full_header

    def row(cells: list[str], widths: list[int]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    def rule(widths: list[int]) -> str:
        return "|" + "|".join("---" if i == 0 else "---:" for i in range(len(widths))) + "|"

    lines.extend(_render(cols, row, rule))
    if settings:
        lines += ["", "## Settings", ""]
        lines.extend(f"- {key}: `{json.dumps(value)}`" for key, value in settings.items())
    return "\n".join(lines) + "\n"
