"""Every correction × a strength grid, evaluated in one streaming pass over labelled images.

JSON report (format ``blda-compare``, version 1), percentages in percent, undefined ``null``::

    {"format": "blda-compare", "version": 1, "class_names": [...], "stores": [...],
     "settings": {"stats", "anchors", "stats_fingerprint", "anchors_fingerprint", "methods",
                  "tau_grid", "select_on", "seed", "clamp", "min_pixels", "labels",
                  "metric", "max_class_loss", "bootstrap", "pixel_stride"},
     "split": null | {"select": [names], "held_out": [names]},
     "evaluated_on": "all images" | "held-out images",
     "pixel_stride": S, "pixels": "every pixel" | "every Sth pixel of each axis (1/S² ...)",
     "rows": [{"method", "tau", "auto", "miou", "macc", "pixel_acc", "selection_miou",
               "selection_macc", "gain", "gain_ci95": null | [lo, hi],
               "excluded": null | {"class", "iou_loss", "reason"},
               "per_class": {name: {"iou", "acc"}}}],
     "selected": {"method", "tau", "auto", "metric", "miou", "macc", "selection_miou",
                  "selection_macc", "gain_over_none", "gain_ci95",
                  "edge": null | {"side": "top" | "bottom", "next_tau"}},
     "tau_auto": {method: {"tau", "criterion", "grid", "distance"}},
     "skipped_methods": {method: reason}, "num_images": n}

With ``select_on`` the row figures come from the held-out images only and ``selection_miou``
from the selection images; the selected row is the best (in ``settings.metric``) on the
selection images among those that beat ``none`` there and are not ``excluded`` (else ``none``),
so ``selected.miou`` is an honest held-out figure. ``gain`` is the row's gain over ``none`` in
``settings.metric`` and ``gain_ci95`` its 95 % paired bootstrap interval over the images the
figures come from (:mod:`blda_posthoc.core.bootstrap`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blda_posthoc.core import defaults
from blda_posthoc.core.align import Tables, lookup_tables
from blda_posthoc.core.bootstrap import (
    DEFAULT_BOOTSTRAP,
    gain_intervals,
    image_counts,
    includes_zero,
    metric_from_counts,
)
from blda_posthoc.core.correct import correct_image, sample_logits
from blda_posthoc.core.evaluate import ConfusionMatrix, Summary, summarize
from blda_posthoc.core.methods import (
    COMPARE_DEFAULT,
    METHODS,
    Aligned,
    Corrector,
    Plain,
    has_strength,
    removed_reason,
)
from blda_posthoc.core.rows import RowPredictor
from blda_posthoc.core.select import AUTO_GRID, pick_best, split_names
from blda_posthoc.errors import InputError
from blda_posthoc.io.jsonfiles import count_array, read_parts
from blda_posthoc.io.schema import Node
from blda_posthoc.io.store import MAX_CLASSES, LogitStore
from blda_posthoc.pipelines.corrections import (
    ALIGNED,
    WITH_TABLES,
    CorrectionSpec,
    Statistics,
    load_correction,
    recorded_method,
)
from blda_posthoc.pipelines.evaluate import Pairs, iterate_store, label_source
from blda_posthoc.report.tables import round_or_none

# Defined where `blda CMD -h` reads them (no torch there); re-exported here.
DEFAULT_TAU_GRID = defaults.DEFAULT_TAU_GRID

FORMAT = "blda-compare"
VERSION = 1
PLAIN = Plain()
"""Stands in for the corrector of merged rows (a report needs none)."""
BOOTSTRAP_MEMORY = 2 * 2**30
"""Bytes the per-image counts may take; above it the bootstrap is turned off with a warning."""


@dataclass
class Row:
    """One (method, strength) and its confusion matrices on the two image sets.

    Attributes:
        method: Method name.
        tau: Strength (None for methods without one).
        corrector: The correction.
        auto: Whether ``tau`` was chosen by ``--tau auto``.
        held: Confusion matrix on the images the figures are reported on.
        select: Confusion matrix on the selection images (with a split).
        images: ``(3, C)`` counts of every image by name (see
            :func:`blda_posthoc.core.bootstrap.image_counts`), for the bootstrap; None when
            the bootstrap is off.
    """

    method: str
    tau: float | None
    corrector: Corrector
    auto: bool = False
    held: ConfusionMatrix | None = None
    select: ConfusionMatrix | None = None
    images: dict[str, np.ndarray] | None = None

    def predict(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(H, W)`` prediction of ``(C, H, W)`` logits."""
        return correct_image(z, size, self.corrector, self.tau or 0.0)[0]

    def add_image(self, name: str, confusion: np.ndarray, *, selection: bool) -> None:
        """Add one image's ``(C, C + 1)`` confusion matrix to the total of its image set.

        The accumulation hook of :func:`compare_store`: the matrix also goes into the
        per-image counts the bootstrap resamples (when :attr:`images` is kept).
        """
        target = self.select if selection else self.held
        assert target is not None
        target.matrix += confusion
        if self.images is not None:
            self.images[name] = image_counts(confusion)


