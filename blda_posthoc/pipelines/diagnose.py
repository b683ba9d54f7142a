"""Diagnosing a store: prediction counts, the report dict, its table and its chart.

JSON report (``--json``, format ``blda-diagnose`` version 1; keys sorted, undefined ``null``)::

    {"format": "blda-diagnose", "version": 1, "class_names": [...], "num_images": n,
     "num_pixels": N, "has_labels": bool, "rank_correlation": rho | null,
     "anchor_median": m, "statistics": {"path": str | null, "fingerprint": str,
     "labels": "gt" | "pseudo"}, "thresholds": {"score": 0.1, "under_ratio": 0.7,
     "over_ratio": 1.3},
     "per_class": {"<name>": {"verdict": "over-predicted" | "under-predicted" | "balanced"
                              | "unknown", "decided_by": "labels" | "label-free" | null,
                              "score": s, "pred_share": f, "predicted_pixels": n,
                              "never_predicted": bool, "positive_median": m, "bias": b,
                              "pred_true_ratio": r}}}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blda_posthoc.core.correct import resize_logits
from blda_posthoc.core.diagnose import (
    OVER,
    OVER_RATIO,
    SCORE_THRESHOLD,
    UNCERTAIN,
    UNDER,
    UNDER_RATIO,
    UNKNOWN,
    Diagnosis,
)
from blda_posthoc.core.evaluate import ConfusionMatrix
from blda_posthoc.core.fit import LogitStats
from blda_posthoc.core.select import em_collapsed
from blda_posthoc.errors import InputError
from blda_posthoc.io.images import read_label
from blda_posthoc.io.jsonfiles import count_array, read_parts
from blda_posthoc.io.schema import MAX_COUNT_SUM
from blda_posthoc.io.store import MAX_CLASSES, LogitStore
from blda_posthoc.pipelines.console import info, progress
from blda_posthoc.pipelines.corrections import read_statistics, target_priors
from blda_posthoc.pipelines.fit_stats import FitOptions, fit_store
from blda_posthoc.pipelines.memory import read_stats_within_budget
from blda_posthoc.report.plots import require_matplotlib, save_figure
from blda_posthoc.report.tables import fmt_or_dash, round_or_none

FORMAT = "blda-diagnose"
VERSION = 1
DECIMALS = 6


def count_predictions(
    store: LogitStore,
    *,
    label_files: dict[str, Path] | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[Iterable[str], int], Iterable[str]] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Stream a store: plain-argmax pixels per class and, with labels, the confusion matrix.

    Args:
        store: The logits.
        label_files: The label PNG of every image (``--labels DIR``, see
            :func:`blda_posthoc.pipelines.evaluate.every_label`), used instead of the store's
            labels.
        device: Where to compute.
        progress: Wraps the iteration over image names.

    Returns:
        ``(C,)`` int64 predicted pixels and a ``(C, C + 1)`` confusion matrix or None.
    """
    c = store.num_classes
    label_files = label_files or {}
    with_label = not label_files and store.has_labels()  # read from the store
    predicted = np.zeros(c, dtype=np.int64)
    matrix = ConfusionMatrix(c) if with_label or label_files else None
    names: Iterable[str] = store.names if progress is None else progress(store.names, len(store))
    for name in names:
        record = store.read(name, with_label=with_label)
        pred = resize_logits(torch.from_numpy(record.logits).to(device), record.size).argmax(0)
        predicted += np.bincount(pred.reshape(-1).cpu().numpy(), minlength=c)
        path = label_files.get(name)
        label = record.label if path is None else read_label(path)
        if matrix is not None and label is not None:
            source = path or name
            if label.shape != tuple(record.size):
                raise InputError(f"{source}: label size {label.shape} != {record.size}")
            try:
                matrix.update(pred.cpu(), torch.from_numpy(label))
            except ValueError as exc:
                raise InputError(f"{source}: {exc}") from exc
    return predicted, None if matrix is None else matrix.compute()


def load_or_fit_stats(
    store: LogitStore, stats_path: Path | None, device: torch.device
) -> LogitStats:
    """Read ``--stats`` (same class names as the store) or fit pseudo-label statistics."""
    if stats_path is None:
        info("no --stats: fitting pseudo-label statistics on the fly")
        return fit_store(
            store,
            FitOptions(labels="pseudo"),
            device=device,
            progress=lambda it, n: progress(it, n, "fit-stats"),
        )
    stats = read_stats_within_budget(stats_path)
    if stats.class_names != store.class_names:
        raise InputError(
            f"{stats_path}: class names {stats.class_names} differ from the store's "
            f"{store.class_names}"
        )
    return stats


