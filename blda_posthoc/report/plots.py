"""Plots of evaluation results: per-class IoU bars, confusion matrices, overlays, panels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blda_posthoc import outputs
from blda_posthoc.core.classes import IGNORE_INDEX
from blda_posthoc.errors import InputError
from blda_posthoc.report.tables import Result, fmt_or_dash


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
    except InputError:  # already names the file (disk full)
        raise
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
    except InputError:  # already names the file (disk full)
        raise
    except ValueError as exc:
        raise InputError(f"{path}: cannot write the plot ({exc})") from exc
    finally:
        plt.close(fig)