@dataclass
class Comparison:
    """What :func:`compare_store` found.

    Attributes:
        rows: Every row, ``none`` first.
        split: ``(selection, held-out)`` names, or None.
        tau_auto: The ``--tau auto`` choice per method.
        skipped: Methods left out, with the reason.
        pairs: The images evaluated.
    """

    rows: list[Row]
    split: tuple[list[str], list[str]] | None
    tau_auto: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    pairs: Pairs | None = None


def build_rows(
    methods: Sequence[str],
    taus: Sequence[float],
    spec: CorrectionSpec,
    statistics: Statistics,
    class_names: list[str],
    device: torch.device | str,
) -> tuple[list[Row], dict[str, dict[str, Any]], dict[str, str]]:
    """One row per method and strength (``none`` first), plus ``--tau auto`` rows.

    A method the statistics cannot support (e.g. no calibration in the anchors) is left out
    and reported in the third return value rather than failing the whole comparison.
    """
    rows = [Row("none", None, Plain())]
    auto: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for method in methods:
        if method == "none":
            continue
        try:
            ready = load_correction(spec.with_method(method), class_names, device, statistics)
        except InputError as exc:
            skipped[method] = str(exc)
            continue
        if not has_strength(method):
            rows.append(Row(method, None, ready.corrector))
            continue
        for tau in taus:
            if tau == 0 and ready.corrector.is_identity(0.0):
                continue  # the same as none
            if isinstance(ready.corrector, Aligned) and tau:
                try:
                    lookup_tables(ready.corrector.maps, tau)
                except ValueError as exc:
                    skipped[f"{method} tau {tau:g}"] = str(exc)
                    continue
            rows.append(Row(method, float(tau), ready.corrector))
        if method in ALIGNED:
            try:
                chosen = load_correction(
                    CorrectionSpec(
                        method, None, True, spec.stats, spec.anchors, spec.clamp, spec.min_pixels
                    ),
                    class_names,
                    device,
                    statistics,
                )
            except InputError as exc:
                skipped[f"{method} (tau auto)"] = str(exc)
                continue
            auto[method] = chosen.settings["tau_auto"]
            rows.append(Row(method, chosen.tau, chosen.corrector, auto=True))
    return rows, auto, skipped