def partial_block(
    shard: tuple[int, int],
    num_images: int,
    predicted: np.ndarray,
    confusion: np.ndarray | None,
    anchors_path: Path | None,
) -> dict[str, Any]:
    """The ``"partial"`` block of a shard's report: its raw counts, for ``--merge``."""
    return {
        "shard": list(shard),
        "num_images": num_images,
        "predicted": predicted.tolist(),
        "confusion": None if confusion is None else confusion.tolist(),
        "anchors": None if anchors_path is None else str(anchors_path),
    }


@dataclass
class MergedCounts:
    """Shards' counts added up (see :func:`merge_counts`)."""

    stats_path: Path
    fingerprint: str
    anchors_path: Path | None
    num_images: int
    predicted: np.ndarray
    confusion: np.ndarray | None


def merge_counts(paths: list[Path]) -> MergedCounts:
    """Add up the ``"partial"`` blocks of the ``diagnose --json`` reports of shards 1..N.

    The statistics (and anchors) the shards used are recorded; every shard must name the same.
    The confusion matrix is kept only when every shard had labels for all its images.
    """
    merged: MergedCounts | None = None
    for path, data in read_parts(paths, FORMAT):
        part = data["partial"]
        c = len(data["class_names"].strings(max_length=MAX_CLASSES, unique=True))
        stats = data["statistics"]
        predicted = count_array(part["predicted"], (c,), path, "predicted")
        confusion_node = part["confusion"]
        confusion = (
            None
            if confusion_node.is_null
            else count_array(confusion_node, (c, c + 1), path, "confusion")
        )
        anchors_node = part["anchors"]
        anchors = None if anchors_node.is_null else Path(anchors_node.text())
        count = part["num_images"].integer(low=0, high=MAX_COUNT_SUM)
        stats_path = Path(stats["path"].text())
        fingerprint = stats["fingerprint"].text(max_length=64)
        if merged is None:
            merged = MergedCounts(stats_path, fingerprint, anchors, count, predicted, confusion)
            continue
        if (stats_path, fingerprint, anchors) != (
            merged.stats_path,
            merged.fingerprint,
            merged.anchors_path,
        ) or c != len(merged.predicted):
            raise InputError(
                f"{path}: not of the same run as the other parts (other statistics or anchors)"
            )
        merged.num_images += count
        merged.predicted = merged.predicted + predicted
        if merged.confusion is None or confusion is None:
            merged.confusion = None
        else:
            merged.confusion = merged.confusion + confusion
    assert merged is not None
    return merged


def report_dict(
    result: Diagnosis, stats: LogitStats, stats_path: Path | None, num_images: int
) -> dict[str, Any]:
    """The JSON form of a diagnosis."""
    per_class = {}
    for d in result.classes:
        entry = asdict(d)
        name = entry.pop("name")
        for key in (
            "score",
            "pred_share",
            "positive_median",
            "bias",
            "pred_true_ratio",
            "estimated_ratio",
        ):
            entry[key] = round_or_none(entry[key], DECIMALS)
        per_class[name] = entry
    return {
        "format": FORMAT,
        "version": VERSION,
        "class_names": stats.class_names,
        "num_images": num_images,
        "num_pixels": int(sum(d.predicted_pixels for d in result.classes)),
        "has_labels": result.has_labels,
        "rank_correlation": round_or_none(result.rank_correlation, DECIMALS),
        "anchor_median": round_or_none(result.anchor_median, DECIMALS),
        "statistics": {
            "path": None if stats_path is None else str(stats_path),
            "fingerprint": stats.fingerprint,
            "labels": stats.settings.get("labels"),
        },
        "thresholds": {
            "score": SCORE_THRESHOLD,
            "under_ratio": UNDER_RATIO,
            "over_ratio": OVER_RATIO,
        },
        "per_class": per_class,
    }


COLLAPSED_TEXT = "n/a (EM collapsed)"
"""Shown instead of an estimated ratio whose EM prior has collapsed."""


