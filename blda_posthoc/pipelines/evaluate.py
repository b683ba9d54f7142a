"""Evaluation over PNG prediction folders or logits stores, before and after correction."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blda_posthoc.core.bootstrap import gain_intervals, image_counts
from blda_posthoc.core.classes import IGNORE_INDEX, default_names
from blda_posthoc.core.correct import correct_image, resize_logits
from blda_posthoc.core.evaluate import (
    CalibrationError,
    ConfusionMatrix,
    softmax_confidence,
    summarize,
)
from blda_posthoc.core.methods import Plain
from blda_posthoc.errors import InputError
from blda_posthoc.io.images import find_files, read_label, suffix_hint
from blda_posthoc.io.jsonfiles import count_array, read_parts, read_report
from blda_posthoc.io.names import check_class_names
from blda_posthoc.io.schema import MAX_COUNT_SUM, Node
from blda_posthoc.io.store import MAX_CLASSES, LogitStore, shard_names
from blda_posthoc.pipelines.console import info, progress, warn
from blda_posthoc.pipelines.correct import EXTRA_OUTPUTS
from blda_posthoc.pipelines.corrections import Correction
from blda_posthoc.report.tables import Result, round_or_none

PLAIN = Plain()
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


def pair_names(
    predicted: list[str],
    labelled: list[str],
    allow_missing: bool,
    where: str,
    *,
    command: str = "evaluate",
) -> Pairs:
    """Match predictions with labels by name.

    A label without a prediction is an error unless ``allow_missing``; a prediction without a
    label is skipped (prediction folders may hold colour previews and other files).

    Args:
        predicted: Names that have a prediction.
        labelled: Names that have a label.
        allow_missing: Evaluate the pairs that exist when some predictions are missing.
        where: Describes a missing prediction's expected location; ``{name}`` is filled in.
        command: The command asking: only ``evaluate`` has ``--allow-missing`` to suggest.
    """
    have = set(predicted)
    pairs = Pairs(
        names=sorted(n for n in labelled if n in have),
        missing=sorted(n for n in labelled if n not in have),
        unlabelled=sorted(have.difference(labelled)),
    )
    if pairs.missing and not allow_missing:
        first = where.format(name=pairs.missing[0])
        hint = "; --allow-missing evaluates the rest" if command == "evaluate" else ""
        raise InputError(
            f"{first}: no prediction for this label ({len(pairs.missing)} of {len(labelled)} "
            f"labels have none{hint})"
        )
    if pairs.missing:
        warn(f"{len(pairs.missing)} labelled images have no prediction and are left out")
    if pairs.unlabelled:
        warn(f"{len(pairs.unlabelled)} predictions have no label and are left out")
    if not pairs.names:
        raise InputError("no image has both a prediction and a label")
    return pairs


def find_labels(labels_dir: Path, label_suffix: str, names: list[str]) -> dict[str, Path]:
    """The label PNGs of ``labels_dir`` by name; refuse when none fits the predicted ``names``.

    When no predicted name has a label but the folder holds files that extend the names, the
    error suggests the ``--label-suffix`` (e.g. ``x_gtFine_labelTrainIds.png`` for ``x``).

    Args:
        labels_dir: Folder of ``NAME<label_suffix>.png`` labels.
        label_suffix: Suffix of the label stems.
        names: Names that have a prediction.
    """
    labels = find_files(labels_dir, (".png",), label_suffix)
    if names and not any(n in labels for n in names):
        hint = suffix_hint(names, find_files(labels_dir, (".png",)))
        if not labels:
            raise InputError(
                f"{labels_dir}: no label PNG (with suffix {label_suffix!r}) found{hint}"
            )
        if hint:
            raise InputError(
                f"{labels_dir}: no label for {len(names)} image(s), e.g. {names[0]!r}{hint}"
            )
    if not labels:
        raise InputError(f"{labels_dir}: no label PNG (with suffix {label_suffix!r}) found")
    return labels


def add_pixels(cm: ConfusionMatrix, pred: Any, label: Any, source: Path | str) -> None:
    """``cm.update`` that names the offending file in its error."""
    try:
        cm.update(pred, label)
    except ValueError as exc:
        raise InputError(f"{source}: {exc}") from exc


# ---------------------------------------------------------------- --pred-dir


FOLDER_REPORTS = (("correct.json", "blda-correct"), ("manifest.json", "blda-relabel"))
"""The summaries ``correct`` and ``relabel`` write beside their PNGs, which name the classes."""


def folder_class_names(pred_dir: Path) -> tuple[list[str], Path] | None:
    """The class names of a ``correct`` or ``relabel`` output folder, from its summary.

    Args:
        pred_dir: ``--pred-dir``.

    Returns:
        ``(names, the file they come from)``, or None when the folder holds neither
        ``correct.json`` nor ``manifest.json``.
    """
    for name, kind in FOLDER_REPORTS:
        path = pred_dir / name
        if not path.is_file():
            continue
        names = read_report(path, kind, f"'{kind}' summary").get("class_names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InputError(f"{path}: 'class_names' is not a list of names")
        return check_class_names(names, str(path)), path
    return None


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


def drop_previews(preds: dict[str, Path], labelled: Iterable[str] = ()) -> dict[str, Path]:
    """Leave out the extra files that ``correct`` and ``relabel`` write beside predictions.

    ``NAME_color.png`` (``--color``) and ``NAME_labelIds.png`` (``--cityscapes-ids``) are not
    predictions when ``NAME.png`` is there too: they are skipped, and a note says how many.
    Such a file is a prediction of its own when ``NAME.png`` is not there, or when an image of
    that name has a label (``labelled``).
    """
    labelled = set(labelled)
    kept, skipped = {}, 0
    for name, path in preds.items():
        if name not in labelled and any(
            name.endswith(suffix) and name[: -len(suffix)] in preds
            for suffix in EXTRA_OUTPUTS.values()
        ):
            skipped += 1
        else:
            kept[name] = path
    if skipped:
        info(
            f"note: skipped {skipped} NAME_color.png / NAME_labelIds.png files beside NAME.png "
            "(the extra outputs of --color and --cityscapes-ids)"
        )
    return kept


def evaluate_pred_dir(
    pred_dir: Path,
    labels_dir: Path,
    label_suffix: str,
    num_classes: int | None,
    allow_missing: bool,
    *,
    ignore_pred_ignore: bool = False,
) -> tuple[ConfusionMatrix, Pairs]:
    """Accumulate the confusion matrix of PNG predictions against PNG labels.

    Args:
        pred_dir: Folder of ``NAME.png`` predictions.
        labels_dir: Folder of ``NAME<label_suffix>.png`` labels.
        label_suffix: Suffix of the label stems.
        num_classes: ``C`` when known; else every id 0..254 is tracked (resize later).
        allow_missing: See :func:`pair_names`.
        ignore_pred_ignore: Leave out pixels predicted as 255 instead of counting them as wrong
            (see :class:`~blda_posthoc.core.evaluate.ConfusionMatrix`).
    """
    found = find_files(pred_dir, (".png",))
    labels = find_labels(labels_dir, label_suffix, list(found))
    preds = drop_previews(found, labels)
    where = f"{labels_dir}/{{name}}{label_suffix}.png"
    pairs = pair_names(list(preds), list(labels), allow_missing, where)
    cm = ConfusionMatrix(
        num_classes if num_classes is not None else ALL_IDS, ignore_pred_ignore=ignore_pred_ignore
    )
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


class Pass:
    """Confusion matrix and calibration error of one set of store predictions.

    Attributes:
        cm: The confusion matrix of every image.
        ece: The calibration error.
        images: ``(3, C)`` counts of every image by name
            (:func:`blda_posthoc.core.bootstrap.image_counts`) for the bootstrap interval of
            a before/after gain; None when not kept.
    """

    def __init__(self, num_classes: int, *, per_image: bool = False) -> None:
        self.cm = ConfusionMatrix(num_classes)
        self.ece = CalibrationError()
        self.images: dict[str, np.ndarray] | None = {} if per_image else None

    def add(
        self,
        pred: torch.Tensor,
        scores: torch.Tensor,
        label: torch.Tensor,
        source: str,
        image: str | None = None,
    ) -> None:
        """Add one image: ``(H, W)`` prediction, ``(C, H, W)`` log-scores, ``(H, W)`` label.

        ``source`` names the label in errors; ``image`` is the image's name, under which its
        counts are kept when :attr:`images` is.
        """
        if self.images is None or image is None:
            add_pixels(self.cm, pred, label, source)
        else:
            one = ConfusionMatrix(self.cm.num_classes)
            add_pixels(one, pred, label, source)
            self.cm.merge(one)
            self.images[image] = image_counts(one.matrix)
        confidence, top = softmax_confidence(scores)
        valid = label != IGNORE_INDEX
        self.ece.update_confidence(confidence[valid], (top == label.long())[valid])

    def result(self) -> Result:
        """Metrics so far."""
        confusion = self.cm.compute()
        return Result(summarize(confusion), self.ece.compute(), confusion)


def store_labels(
    store: LogitStore,
    labels_dir: Path | None,
    label_suffix: str,
    allow_missing: bool,
    *,
    command: str = "evaluate",
) -> tuple[Pairs, dict[str, Path]]:
    """Pair the store's images with labels from ``labels_dir`` or from the store itself.

    With the store's own labels, images without one are found while reading (see
    :func:`iterate_store`); here the store only has to hold labels for all of them unless
    ``allow_missing``.

    Args:
        store: The logits.
        labels_dir: ``--labels DIR``, or None for the store's own labels.
        label_suffix: Suffix of the label stems.
        allow_missing: Evaluate the labelled images when some have no label.
        command: The command asking, for messages (only ``evaluate`` has ``--allow-missing``).
    """
    if labels_dir is not None:
        files = find_labels(labels_dir, label_suffix, list(store.names))
        where = f"{labels_dir}/{{name}}{label_suffix}.png"
        pairs = pair_names(store.names, list(files), allow_missing, where, command=command)
        return pairs, files
    if not store.names:
        raise InputError(f"{store.paths[0]}: the store holds no complete image")
    if not store.has_labels() and not allow_missing:
        rest = ", or --allow-missing to evaluate the labelled ones" if command == "evaluate" else ""
        raise InputError(
            f"{store.paths[0]}: some images have no label ({command} needs a label for every "
            f"image: give --labels DIR{rest})"
        )
    return Pairs(list(store.names)), {}


def every_label(store: LogitStore, labels_dir: Path, label_suffix: str) -> dict[str, Path]:
    """The label PNG of every image of the store, for commands that use all of them.

    ``diagnose`` and ``relabel`` describe every image, so (unlike :func:`store_labels`) an image
    without a label is an error, with the ``--label-suffix`` hint of :func:`find_labels`; labels
    of images not in the store are not used.

    Args:
        store: The logits.
        labels_dir: Folder of ``NAME<label_suffix>.png`` labels (``--labels DIR``).
        label_suffix: Suffix of the label stems.

    Returns:
        ``{name: path}`` in the store's order.
    """
    files = find_labels(labels_dir, label_suffix, list(store.names))
    missing = [name for name in store.names if name not in files]
    if missing:
        hint = suffix_hint(missing, find_files(labels_dir, (".png",)))
        raise InputError(
            f"{labels_dir}: no label for {len(missing)} of {len(store.names)} image(s), e.g. "
            f"{missing[0]!r} (expected {labels_dir / (missing[0] + label_suffix)}.png){hint}"
        )
    return {name: files[name] for name in store.names}


def label_source(store: LogitStore, label_files: dict[str, Path], name: str) -> str:
    """Where image ``name``'s label comes from, for messages: its PNG, or the store."""
    if name in label_files:
        return str(label_files[name])
    return f"{store.path_of(name)}: image {name!r}"