def compare_store(
    store: LogitStore,
    pairs: Pairs,
    label_files: dict[str, Path],
    rows: list[Row],
    *,
    split: tuple[list[str], list[str]] | None = None,
    device: torch.device | str = "cpu",
    per_image: bool = True,
    pixel_stride: int = 1,
) -> None:
    """Fill every row's confusion matrices in one pass over the labelled images.

    Every row of an image is predicted by one :class:`~blda_posthoc.core.rows.RowPredictor`,
    which shares the work rows have in common; each prediction equals the row's own
    :meth:`Row.predict` (the tests compare them).

    Args:
        store: The logits.
        pairs: Images with labels (see :func:`blda_posthoc.pipelines.evaluate.store_labels`).
        label_files: Label PNGs by name (empty: the store's own labels).
        rows: The rows (their matrices are reset here).
        split: ``(selection names, held-out names)`` from :func:`make_split`, or None.
        device: Where to compute.
        per_image: Keep every image's counts (:attr:`Row.images`) for the bootstrap.
        pixel_stride: Evaluate every ``S``-th pixel of each axis of the full-size image (the
            logits resized at those pixels only, see
            :func:`~blda_posthoc.core.correct.sample_logits`); 1: every pixel.
    """
    selection = set(split[0]) if split is not None else set()
    c = store.num_classes
    for row in rows:
        row.held = ConfusionMatrix(c)
        row.select = ConfusionMatrix(c) if split is not None else None
        row.images = {} if per_image else None
    predictor = RowPredictor([(row.corrector, row.tau or 0.0) for row in rows])
    images = iterate_store(
        store, pairs, label_files, torch.device(device), command="compare", resize=False
    )
    for name, z, label in images:
        size = (int(label.shape[0]), int(label.shape[1]))
        sampled, ys, xs = sample_logits(z, size, pixel_stride)
        if pixel_stride > 1:
            label = label[ys.to(label.device)][:, xs.to(label.device)]
        flat = sampled.reshape(c, -1).T  # (N, C) view; the predictor copies it step by step
        try:
            counts = predictor.counts(flat, label.reshape(-1), c).cpu().numpy()
        except ValueError as exc:
            raise InputError(f"{label_source(store, label_files, name)}: {exc}") from exc
        for row, count in zip(rows, counts, strict=True):
            row.add_image(name, count, selection=name in selection)


def make_split(
    names: list[str], select_on: float | None, seed: int
) -> tuple[list[str], list[str]] | None:
    """``(selection, held-out)`` names for ``--select-on`` (None: no split), checked up front."""
    if select_on is None:
        return None
    try:
        return split_names(names, select_on, seed)
    except ValueError as exc:
        raise InputError(str(exc)) from exc


def _summary(matrix: ConfusionMatrix | None) -> Summary | None:
    return None if matrix is None else summarize(matrix.compute())


@dataclass(frozen=True)
class Rule:
    """How the selection is made and how far its figures are trusted.

    Attributes:
        metric: What selection maximises (``miou`` or ``macc``); gains are in it.
        max_class_loss: Rows that lower a class's IoU by more than this many points against
            ``none`` (on the selection images) are left out of the selection; None: off.
        bootstrap: Resamples of the paired bootstrap (0: no interval).
        seed: Seed of the resampling (and of the ``--select-on`` draw).
    """

    metric: str = "miou"
    max_class_loss: float | None = None
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Rule:
        """The rule a report's ``settings`` record."""
        return cls(
            metric=str(settings.get("metric", "miou")),
            max_class_loss=settings.get("max_class_loss"),
            bootstrap=int(settings.get("bootstrap", 0)),
            seed=int(settings.get("seed", 0)),
        )

    def settings(self) -> dict[str, Any]:
        """The ``settings`` entries of the rule."""
        return {
            "metric": self.metric,
            "max_class_loss": self.max_class_loss,
            "bootstrap": self.bootstrap,
        }


def row_dict(row: Row, class_names: Sequence[str], metric: str = "miou") -> dict[str, Any]:
    """The JSON form of one row (its ``gain``, ``gain_ci95`` and ``excluded`` filled later)."""
    held = _summary(row.held)
    select = _summary(row.select)
    assert held is not None
    return {
        "method": row.method,
        "tau": row.tau,
        "auto": row.auto,
        "miou": round_or_none(held["miou"]),
        "macc": round_or_none(held["macc"]),
        "pixel_acc": round_or_none(held["pixel_acc"]),
        "selection_miou": None if select is None else round_or_none(select["miou"]),
        "selection_macc": None if select is None else round_or_none(select["macc"]),
        "gain": None,
        "gain_ci95": None,
        "excluded": None,
        "per_class": {
            name: {"iou": round_or_none(held["iou"][i]), "acc": round_or_none(held["acc"][i])}
            for i, name in enumerate(class_names)
        },
    }


