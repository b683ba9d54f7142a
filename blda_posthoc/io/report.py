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
mean metrics), ``"num_images"`` and ``"settings"``. ``confusion[t][p]`` counts the labelled
pixels of class ``t`` predicted as ``p`` (rows true, columns predicted, in ``per_class`` order;
predictions outside the classes only in ``out_of_range_pixels``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blda_posthoc.core.classes import IGNORE_INDEX
from blda_posthoc.core.evaluate import Summary
from blda_posthoc.io import outputs
from blda_posthoc.io.errors import InputError

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
) -> dict[str, Any]:
    """Assemble the JSON report (see the module docstring for its form).

    Args:
        class_names: ``C`` names.
        before: The plain (or only) result.
        after: The corrected result, for a before/after report.
        counts: Top-level counts such as ``num_images``.
        settings: How the run was made (sources, tau, clamp, stats fingerprints, ...).

    Returns:
        A JSON-ready dict (no NaN: undefined values are None).
    """
    report: dict[str, Any] = {"format": "blda-evaluate", "version": 1}
    if after is None:
        report.update(metrics_dict(class_names, before))
    else:
        b, a = metrics_dict(class_names, before), metrics_dict(class_names, after)
        delta = {key: _difference(a[key], b[key]) for key in MEAN_KEYS}
        report.update({"before": b, "after": a, "delta": delta})
    report.update(counts or {})
    report["settings"] = settings or {}
    return report


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (exclusive temporary file, then rename)."""
    outputs.write_text(path, text)


def write_json(path: Path, data: dict[str, Any], sort_keys: bool = False) -> None:
    """Write strict JSON (``allow_nan=False``), atomically; the same data gives the same bytes."""
    write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys, allow_nan=False) + "\n")


# ---------------------------------------------------------------- tables


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


def _mean_rows(before: Result, after: Result | None) -> list[tuple[str, str]]:
    """``(label, text)`` lines for the mean metrics."""
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


def format_table(class_names: Sequence[str], before: Result, after: Result | None = None) -> str:
    """The terminal table: one row per class, then the mean metrics.

    Undefined values print as ``-``. With ``after``, every metric gets before and after columns
    and IoU and Acc a Δ (after minus before) column.
    """
    cols = _columns(class_names, before.summary, after.summary if after else None)

    def row(cells: list[str], widths: list[int]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    lines = _render(cols, row, lambda widths: "  ".join("-" * w for w in widths))
    if any(c.group for c in cols):
        lines.insert(0, _group_line(cols, _widths(cols)))
    means = _mean_rows(before, after)
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
) -> str:
    """A Markdown report: mean metrics, the per-class table and the settings."""
    lines = ["# Evaluation", ""]
    lines.extend(f"- **{label}**: {text}" for label, text in _mean_rows(before, after))
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


# ---------------------------------------------------------------- plot


def require_matplotlib(option: str = "--plot") -> None:
    """Fail with a clear message when the optional ``plot`` extra is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise InputError(
            f"{option} needs matplotlib, which is not installed "
            "(install the plot extra: pip install 'blda-posthoc[plot]')"
        ) from exc


def plot_iou(
    path: Path, class_names: Sequence[str], before: Result, after: Result | None = None
) -> None:
    """Write a per-class IoU bar chart (grouped before/after bars with ``after``) as an image.

    Undefined IoUs are drawn as empty bars. The format follows the file extension (png, pdf,
    svg, ...).
    """
    results = [("before" if after else "IoU", before)] + ([("after", after)] if after else [])
    plot_iou_series(
        path,
        class_names,
        [(label, r.summary["iou"], r.summary["miou"]) for label, r in results],
    )