def format_table(result: Diagnosis) -> str:
    """A fixed-width per-class table (and the rank correlation) for the terminal."""
    width = max(8, *(len(d.name) for d in result.classes))
    estimated = any(d.estimated_ratio is not None or d.em_collapsed for d in result.classes)
    est_width = 18 if any(d.em_collapsed for d in result.classes) else 9
    head = f"{'class':<{width}}  {'share%':>7}  {'score':>6}"
    head += f"  {'est.ratio':>{est_width}}" if estimated else ""
    head += f"  {'verdict':<15}  {'by':<10}"
    if result.has_labels:
        head += f"  {'bias':>7}  {'ratio':>6}  {'label-free':<15}"
    lines = [head, "-" * len(head)]
    for d in result.classes:
        line = f"{d.name:<{width}}  {100 * d.pred_share:>7.2f}  {fmt_or_dash(d.score, '+.3f'):>6}"
        ratio_text = COLLAPSED_TEXT if d.em_collapsed else fmt_or_dash(d.estimated_ratio, ".2f")
        line += f"  {ratio_text:>{est_width}}" if estimated else ""
        line += f"  {d.verdict:<15}  {d.decided_by or '-':<10}"
        if result.has_labels:
            line += (
                f"  {fmt_or_dash(d.bias, '+.2f'):>7}  {fmt_or_dash(d.pred_true_ratio, '.2f'):>6}"
                f"  {d.label_free_verdict:<15}"
            )
        if d.never_predicted:
            line += "  (never predicted)"
        lines.append(line.rstrip())
    lines.append("")
    lines.append(
        "score: Cliff's delta of the class's positive logits vs the class-balanced "
        "positive anchor (docs/metrics.md)"
    )
    if estimated:
        lines.append(
            "est.ratio: predicted share / EM estimate of the class prior (source-calibrated); "
            f"without labels a verdict needs it (< {UNDER_RATIO} under, > {OVER_RATIO} over) "
            f"and the score (|score| >= {SCORE_THRESHOLD}) to agree, else 'uncertain'"
        )
    else:
        lines.append(f"without labels |score| >= {SCORE_THRESHOLD} decides")
    if result.has_labels:
        lines.append(
            f"with labels the verdict follows pred/true ratio (< {UNDER_RATIO} under, "
            f"> {OVER_RATIO} over); Spearman(score, Bias) = "
            + fmt_or_dash(result.rank_correlation, ".3f")
            + f"; label-free verdicts agree on {agreement(result)}"
        )
    return "\n".join(lines)


def agreement(result: Diagnosis) -> str:
    """How many label-free verdicts match the labelled ones (uncertain ones counted apart)."""
    decided = [
        d
        for d in result.classes
        if d.decided_by == "labels" and d.label_free_verdict not in (UNCERTAIN, UNKNOWN)
    ]
    same = sum(d.label_free_verdict == d.verdict for d in decided)
    uncertain = sum(d.label_free_verdict == UNCERTAIN for d in result.classes)
    return f"{same} of {len(decided)} classes ({uncertain} uncertain)"


def plot_scores(path: Path, result: Diagnosis) -> None:
    """Bar chart of the per-class scores coloured by verdict, thresholds dashed."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {OVER: "tab:red", UNDER: "tab:blue"}
    names = [d.name for d in result.classes]
    values = [d.score if d.score is not None else 0.0 for d in result.classes]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.0))
    ax.bar(
        range(len(names)), values, color=[colors.get(d.verdict, "tab:gray") for d in result.classes]
    )
    for level in (SCORE_THRESHOLD, -SCORE_THRESHOLD):
        ax.axhline(level, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right")
    ax.set_ylim(-1, 1)
    ax.set_ylabel("score (Cliff's delta vs P+)")
    rho = fmt_or_dash(result.rank_correlation, ".2f")
    ax.set_title(
        "red: over-predicted, blue: under-predicted"
        + (f"; Spearman vs Bias {rho}" if result.has_labels else "")
    )
    save_figure(fig, path)


def estimated_priors(
    stats_path: Path, anchors_path: Path, class_names: list[str]
) -> tuple[np.ndarray | None, str | None]:
    """EM estimate of the class priors of the ``--stats`` data, or None with the reason.

    Args:
        stats_path: Stats file of the data (version 2: it holds a pixel sample).
        anchors_path: Labelled stats file with a vector-scaling calibration and class priors.
        class_names: The store's class names.

    Returns:
        ``(priors (C,), None)``, or ``(None, why)`` when EM has most likely collapsed.
    """
    statistics = read_statistics(stats_path, anchors_path, class_names)
    extras = statistics.anchors.extras
    if extras is None or "vector" not in extras.calibrations:
        raise InputError(
            f"{anchors_path}: holds no calibration (fit it with blda fit-stats --label-source gt); "
            "EM on uncalibrated probabilities is not trusted"
        )
    priors, _, _ = target_priors(statistics)
    cond = statistics.cond.extras
    assert cond is not None  # target_priors checked it
    shares = cond.predicted / max(int(cond.predicted.sum()), 1)
    if em_collapsed(shares, priors):
        return None, (
            "the EM estimate of the class priors has collapsed (a frequently predicted class "
            "got a prior 20 times smaller); the label-free verdicts use the score alone"
        )
    return priors, None