def select_row(rows: list[dict[str, Any]], with_split: bool, metric: str = "miou") -> int:
    """Index of the selected row (``rows[0]`` is ``none``); excluded rows are never chosen."""
    key = f"selection_{metric}" if with_split else metric
    return pick_best([None if r["excluded"] else r[key] for r in rows], baseline=0)


def _metric(matrix: ConfusionMatrix | None, metric: str) -> float:
    """The metric of a confusion matrix as the bootstrap computes it (NaN: undefined)."""
    assert matrix is not None
    return float(metric_from_counts(image_counts(matrix.matrix), metric))


def fill_gains(comparison: Comparison, rows: list[dict[str, Any]], rule: Rule) -> None:
    """Every row's ``gain`` over ``none`` (in ``rule.metric``) and its ``gain_ci95``.

    The interval resamples the images the figures come from (the held-out images with a
    split), in name order, so shards merged give the interval of one pass.
    """
    none = _metric(comparison.rows[0].held, rule.metric)
    for row, out in zip(comparison.rows, rows, strict=True):
        out["gain"] = round_or_none(_metric(row.held, rule.metric) - none)
    base = comparison.rows[0].images
    if rule.bootstrap == 0 or base is None:
        return
    selection = set(comparison.split[0]) if comparison.split is not None else set()
    names = sorted(n for n in base if n not in selection)
    if not names:
        return

    def stacked(row: Row) -> np.ndarray:
        assert row.images is not None
        return np.stack([row.images[n] for n in names])

    intervals = gain_intervals(
        [stacked(r) for r in comparison.rows],
        stacked(comparison.rows[0]),
        metric=rule.metric,
        n=rule.bootstrap,
        seed=rule.seed,
    )
    for out, interval in zip(rows, intervals, strict=True):
        out["gain_ci95"] = (
            None if interval is None else [round_or_none(interval[0]), round_or_none(interval[1])]
        )


def mark_excluded(comparison: Comparison, rows: list[dict[str, Any]], limit: float) -> None:
    """Set ``excluded`` on the rows that lower a class's IoU by more than ``limit`` points.

    Measured against ``none`` on the selection images (all images without a split); a class
    whose IoU is undefined on either side does not count.
    """
    split = comparison.split is not None

    def ious(row: Row) -> list[float | None]:
        summary = _summary(row.select if split else row.held)
        assert summary is not None
        return summary["iou"]

    names = list(rows[0]["per_class"])
    where = "the selection images" if split else "all images"
    none = ious(comparison.rows[0])
    for row, out in zip(comparison.rows[1:], rows[1:], strict=True):
        losses = [
            (b - a, k)
            for k, (a, b) in enumerate(zip(ious(row), none, strict=True))
            if a is not None and b is not None
        ]
        if not losses:
            continue
        loss, k = max(losses)
        if loss > limit:
            out["excluded"] = {
                "class": names[k],
                "iou_loss": round_or_none(loss),
                "reason": f"lowers {names[k]} IoU by {loss:.2f} points (more than {limit:g}) "
                f"on {where}",
            }


def grid_edge(rows: list[dict[str, Any]], best: dict[str, Any]) -> dict[str, Any] | None:
    """``{"side", "next_tau"}`` when the selected strength is at an edge of its grid, else None.

    The top of the grid suggests doubling it; the lowest non-zero strength suggests halving it
    (below it lies only tau 0, the plain argmax or the method's own tau-0 row).
    """
    if best["tau"] is None or best["auto"] or best["method"] == "none":
        return None
    taus = [r["tau"] for r in rows if r["method"] == best["method"] and not r["auto"]]
    nonzero = [t for t in taus if t > 0]
    if not nonzero:
        return None
    if best["tau"] == max(nonzero):
        return {"side": "top", "next_tau": round_or_none(2 * best["tau"])}
    if best["tau"] == min(nonzero):
        return {"side": "bottom", "next_tau": round_or_none(best["tau"] / 2)}
    return None


