"""``blda evaluate``: segmentation metrics of PNG predictions or of a store, before/after."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from blda_posthoc.cli.common import (
    check_output_file,
    class_names_option,
    device_option,
    handle_errors,
    info,
    overwrite_option,
    parse_class_names,
    progress,
    resolve_device,
    warn,
)
from blda_posthoc.core.classes import IGNORE_INDEX, default_names
from blda_posthoc.core.correct import (
    DEFAULT_CLAMP,
    DEFAULT_TAU,
    AlignmentMaps,
    build_maps,
    predict,
    resize_logits,
)
from blda_posthoc.core.evaluate import (
    CalibrationError,
    ConfusionMatrix,
    softmax_confidence,
    summarize,
)
from blda_posthoc.io.correct import COLOR_SUFFIX
from blda_posthoc.io.errors import InputError
from blda_posthoc.io.images import find_files, read_label
from blda_posthoc.io.report import (
    Result,
    build_report,
    format_markdown,
    format_table,
    plot_iou,
    require_matplotlib,
    write_json,
    write_text,
)
from blda_posthoc.io.stats import read_stats
from blda_posthoc.io.store import LogitStore, expand_store_paths

ALL_IDS = IGNORE_INDEX
"""Classes tracked while the class count is still unknown: every id but the ignore value."""


@dataclass
class Pairs:
    """Images to evaluate: names with a prediction and a label, and what was left out.

    Attributes:
        names: Names evaluated, sorted.
        missing: Labelled names without a prediction.
        unlabelled: Predicted names without a label.
    """

    names: list[str]
    missing: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """The counts that go into the report."""
        return {
            "num_images": len(self.names),
            "num_missing_predictions": len(self.missing),
            "num_unlabelled_predictions": len(self.unlabelled),
        }


def pair_names(predicted: list[str], labelled: list[str], allow_missing: bool, where: str) -> Pairs:
    """Match predictions with labels by name.

    A label without a prediction is an error unless ``allow_missing``; a prediction without a
    label is skipped (prediction folders may hold colour previews and other files).

    Args:
        predicted: Names that have a prediction.
        labelled: Names that have a label.
        allow_missing: Evaluate the pairs that exist when some predictions are missing.
        where: Describes a missing prediction's expected location; ``{name}`` is filled in.
    """
    have = set(predicted)
    pairs = Pairs(
        names=sorted(n for n in labelled if n in have),
        missing=sorted(n for n in labelled if n not in have),
        unlabelled=sorted(have.difference(labelled)),
    )
    if pairs.missing and not allow_missing:
        first = where.format(name=pairs.missing[0])
        raise InputError(
            f"{first}: no prediction for this label ({len(pairs.missing)} of {len(labelled)} "
            "labels have none; --allow-missing evaluates the rest)"
        )
    if pairs.missing:
        warn(f"{len(pairs.missing)} labelled images have no prediction and are left out")
    if pairs.unlabelled:
        warn(f"{len(pairs.unlabelled)} predictions have no label and are left out")
    if not pairs.names:
        raise InputError("no image has both a prediction and a label")
    return pairs


def add_pixels(cm: ConfusionMatrix, pred: Any, label: Any, source: Path | str) -> None:
    """``cm.update`` that names the offending file in its error."""
    try:
        cm.update(pred, label)
    except ValueError as exc:
        raise InputError(f"{source}: {exc}") from exc


# ---------------------------------------------------------------- --pred-dir


def resolve_classes(
    names: list[str] | None, num_classes: int | None, cm: ConfusionMatrix | None
) -> list[str]:
    """Class names from ``--class-names`` / ``--num-classes``, or inferred from ``cm``."""
    if names is not None:
        if num_classes is not None and num_classes != len(names):
            raise InputError(f"--num-classes {num_classes} but --class-names gives {len(names)}")
        return names
    if num_classes is not None:
        return default_names(num_classes)
    assert cm is not None
    largest = cm.largest_id()
    if largest < 0:
        raise InputError("every label pixel is ignore (255): nothing to evaluate")
    info(
        f"note: no --class-names or --num-classes; inferred {largest + 1} classes from the "
        f"largest id present ({largest})"
    )
    return default_names(largest + 1)


def drop_previews(preds: dict[str, Path]) -> dict[str, Path]:
    """Leave out ``NAME_color.png`` colour previews that ``blda correct --color`` writes."""
    return {
        name: path
        for name, path in preds.items()
        if not (name.endswith(COLOR_SUFFIX) and name[: -len(COLOR_SUFFIX)] in preds)
    }


def evaluate_pred_dir(
    pred_dir: Path,
    labels_dir: Path,
    label_suffix: str,
    num_classes: int | None,
    allow_missing: bool,
) -> tuple[ConfusionMatrix, Pairs]:
    """Accumulate the confusion matrix of PNG predictions against PNG labels.

    Args:
        pred_dir: Folder of ``NAME.png`` predictions.
        labels_dir: Folder of ``NAME<label_suffix>.png`` labels.
        label_suffix: Suffix of the label stems.
        num_classes: ``C`` when known; else every id 0..254 is tracked (resize later).
        allow_missing: See :func:`pair_names`.
    """
    preds = drop_previews(find_files(pred_dir, (".png",)))
    labels = find_files(labels_dir, (".png",), label_suffix)
    if not labels:
        raise InputError(f"{labels_dir}: no label PNG (with suffix {label_suffix!r}) found")
    where = f"{labels_dir}/{{name}}{label_suffix}.png"
    pairs = pair_names(list(preds), list(labels), allow_missing, where)
    cm = ConfusionMatrix(num_classes if num_classes is not None else ALL_IDS)
    for name in progress(pairs.names, len(pairs.names), "evaluate"):
        label = read_label(labels[name])
        pred = read_label(preds[name])
        if pred.shape != label.shape:
            raise InputError(
                f"{preds[name]}: prediction is {pred.shape[0]}x{pred.shape[1]} but its label "
                f"{labels[name]} is {label.shape[0]}x{label.shape[1]}"
            )
        add_pixels(cm, pred, label, labels[name])
    return cm, pairs


# ---------------------------------------------------------------- --store


@dataclass
class Correction:
    """What the after-correction pass needs, and how it was set up (for the report)."""

    maps: AlignmentMaps
    tau: float
    settings: dict[str, Any]


def load_correction(
    stats_path: Path,
    anchors_path: Path | None,
    tau: float,
    clamp: float,
    min_pixels: int | None,
    class_names: list[str],
    device: torch.device,
) -> Correction:
    """Read the statistics and tabulate the alignment maps."""
    cond = read_stats(stats_path)
    anchors = read_stats(anchors_path) if anchors_path is not None else cond
    if cond.num_classes != len(class_names):
        raise InputError(
            f"{stats_path}: statistics for {cond.num_classes} classes, the store has "
            f"{len(class_names)}"
        )
    if cond.class_names != class_names:
        warn(f"{stats_path}: class names differ from the store's; matching by position")
    try:
        maps = build_maps(cond, anchors, clamp=clamp, min_pixels=min_pixels)
    except ValueError as exc:
        raise InputError(f"{anchors_path or stats_path}: {exc}") from exc
    skipped = maps.skipped
    if skipped:
        warn(f"{len(skipped)} of {len(class_names) ** 2} cells have too few pixels: no shift")
    settings = {
        "tau": tau,
        "clamp": clamp,
        "min_pixels": min_pixels if min_pixels is not None else cond.settings.get("min_pixels"),
        "stats": str(stats_path),
        "stats_fingerprint": cond.fingerprint,
        "anchors": str(anchors_path or stats_path),
        "anchors_fingerprint": anchors.fingerprint,
        "skipped_cells": [list(ij) for ij in skipped],
    }
    return Correction(maps.to(device), tau, settings)


class Pass:
    """Confusion matrix and calibration error of one set of store predictions."""

    def __init__(self, num_classes: int) -> None:
        self.cm = ConfusionMatrix(num_classes)
        self.ece = CalibrationError()

    def add(self, pred: torch.Tensor, scores: torch.Tensor, label: torch.Tensor, name: str) -> None:
        """Add one image: ``(H, W)`` prediction, ``(C, H, W)`` log-scores, ``(H, W)`` label."""
        add_pixels(self.cm, pred, label, name)
        confidence, top = softmax_confidence(scores)
        valid = label != IGNORE_INDEX
        self.ece.update_confidence(confidence[valid], (top == label.long())[valid])

    def result(self) -> Result:
        """Metrics so far."""
        return Result(summarize(self.cm.compute()), self.ece.compute())


def store_labels(
    store: LogitStore, labels_dir: Path | None, label_suffix: str, allow_missing: bool
) -> tuple[Pairs, dict[str, Path]]:
    """Pair the store's images with labels from ``labels_dir`` or from the store itself.

    With the store's own labels, images without one are found while reading (see
    :func:`iterate_store`); here the store only has to hold labels for all of them unless
    ``allow_missing``.
    """
    if labels_dir is not None:
        files = find_files(labels_dir, (".png",), label_suffix)
        if not files:
            raise InputError(f"{labels_dir}: no label PNG (with suffix {label_suffix!r}) found")
        where = f"{labels_dir}/{{name}}{label_suffix}.png"
        return pair_names(store.names, list(files), allow_missing, where), files
    if not store.names:
        raise InputError(f"{store.paths[0]}: the store holds no complete image")
    if not store.has_labels() and not allow_missing:
        raise InputError(
            f"{store.paths[0]}: some images have no label (give --labels DIR, or "
            "--allow-missing to evaluate the labelled ones)"
        )
    return Pairs(list(store.names)), {}


def iterate_store(
    store: LogitStore, pairs: Pairs, label_files: dict[str, Path], device: torch.device
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(name, logits (C, H, W) at label size, label (H, W))`` on ``device``.

    Images without a label are skipped and moved from ``pairs.names`` to ``pairs.unlabelled``.
    """
    for name in progress(list(pairs.names), len(pairs.names), "evaluate"):
        record = store.read(name, with_label=name not in label_files)
        label = read_label(label_files[name]) if name in label_files else record.label
        if label is None:
            pairs.names.remove(name)
            pairs.unlabelled.append(name)
            continue
        size = (int(label.shape[0]), int(label.shape[1]))
        logits = torch.from_numpy(record.logits).to(device)
        yield name, resize_logits(logits, size), torch.from_numpy(label).to(device)