def iterate_store(
    store: LogitStore,
    pairs: Pairs,
    label_files: dict[str, Path],
    device: torch.device,
    *,
    command: str = "evaluate",
    resize: bool = True,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(name, logits (C, H, W) at label size, label (H, W))`` on ``device``.

    Images without a label are skipped and moved from ``pairs.names`` to ``pairs.unlabelled``.
    ``command`` names the progress bar.
    With ``resize=False`` the logits come as stored, ``(C, h, w)`` (resized to the image's own
    size first only when the label has another size, as ``resize=True`` would do).
    """
    images = store.iter_images(
        list(pairs.names),
        device=device,
        with_label=not label_files,
        progress=lambda it, n: progress(it, n, command),
        resize=resize,
    )
    for record, z in images:
        name = record.name
        label = read_label(label_files[name]) if name in label_files else record.label
        if label is None:
            pairs.names.remove(name)
            pairs.unlabelled.append(name)
            continue
        size = (int(label.shape[0]), int(label.shape[1]))
        if resize:
            z = resize_logits(z, size)
        elif size != tuple(record.size):  # a label of another size: as resize=True would
            z = resize_logits(z, record.size)
        yield name, z, torch.from_numpy(label).to(device)


def evaluate_store(
    store: LogitStore,
    pairs: Pairs,
    label_files: dict[str, Path],
    correction: Correction | None,
    device: torch.device,
    *,
    per_image: bool = False,
) -> tuple[Pass, Pass | None]:
    """Evaluate the plain argmax of the logits and, with ``correction``, the corrected one.

    Args:
        store: The logits.
        pairs: Images with labels.
        label_files: Label PNGs by name (empty: the store's own labels).
        correction: The correction, or None.
        device: Where to compute.
        per_image: Keep every image's counts (:attr:`Pass.images`) for the bootstrap.

    Returns:
        The accumulators (``.result()`` gives the metrics) of the plain and corrected passes.
    """
    c = store.num_classes
    plain = Pass(c, per_image=per_image)
    corrected = Pass(c, per_image=per_image) if correction is not None else None
    for name, z, label in iterate_store(store, pairs, label_files, device):
        size = (int(label.shape[0]), int(label.shape[1]))
        source = label_source(store, label_files, name)
        pred, scores = correct_image(z, size, PLAIN)
        plain.add(pred, scores, label, source, name)
        if correction is not None and corrected is not None:
            pred, scores = correct_image(z, size, correction.corrector, correction.tau)
            corrected.add(pred, scores, label, source, name)
    return plain, corrected


def gain_interval(
    before: Pass, after: Pass | None, *, n: int, seed: int
) -> list[float | None] | None:
    """The 95 % paired bootstrap interval of the mIoU gain ``after - before`` over images.

    None without a corrected pass, per-image counts or resamples (see
    :func:`blda_posthoc.core.bootstrap.gain_intervals`); images are resampled in name order.
    """
    if after is None or before.images is None or after.images is None or n == 0:
        return None
    names = sorted(before.images)
    if not names:
        return None
    interval = gain_intervals(
        [np.stack([after.images[k] for k in names])],
        np.stack([before.images[k] for k in names]),
        metric="miou",
        n=n,
        seed=seed,
    )[0]
    return None if interval is None else [round_or_none(v) for v in interval]


# ---------------------------------------------------------------- shards


def shard_pairs(pairs: Pairs, names: list[str], shard: tuple[int, int] | None) -> Pairs:
    """The pairs of shard ``(K, N)`` of a store whose images are ``names``.

    The pairing is made over every image first (so every shard reports the same missing
    labels, counted once, by shard 1); the shard keeps its share (see
    :func:`blda_posthoc.io.store.shard_names`) of the evaluated and unlabelled names.
    """
    if shard is None:
        return pairs
    mine = set(shard_names(names, shard))
    return Pairs(
        names=[n for n in pairs.names if n in mine],
        missing=list(pairs.missing) if shard[0] == 1 else [],
        unlabelled=[n for n in pairs.unlabelled if n in mine],
    )


def pass_state(p: Pass) -> dict[str, Any]:
    """The raw accumulators of a pass, JSON-ready (floats round-trip exactly).

    ``images``: the per-image ``(3, C)`` counts in name order (None when not kept).
    """
    return {
        "confusion": p.cm.matrix.tolist(),
        "ece_bins": {
            "count": p.ece.count.tolist(),
            "confidence_sum": p.ece.confidence_sum.tolist(),
            "correct_sum": p.ece.correct_sum.tolist(),
        },
        "images": None if p.images is None else [p.images[k].tolist() for k in sorted(p.images)],
    }


def pass_from_state(
    state: Node, num_classes: int, source: Path, names: list[str] | None = None
) -> Pass:
    """A :class:`Pass` from :func:`pass_state` output, checked.

    The confusion matrix is ``(C, C + 1)`` whole counts; the ECE bins are whole pixel counts
    ``n_b``, correct counts ``0 <= correct_b <= n_b`` and confidence sums
    ``0 <= sum_b <= n_b`` (each confidence lies in ``[0, 1]``). ``names``: the part's image
    names, in the order of its per-image counts.
    """
    p = Pass(num_classes)
    images = state.get("images")
    if images is not None:
        if names is None:
            raise InputError(f"{source}: damaged partial block (per-image counts without names)")
        counts = count_array(images, (len(names), 3, num_classes), source, "images")
        p.images = dict(zip(names, counts, strict=True))
    matrix = count_array(state["confusion"], p.cm.matrix.shape, source, "confusion")
    bins = state["ece_bins"]
    nb = p.ece.num_bins
    count = count_array(bins["count"], (nb,), source, "ece_bins.count")
    correct = count_array(bins["correct_sum"], (nb,), source, "ece_bins.correct_sum")
    confidence = bins["confidence_sum"].reals((nb,), low=0.0)
    slack = 1e-6 * np.maximum(count, 1)
    if (correct > count).any() or (confidence > count + slack).any():
        raise bins.error("a bin holds more correct pixels or confidence than pixels")
    p.cm.matrix = matrix
    p.ece.count, p.ece.confidence_sum, p.ece.correct_sum = count, confidence, correct
    if p.images is not None and not np.array_equal(
        sum(p.images.values(), np.zeros((3, num_classes), np.int64)), image_counts(matrix)
    ):
        raise InputError(
            f"{source}: damaged partial block (images do not add up to the confusion matrix)"
        )
    return p


def partial_block(
    shard: tuple[int, int],
    class_names: list[str],
    before: Pass,
    after: Pass | None,
    counts: dict[str, int],
) -> dict[str, Any]:
    """The ``"partial"`` block of a shard's JSON report: what ``--merge`` adds up.

    ``names`` (the images, in the order of the passes' per-image counts) is there when the
    passes keep per-image counts.
    """
    return {
        "shard": list(shard),
        "class_names": class_names,
        "counts": counts,
        "names": None if before.images is None else sorted(before.images),
        "before": pass_state(before),
        "after": pass_state(after) if after is not None else None,
    }


@dataclass
class Merged:
    """Shards' partial results added up (see :func:`merge_partials`)."""

    class_names: list[str]
    before: Pass
    after: Pass | None
    counts: dict[str, int]
    settings: dict[str, Any]


COUNT_KEYS = ("num_images", "num_missing_predictions", "num_unlabelled_predictions")
"""The image counts of a shard's partial block (see :meth:`Pairs.counts`)."""


def merge_partials(paths: list[Path]) -> Merged:
    """Add up the ``"partial"`` blocks of the ``evaluate --json`` reports of shards 1..N.

    Every shard must be there exactly once, with the same N, classes and settings.
    """
    merged: Merged | None = None
    for path, data in read_parts(paths, "blda-evaluate"):
        part = data["partial"]
        names = part["class_names"].strings(max_length=MAX_CLASSES, unique=True)
        counts = {key: part["counts"][key].integer(low=0, high=MAX_COUNT_SUM) for key in COUNT_KEYS}
        settings = {key: value.value for key, value in data["settings"].fields().items()}
        images = part.get("names")
        image_names = None if images is None else images.strings()
        before = pass_from_state(part["before"], len(names), path, image_names)
        after_state = part["after"]
        after = (
            None
            if after_state.is_null
            else pass_from_state(after_state, len(names), path, image_names)
        )
        if merged is None:
            merged = Merged(names, before, after, counts, settings)
            continue
        if names != merged.class_names or settings != merged.settings:
            raise InputError(
                f"{path}: not of the same run as the other parts (other classes or settings)"
            )
        if (after is None) != (merged.after is None):
            raise InputError(f"{path}: one part has a correction, another has none")
        for into, part_pass in ((merged.before, before), (merged.after, after)):
            if into is None or part_pass is None:
                continue
            into.cm.merge(part_pass.cm)
            into.ece.merge(part_pass.ece)
            if (into.images is None) != (part_pass.images is None):
                raise InputError(f"{path}: one part has per-image counts, another has none")
            if into.images is not None and part_pass.images is not None:
                into.images.update(part_pass.images)
        for key, value in counts.items():
            merged.counts[key] = merged.counts.get(key, 0) + value
    assert merged is not None
    return merged


# ---------------------------------------------------------------- command