def build_report(
    comparison: Comparison,
    class_names: list[str],
    settings: dict[str, Any],
    stores: Sequence[Path],
) -> dict[str, Any]:
    """The ``blda-compare`` JSON document (the :class:`Rule` read from ``settings``)."""
    rule = Rule.from_settings(settings)
    rows = [row_dict(r, class_names) for r in comparison.rows]
    fill_gains(comparison, rows, rule)
    if rule.max_class_loss is not None:
        mark_excluded(comparison, rows, rule.max_class_loss)
    best = rows[select_row(rows, comparison.split is not None, rule.metric)]
    assert comparison.pairs is not None
    stride = int(settings.get("pixel_stride", 1))
    return {
        "format": FORMAT,
        "version": VERSION,
        "class_names": class_names,
        "stores": [str(p) for p in stores],
        "settings": settings,
        "num_images": len(comparison.pairs.names),
        "split": None
        if comparison.split is None
        else {"select": comparison.split[0], "held_out": comparison.split[1]},
        "evaluated_on": "all images" if comparison.split is None else "held-out images",
        "pixel_stride": stride,
        "pixels": "every pixel"
        if stride == 1
        else f"every {stride}th pixel of each axis (1/{stride * stride} of the pixels)",
        "rows": rows,
        "selected": {
            "method": best["method"],
            "tau": best["tau"],
            "auto": best["auto"],
            "metric": rule.metric,
            "miou": best["miou"],
            "macc": best["macc"],
            "selection_miou": best["selection_miou"],
            "selection_macc": best["selection_macc"],
            "gain_over_none": best["gain"],
            "gain_ci95": best["gain_ci95"],
            "edge": grid_edge(rows, best),
        },
        "tau_auto": comparison.tau_auto,
        "skipped_methods": comparison.skipped,
    }


def partial_block(comparison: Comparison, shard: tuple[int, int]) -> dict[str, Any]:
    """The ``"partial"`` block of a shard's report: its images, raw and per-image counts."""
    assert comparison.pairs is not None
    names = list(comparison.pairs.names)

    def raw(matrix: ConfusionMatrix | None) -> list[list[int]] | None:
        return None if matrix is None else matrix.matrix.tolist()

    def images(row: Row) -> list[Any] | None:
        return None if row.images is None else [row.images[n].tolist() for n in names]

    return {
        "shard": list(shard),
        "names": names,
        "rows": [
            {
                "method": r.method,
                "tau": r.tau,
                "auto": r.auto,
                "held": raw(r.held),
                "select": raw(r.select),
                "images": images(r),
            }
            for r in comparison.rows
        ],
    }


MERGE_SAME = ("class_names", "stores", "settings", "split", "tau_auto", "skipped_methods")
"""What every shard of one compare run reports alike."""