def evaluate_store(
    store: LogitStore,
    pairs: Pairs,
    label_files: dict[str, Path],
    correction: Correction | None,
    device: torch.device,
) -> tuple[Result, Result | None]:
    """Evaluate the plain argmax of the logits and, with ``correction``, the corrected one."""
    c = store.num_classes
    plain = Pass(c)
    corrected = Pass(c) if correction is not None else None
    for name, z, label in iterate_store(store, pairs, label_files, device):
        size = (int(label.shape[0]), int(label.shape[1]))
        pred, scores = predict(z, size, None)
        plain.add(pred, scores, label, name)
        if correction is not None and corrected is not None:
            pred, scores = predict(z, size, correction.maps, correction.tau)
            corrected.add(pred, scores, label, name)
    return plain.result(), corrected.result() if corrected is not None else None


# ---------------------------------------------------------------- command


def check_usage(
    pred_dir: Path | None,
    stores: tuple[str, ...],
    labels_dir: Path | None,
    stats: Path | None,
    anchors: Path | None,
    num_classes: int | None,
) -> None:
    """Reject option combinations that cannot work (click usage errors, exit 2)."""
    if (pred_dir is None) == (not stores):
        raise click.UsageError("give exactly one of --pred-dir DIR or --store STORE")
    if pred_dir is not None and labels_dir is None:
        raise click.UsageError("--pred-dir needs --labels DIR")
    if pred_dir is not None and stats is not None:
        raise click.UsageError("--stats needs --store (the correction works on logits)")
    if anchors is not None and stats is None:
        raise click.UsageError("--anchors needs --stats")
    if stores and num_classes is not None:
        raise click.UsageError("--num-classes is for --pred-dir; a store carries its classes")