def plot_confusion(
    path: Path, class_names: Sequence[str], before: Result, after: Result | None = None
) -> None:
    """Write the row-normalised confusion matrix (beside the corrected one with ``after``).

    Each row (a true class) is divided by its labelled pixels, so a cell is the share of that
    class predicted as the column's class; rows of unlabelled classes stay empty.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [("before" if after else "", before)] + ([("after", after)] if after else [])
    c = len(class_names)
    side = max(4.0, 0.45 * c + 2.0)
    fig, axes = plt.subplots(1, len(results), figsize=(side * len(results), side), squeeze=False)
    image: Any = None
    for ax, (label, result) in zip(axes[0], results, strict=True):
        if result.confusion is None:
            raise ValueError("the result holds no confusion matrix")
        counts = np.asarray(result.confusion, dtype=np.float64)
        rows = counts.sum(1, keepdims=True)  # every labelled pixel, out-of-range ones included
        share = np.divide(counts[:, :c], rows, out=np.full((c, c), np.nan), where=rows > 0)
        image = ax.imshow(share, vmin=0.0, vmax=1.0, cmap="Blues")
        ax.set_xticks(range(c), class_names, rotation=90, fontsize="small")
        ax.set_yticks(range(c), class_names, fontsize="small")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        title = "confusion, rows normalised"
        ax.set_title(f"{title} ({label})" if label else title)
        if c <= 20:
            for t in range(c):
                for p in range(c):
                    if np.isfinite(share[t, p]) and share[t, p] >= 0.005:
                        color = "white" if share[t, p] > 0.6 else "black"
                        text = f"{share[t, p]:.2f}"
                        ax.text(p, t, text, ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=axes[0][-1], fraction=0.046, pad=0.04, label="share of the true class")
    save_figure(fig, path)


def plot_iou_series(
    path: Path,
    class_names: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None], float | None]],
) -> None:
    """Write a grouped per-class IoU bar chart, one bar per series and class.

    Args:
        path: Image to write (format from the extension).
        class_names: ``C`` names.
        series: ``(label, per-class IoU in percent or None, mIoU)`` per series.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * n + 2), 4.0))
    for k, (label, ious, miou) in enumerate(series):
        values = [v if v is not None else 0.0 for v in ious]
        positions = [i + (k - (len(series) - 1) / 2) * width for i in range(n)]
        ax.bar(positions, values, width, label=f"{label} (mIoU {fmt_or_dash(miou, '.2f')})")
    ax.set_xticks(range(n))
    ax.set_xticklabels(class_names, rotation=60, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.legend(
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=1 if len(series) > 2 else len(series),
        fontsize="small",
        frameon=False,
    )
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure atomically (no timestamp in PNGs, so reruns are identical)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        metadata = {"Software": None} if path.suffix.lower() == ".png" else None
        with outputs.atomic_file(path) as handle:
            fig.savefig(
                handle,
                format=path.suffix[1:].lower() or None,
                metadata=metadata,
                bbox_inches="tight",
            )
    except ValueError as exc:
        raise InputError(f"{path}: cannot write the plot ({exc})") from exc
    finally:
        plt.close(fig)


CHANGE_COLORS: dict[str, tuple[int, int, int]] = {
    "fixed (wrong -> right)": (40, 200, 60),
    "broken (right -> wrong)": (230, 40, 40),
    "changed, wrong both times": (250, 190, 20),
    "changed, no label": (60, 140, 250),
}
"""Colours of :func:`change_map`; with no label every changed pixel is ``changed, no label``."""


def overlay(
    image: np.ndarray, label_map: np.ndarray, palette: np.ndarray, alpha: float = 0.55
) -> np.ndarray:
    """Blend a class map's palette colours over an image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        label_map: ``(H, W)`` uint8 class ids (255 = ignore: the image shows through).
        palette: ``(256, 3)`` uint8 colours.
        alpha: Weight of the class colour.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    colors = palette[label_map].astype(np.float32)
    weight = np.where(label_map[..., None] == IGNORE_INDEX, 0.0, alpha)
    blended = (1.0 - weight) * image.astype(np.float32) + weight * colors
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def change_map(
    before: np.ndarray,
    after: np.ndarray,
    label: np.ndarray | None = None,
    image: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """Picture of the pixels whose class a correction changed.

    Unchanged pixels show the image in faded grey (white without an image); changed pixels are
    coloured by :data:`CHANGE_COLORS`: with a label, green where the change fixed the pixel, red
    where it broke it, amber where it was wrong before and after; blue where the label is ignore
    (or there is no label).

    Args:
        before: ``(H, W)`` class ids before (e.g. the plain argmax).
        after: ``(H, W)`` class ids after.
        label: ``(H, W)`` true class ids (255 = ignore), or None.
        image: ``(H, W, 3)`` uint8 background, or None.

    Returns:
        ``(H, W, 3)`` uint8 picture and the pixel count of every :data:`CHANGE_COLORS` key.
    """
    if before.shape != after.shape or (label is not None and label.shape != before.shape):
        raise ValueError(
            f"shapes differ: before {before.shape}, after {after.shape}"
            + (f", label {label.shape}" if label is not None else "")
        )
    changed = before != after
    if image is None:
        out = np.full((*before.shape, 3), 255, dtype=np.uint8)
    else:
        grey = image.astype(np.float32).mean(-1, keepdims=True)
        out = np.repeat(np.rint(160 + 0.35 * grey), 3, axis=-1).astype(np.uint8)
    names = list(CHANGE_COLORS)
    if label is None:
        masks = [np.zeros_like(changed)] * 3 + [changed]
    else:
        known = label != IGNORE_INDEX
        right_before, right_after = before == label, after == label
        masks = [
            changed & known & right_after,
            changed & known & right_before,
            changed & known & ~right_before & ~right_after,
            changed & ~known,
        ]
    counts = {}
    for name, mask in zip(names, masks, strict=True):
        out[mask] = CHANGE_COLORS[name]
        counts[name] = int(mask.sum())
    return out, counts


LEGEND_COLUMNS = 5
"""Entries per row of a :func:`plot_panels` legend."""


@dataclass
class Panel:
    """One picture of :func:`plot_panels`.

    Attributes:
        title: Its title (may hold line breaks).
        picture: ``(H, W, 3)`` uint8 RGB.
    """

    title: str
    picture: np.ndarray


def plot_panels(
    path: Path,
    panels: Sequence[Panel],
    *,
    columns: int,
    legends: Sequence[tuple[str, Sequence[tuple[str, tuple[int, int, int]]]]] = (),
    zoom: float = 1.5,
    title: str | None = None,
) -> None:
    """Write a grid of pictures with readable titles and colour legends below (matplotlib).

    Sized so that, viewed at 100 %, each picture appears ``zoom`` times its pixel size and the
    text is 11-13 pt: the figure is rendered at 100 dpi with every picture placed at an exact
    size in inches (nearest-neighbour, so class borders stay sharp).

    Args:
        path: Image to write (format from the extension).
        panels: Pictures of one size, filled row by row.
        columns: Pictures per row.
        legends: ``(heading, [(label, rgb), ...])`` blocks drawn under the grid.
        zoom: Display scale of the pictures.
        title: Figure heading, or None.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    dpi, line, gap = 100, 0.27, 0.08  # inches: a text line, the space between pictures
    h, w = panels[0].picture.shape[:2]
    rows = -(-len(panels) // columns)
    pic_w, pic_h = w * zoom / dpi, h * zoom / dpi
    title_h = line + 0.2 * max(panel.title.count("\n") for panel in panels)
    cell_h = pic_h + title_h + gap
    legend_lines = [-(-len(entries) // LEGEND_COLUMNS) + 1 for _, entries in legends]
    head = line + gap if title else gap
    fig_w = columns * pic_w + (columns + 1) * gap
    legend_line = 0.235
    fig_h = head + rows * cell_h + sum(n * legend_line + gap for n in legend_lines) + gap
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    if title:
        fig.text(0.5, 1 - gap / fig_h, title, fontsize=13, ha="center", va="top")
    for k, panel in enumerate(panels):
        row, col = divmod(k, columns)
        left = gap + col * (pic_w + gap)
        top = fig_h - head - row * cell_h - title_h
        ax = fig.add_axes((left / fig_w, (top - pic_h) / fig_h, pic_w / fig_w, pic_h / fig_h))
        ax.imshow(panel.picture, interpolation="nearest")
        ax.set_title(panel.title, fontsize=12, pad=4)
        ax.set_axis_off()
    y = head + rows * cell_h
    for (heading, entries), lines in zip(legends, legend_lines, strict=True):
        handles = [
            Patch(facecolor=(r / 255, g / 255, b / 255), edgecolor="0.3", label=label)
            for label, (r, g, b) in entries
        ]
        fig.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, 1 - y / fig_h),
            ncol=min(LEGEND_COLUMNS, len(handles)),
            fontsize=11,
            frameon=False,
            title=heading,
            title_fontsize=11,
            handlelength=1.4,
            columnspacing=1.2,
            borderaxespad=0.0,
            borderpad=0.0,
        )
        y += lines * legend_line + gap
    try:
        metadata = {"Software": None} if path.suffix.lower() == ".png" else None
        with outputs.atomic_file(path) as handle:
            fig.savefig(
                handle,
                format=path.suffix[1:].lower() or None,
                metadata=metadata,
                dpi=dpi,
                bbox_inches="tight",
                pad_inches=0.05,
            )
    except ValueError as exc:
        raise InputError(f"{path}: cannot write the plot ({exc})") from exc
    finally:
        plt.close(fig)


def read_parts(paths: list[Path], kind: str) -> list[tuple[Path, dict[str, Any]]]:
    """Read the JSON reports of shards 1..N of one run: each exactly once, the same N.

    Args:
        paths: The shards' ``--json`` reports.
        kind: The report ``format`` expected (``blda-evaluate``, ``blda-compare``).

    Returns:
        ``(path, report)`` in shard order; every report has a ``"partial"`` dict whose
        ``"shard"`` is ``[K, N]``.
    """
    if not paths:
        raise InputError("--merge: no part file given")
    found: dict[int, tuple[Path, dict[str, Any]]] = {}
    total = None
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
        except ValueError as exc:
            raise InputError(f"{path}: not JSON ({exc})") from exc
        part = data.get("partial") if isinstance(data, dict) else None
        if not isinstance(part, dict) or data.get("format") != kind:
            raise InputError(f"{path}: not a shard's {kind} report (no partial block)")
        shard = part.get("shard")
        if not (
            isinstance(shard, list)
            and len(shard) == 2
            and all(isinstance(v, int) for v in shard)
            and 1 <= shard[0] <= shard[1]
        ):
            raise InputError(f"{path}: damaged partial block (shard {shard!r})")
        k, n = shard
        if total is not None and n != total:
            raise InputError(f"{path}: shard {k}/{n} is not of the same run as {paths[0]}")
        total = n
        if k in found:
            raise InputError(f"{path}: shard {k}/{n} given twice (also {found[k][0]})")
        found[k] = (Path(path), data)
    assert total is not None
    absent = sorted(set(range(1, total + 1)) - set(found))
    if absent:
        raise InputError(
            f"--merge: shard {absent[0]}/{total} is missing ({len(found)} of {total} parts given)"
        )
    return [found[k] for k in sorted(found)]


def count_array(value: Any, shape: tuple[int, ...], path: Path | str, key: str) -> np.ndarray:
    """Counts from a shard's report as an int64 array, checked for ``shape`` and signs.

    Raises:
        InputError: ``{path}: damaged partial block ({key} ...)`` when the value is not an
            array of whole numbers of that shape, or holds a negative count.
    """
    try:
        array = np.asarray(value, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"{path}: damaged partial block ({key}: {exc})") from exc
    if array.shape != shape:
        raise InputError(
            f"{path}: damaged partial block ({key} has shape {array.shape}, not {shape})"
        )
    if (array < 0).any():
        raise InputError(f"{path}: damaged partial block ({key} holds a negative count)")
    return array