def merge_reports(paths: list[Path]) -> dict[str, Any]:
    """The report of all images from the ``compare --json`` reports of shards 1..N.

    The shards' raw confusion matrices are added up, their per-image counts gathered, and the
    report is built as one pass builds it (same selection, same figures, same intervals).
    Every value is checked (see :mod:`blda_posthoc.io.schema`): class names, method names,
    strengths, flags, the matrices' shapes and counts.
    """
    parts = read_parts(paths, FORMAT)
    first_path, first = parts[0]
    class_names = first["class_names"].strings(max_length=MAX_CLASSES, unique=True)
    c = len(class_names)
    rows: list[Row] = []
    names: list[str] = []
    for path, data in parts:
        if any(data.value.get(key) != first.value.get(key) for key in MERGE_SAME):
            raise InputError(
                f"{path}: not of the same run as {first_path} (other classes, stores, "
                "settings or selection split)"
            )
        partial = data["partial"]
        part_names = partial["names"].strings()
        part_rows = partial["rows"].entries(length=len(rows) if rows else None)
        if not part_rows or part_rows[0]["method"].value != "none":
            raise partial["rows"].error("must start with the row of method none")
        for i, entry in enumerate(part_rows):
            merge_row(rows, i, entry, part_names, c, path, first_path)
        names.extend(part_names)
    if len(set(names)) != len(names):
        raise InputError(f"--merge: an image is in two parts ({', '.join(map(str, paths[:2]))})")
    split_node = first.get("split")
    split = None
    if split_node is not None:
        split = (split_node["select"].strings(), split_node["held_out"].strings())
    comparison = Comparison(
        rows,
        split,
        {k: v.value for k, v in first["tau_auto"].fields().items()},
        {k: v.text() for k, v in first["skipped_methods"].fields().items()},
        Pairs(sorted(names)),
    )
    return build_report(
        comparison,
        class_names,
        {k: v.value for k, v in first["settings"].fields().items()},
        [Path(p) for p in first["stores"].strings()],
    )


def merge_row(
    rows: list[Row],
    i: int,
    entry: Node,
    names: list[str],
    c: int,
    path: Path,
    first_path: Path,
) -> None:
    """Add row ``i`` of a shard's partial block to ``rows`` (appended when new), checked.

    Raises:
        InputError: a damaged value, or a row that differs from the other shards' row ``i``.
    """
    method = recorded_method(entry["method"])
    tau = entry["tau"].number(low=0.0, optional=True)
    auto = entry["auto"].boolean()
    held = _matrix(entry["held"], c, path, f"row {i} held")
    select_node = entry["select"]
    select = None if select_node.is_null else _matrix(select_node, c, path, f"row {i} select")
    images = _images(entry.get("images"), names, held, select, c, path, i)
    if len(rows) <= i:
        # The corrector is not needed to report: Plain stands in for it.
        rows.append(Row(method, tau, PLAIN, auto))
        rows[i].held, rows[i].select, rows[i].images = held, select, images
        return
    row = rows[i]
    if (row.method, row.tau, row.auto) != (method, tau, auto):
        raise entry.error(f"row {i} is {method} here, {row.method} in {first_path}")
    if (select is None) != (row.select is None):
        raise entry.error("the selection split differs")
    if (images is None) != (row.images is None):
        raise entry.error("one part has per-image counts, another has none")
    assert row.held is not None
    row.held.merge(held)
    if row.select is not None and select is not None:
        row.select.merge(select)
    if row.images is not None and images is not None:
        row.images.update(images)


def _images(
    values: Node | None,
    names: list[str],
    held: ConfusionMatrix,
    select: ConfusionMatrix | None,
    c: int,
    path: Path,
    i: int,
) -> dict[str, np.ndarray] | None:
    """A shard's per-image ``(3, C)`` counts of row ``i`` by name, checked against its totals."""
    if values is None:
        return None
    key = f"row {i} images"
    counts = count_array(values, (len(names), 3, c), path, key)
    total = image_counts(held.matrix) + (0 if select is None else image_counts(select.matrix))
    if not np.array_equal(counts.sum(0), total):
        raise InputError(f"{path}: damaged partial block ({key} do not add up to the row's counts)")
    return dict(zip(names, counts, strict=True))


def _matrix(values: Any, num_classes: int, path: Path, key: str) -> ConfusionMatrix:
    """A confusion matrix from a shard's raw ``(C, C + 1)`` counts, checked."""
    cm = ConfusionMatrix(num_classes)
    cm.matrix = count_array(values, (num_classes, num_classes + 1), path, key)
    return cm


METRIC_LABELS = {"miou": "mIoU", "macc": "mAcc"}


COMPARE_WORK_BYTES = 256 * 2**20
"""What compare holds besides statistics and tables (row predictions, bags, the auto batches):
its address-space peak at 32 classes was 0.09 GiB above the estimate without it."""