def store_class_names(store: LogitStore, spec: str | None) -> list[str]:
    """The store's class names, optionally renamed by ``--class-names`` (same count)."""
    names = parse_class_names(spec)
    if names is None:
        return list(store.class_names)
    if len(names) != store.num_classes:
        raise InputError(
            f"--class-names gives {len(names)} names, the store has {store.num_classes} classes"
        )
    return names


def write_outputs(
    paths: dict[str, Path | None],
    class_names: list[str],
    before: Result,
    after: Result | None,
    counts: dict[str, int],
    settings: dict[str, Any],
) -> None:
    """Print the table and write the requested JSON, Markdown and plot files."""
    click.echo(format_table(class_names, before, after))
    if paths["json"] is not None:
        report = build_report(class_names, before, after, counts=counts, settings=settings)
        write_json(paths["json"], report)
        info(f"wrote {paths['json']}")
    if paths["markdown"] is not None:
        text = format_markdown(class_names, before, after, counts=counts, settings=settings)
        write_text(paths["markdown"], text)
        info(f"wrote {paths['markdown']}")
    if paths["plot"] is not None:
        plot_iou(paths["plot"], class_names, before, after)
        info(f"wrote {paths['plot']}")


def note_out_of_range(results: list[Result | None], num_classes: int) -> None:
    """Warn when predictions held ids outside the classes (they count as wrong)."""
    pixels = max((r.summary["out_of_range_pixels"] for r in results if r), default=0)
    if pixels:
        warn(
            f"{pixels} labelled pixels were predicted with ids outside 0..{num_classes - 1}; "
            "they count as wrong"
        )