def compare_tables(methods: Sequence[str], taus: Sequence[float]) -> Tables:
    """The correction tables compare holds at once (for the memory estimate).

    Each BLDA method builds its maps twice (the grid's rows, and the ``tau auto`` row apart),
    each caching the lookup tables of the strengths it was used with (its default and the
    grid's, or the auto grid's), and holds the grid's lookup tables side by side once more,
    with the auto row's; ``self-calibrate`` builds one correction. While one method's
    side-by-side table is built, its strengths' tables are all alive besides it; the rows'
    other work is :data:`COMPARE_WORK_BYTES`.
    """
    strengths = sum(1 for tau in taus if tau)
    maps: list[int] = []
    extra = strengths if any(method in ALIGNED for method in methods) else 0
    for method in methods:
        if method in ALIGNED:
            maps += [strengths + 1, len(AUTO_GRID) - 1]
            extra += strengths + 1
        elif method in WITH_TABLES:
            maps.append(1)
    return Tables(tuple(maps), extra, COMPARE_WORK_BYTES)


def bootstrap_bytes(rows: int, images: int, num_classes: int) -> int:
    """Bytes the per-image counts of ``rows`` x ``images`` take (``3 C`` int64 each)."""
    return rows * images * 3 * num_classes * 8


def format_table(report: dict[str, Any]) -> str:
    """The rows as a fixed-width table; the selected row marked ``*``, excluded rows ``x``."""
    split = report["split"] is not None
    metric = report["selected"].get("metric", "miou")
    label = METRIC_LABELS[metric]
    header = ["", "method", "tau", "mIoU", f"Δ {label}", "95% interval", "mAcc"]
    header += [f"select {label}"] if split else []
    selected = report["selected"]
    lines = []
    for row in report["rows"]:
        chosen = (row["method"], row["tau"], row["auto"]) == (
            selected["method"],
            selected["tau"],
            selected["auto"],
        )
        mark = "*" if chosen else "x" if row.get("excluded") else ""
        tau = "-" if row["tau"] is None else f"{row['tau']:g}" + (" auto" if row["auto"] else "")
        cells = [
            mark,
            row["method"],
            tau,
            _pct(row["miou"]),
            _signed(row["gain"]),
            _interval(row["gain_ci95"]),
            _pct(row["macc"]),
        ] + ([_pct(row[f"selection_{metric}"])] if split else [])
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    render = [
        "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        for cells in [header, *lines]
    ]
    where = (
        f"held-out images ({len(report['split']['held_out'])}); selected on "
        f"{len(report['split']['select'])} other images"
        if split
        else f"all {report['num_images']} images (selection and figures on the same images: "
        "optimistic; use --select-on N for an honest figure)"
    )
    stride = report.get("pixel_stride", 1)
    if stride > 1:
        where += f"; every {stride}th pixel of each axis (--pixel-stride {stride})"
    return "\n".join([f"figures on {where}", *render]) + "\n"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """What the selection is and how far to trust it: the lines printed after the table."""
    chosen = report["selected"]
    metric = chosen.get("metric", "miou")
    label = METRIC_LABELS[metric]
    tau = "" if chosen["tau"] is None else f" --tau {chosen['tau']:g}"
    gain, interval = chosen["gain_over_none"], chosen.get("gain_ci95")
    figures = f"{label} {_pct(chosen[metric])}"
    if gain is not None:
        figures += f", {gain:+.2f} over none"
    if interval is not None:
        figures += f", 95% interval {_interval(interval)}"
    lines = [f"selected: --method {chosen['method']}{tau} ({figures})"]
    if chosen["method"] != "none" and includes_zero(interval):
        images = len(report["split"]["held_out"]) if report["split"] else report["num_images"]
        lines.append(
            f"note: the 95% interval of this gain includes 0: on these {images} images it is "
            "not told apart from no gain (more labelled images narrow it)"
        )
    edge = chosen.get("edge")
    if edge is not None:
        where = "top" if edge["side"] == "top" else "lowest non-zero strength"
        lines.append(
            f"note: tau {chosen['tau']:g} is the {where} of the grid tried for "
            f"{chosen['method']}: the best may lie beyond it; try --tau {edge['next_tau']:g} too"
        )
    excluded = [r for r in report["rows"] if r.get("excluded")]
    if excluded:
        limit = report["settings"].get("max_class_loss")
        lines.append(
            f"--max-class-loss {limit:g}: {len(excluded)} row(s) left out of the selection "
            f"(each lowers a class's IoU by more than {limit:g} points; 'excluded' in the JSON "
            "says which)"
        )
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _interval(value: Sequence[float] | None) -> str:
    return "-" if value is None else f"[{value[0]:+.2f}, {value[1]:+.2f}]"


def plot_compare(path: Path, report: dict[str, Any]) -> None:
    """The selection metric against tau per method; the per-class IoU gain of the selected row."""
    from blda_posthoc.report.plots import require_matplotlib, save_figure

    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    metric = report["selected"].get("metric", "miou")
    label = {"miou": "mIoU", "macc": "mAcc"}[metric]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    none = rows[0][metric]
    for k, method in enumerate(METHODS):
        mine = [r for r in rows if r["method"] == method and not r["auto"]]
        if not mine or method == "none":
            continue
        colour = f"C{k % 10}"
        if mine[0]["tau"] is None:
            left.axhline(
                mine[0][metric] or 0, color=colour, linestyle="--", linewidth=1, label=method
            )
            continue
        # A method whose tau = 0 is the plain argmax has no tau = 0 row: the none line is it.
        taus, values = [r["tau"] for r in mine], [r[metric] for r in mine]
        left.plot(taus, values, marker="o", color=colour, label=method)
    if none is not None:
        left.axhline(none, color="black", linewidth=1, label="none")
    left.set_xlabel("tau (strength)")
    left.set_ylabel(f"{label} (%) on {report['evaluated_on']}")
    left.legend(fontsize="small", ncol=2)
    left.set_title(f"{label} against strength")
    selected = report["selected"]
    best = next(
        r
        for r in rows
        if (r["method"], r["tau"], r["auto"])
        == (selected["method"], selected["tau"], selected["auto"])
    )
    names = list(best["per_class"])
    gains = [
        (best["per_class"][n]["iou"] or 0.0) - (rows[0]["per_class"][n]["iou"] or 0.0)
        for n in names
    ]
    colours = ["tab:green" if g >= 0 else "tab:red" for g in gains]
    right.bar(range(len(names)), gains, color=colours)
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xticks(range(len(names)))
    right.set_xticklabels(names, rotation=60, ha="right")
    right.set_ylabel("IoU gain over none (points)")
    tau = "" if selected["tau"] is None else f", tau {selected['tau']:g}"
    right.set_title(f"selected: {selected['method']}{tau}")
    save_figure(fig, path)


def check_methods(names: Sequence[str]) -> list[str]:
    """``--methods`` values (``all`` or names), in the canonical order.

    ``all`` is :data:`~blda_posthoc.core.methods.COMPARE_DEFAULT` (every method but those the
    benchmark found never worth it); names add any method.
    """
    for name in names:
        reason = removed_reason(name)
        if reason is not None:
            raise InputError(f"--methods {reason}")
    wanted = set(names).difference({"all"}) | (set(COMPARE_DEFAULT) if "all" in names else set())
    unknown = sorted(wanted.difference(METHODS))
    if unknown:
        raise InputError(
            f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})"
        )
    return [m for m in METHODS if m in wanted]


def parse_grid(text: str) -> list[float]:
    """``--tau 0,0.1,0.5`` as sorted unique finite values >= 0."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise InputError(f"--tau: {part.strip()!r} is not a number") from None
        if not np.isfinite(value) or value < 0:
            raise InputError(f"--tau: {part.strip()!r} must be a finite number >= 0")
        values.append(value)
    return sorted(set(values))