PATH = click.Path(path_type=Path)
IN_DIR = click.Path(path_type=Path, file_okay=False)
IN_FILE = click.Path(path_type=Path, dir_okay=False)


@click.command("evaluate")
@click.option("--pred-dir", type=IN_DIR, help="Folder of NAME.png trainId predictions.")
@click.option(
    "--store",
    "stores",
    multiple=True,
    help="Logits store (repeat, or a quoted glob, for shards); evaluates its argmax.",
)
@click.option("--labels", "labels_dir", type=IN_DIR, help="Folder of NAME.png trainId labels.")
@click.option("--label-suffix", default="", help="Label stem suffix, e.g. _gtFine_labelTrainIds.")
@class_names_option
@click.option("--num-classes", type=click.IntRange(1, 255), help="Class count (for --pred-dir).")
@click.option("--stats", type=IN_FILE, help="Statistics: also evaluate after the correction.")
@click.option(
    "--anchors", type=IN_FILE, help="Statistics whose anchors are used (default --stats)."
)
@click.option(
    "--tau",
    type=click.FloatRange(min=0),
    default=DEFAULT_TAU,
    show_default=True,
    help="Correction strength.",
)
@click.option(
    "--clamp",
    type=click.FloatRange(0, 0.5, max_open=True),
    default=DEFAULT_CLAMP,
    show_default=True,
    help="CDF clamp r.",
)
@click.option(
    "--min-pixels",
    type=click.IntRange(min=1),
    default=None,
    help="Cells with fewer pixels get no shift [default: the stats file's setting].",
)
@click.option(
    "--allow-missing", is_flag=True, help="Evaluate the rest when predictions are missing."
)
@click.option("--json", "json_path", type=PATH, help="Write the report as JSON.")
@click.option("--markdown", "markdown_path", type=PATH, help="Write the report as Markdown.")
@click.option("--plot", "plot_path", type=PATH, help="Per-class IoU bar chart (needs matplotlib).")
@overwrite_option
@device_option
@handle_errors
def command(
    pred_dir: Path | None,
    stores: tuple[str, ...],
    labels_dir: Path | None,
    label_suffix: str,
    class_names: str | None,
    num_classes: int | None,
    stats: Path | None,
    anchors: Path | None,
    tau: float,
    clamp: float,
    min_pixels: int | None,
    allow_missing: bool,
    json_path: Path | None,
    markdown_path: Path | None,
    plot_path: Path | None,
    overwrite: bool,
    device: str,
) -> None:
    """Per-class IoU, accuracy, Bias and pred/true ratio; mIoU, mAcc, IoU std, ECE.

    Predictions come from --pred-dir (PNGs) or --store (argmax of the logits, upsampled
    bilinearly to the label size); labels from --labels or the store. With --stats the store is
    evaluated before and after the correction in one run. The table goes to stdout.
    """
    check_usage(pred_dir, stores, labels_dir, stats, anchors, num_classes)
    outputs = {"json": json_path, "markdown": markdown_path, "plot": plot_path}
    for path in outputs.values():
        if path is not None:
            check_output_file(path, overwrite)
    if plot_path is not None:
        require_matplotlib()
    if pred_dir is not None:
        assert labels_dir is not None
        run_pred_dir(
            pred_dir, labels_dir, label_suffix, class_names, num_classes, allow_missing, outputs
        )
    else:
        run_store(
            stores,
            labels_dir,
            label_suffix,
            class_names,
            stats,
            anchors,
            tau,
            clamp,
            min_pixels,
            allow_missing,
            outputs,
            resolve_device(device),
        )


def run_pred_dir(
    pred_dir: Path,
    labels_dir: Path,
    label_suffix: str,
    class_spec: str | None,
    num_classes: int | None,
    allow_missing: bool,
    outputs: dict[str, Path | None],
) -> None:
    """``evaluate --pred-dir``."""
    names = parse_class_names(class_spec)
    known = len(names) if names is not None else num_classes
    cm, pairs = evaluate_pred_dir(pred_dir, labels_dir, label_suffix, known, allow_missing)
    class_names = resolve_classes(names, num_classes, None if known else cm)
    if cm.num_classes != len(class_names):
        cm = cm.resized(len(class_names))
    result = Result(summarize(cm.compute()))
    note_out_of_range([result], len(class_names))
    settings = {
        "source": "pred_dir",
        "pred_dir": str(pred_dir),
        "labels": str(labels_dir),
        "label_suffix": label_suffix,
        "num_classes": len(class_names),
        "classes_inferred": known is None,
    }
    write_outputs(outputs, class_names, result, None, pairs.counts(), settings)


def run_store(
    stores: tuple[str, ...],
    labels_dir: Path | None,
    label_suffix: str,
    class_spec: str | None,
    stats: Path | None,
    anchors: Path | None,
    tau: float,
    clamp: float,
    min_pixels: int | None,
    allow_missing: bool,
    outputs: dict[str, Path | None],
    device: torch.device,
) -> None:
    """``evaluate --store``, optionally before and after the correction."""
    paths = expand_store_paths(stores)
    with LogitStore(paths) as store:
        class_names = store_class_names(store, class_spec)
        correction = None
        if stats is not None:
            correction = load_correction(
                stats, anchors, tau, clamp, min_pixels, list(store.class_names), device
            )
        pairs, label_files = store_labels(store, labels_dir, label_suffix, allow_missing)
        before, after = evaluate_store(store, pairs, label_files, correction, device)
    if pairs.unlabelled and not label_files:
        warn(f"{len(pairs.unlabelled)} images in the store have no label and are left out")
    if not pairs.names:
        raise InputError(f"{paths[0]}: no image has a label")
    note_out_of_range([before, after], len(class_names))
    settings: dict[str, Any] = {
        "source": "store",
        "stores": [str(p) for p in paths],
        "labels": str(labels_dir) if labels_dir is not None else "store",
        "label_suffix": label_suffix,
        "num_classes": len(class_names),
    }
    if correction is not None:
        settings.update(correction.settings)
    write_outputs(outputs, class_names, before, after, pairs.counts(), settings)
