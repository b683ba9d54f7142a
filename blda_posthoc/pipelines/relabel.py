"""Relabel a logits store into a pseudo-label set: trainId PNGs plus ``manifest.json``.

Two streaming passes when ``keep_portion`` is set (pass 1: per-class confidence histograms over
the whole store, giving the class thresholds; pass 2: write), one pass otherwise. Memory is one
image plus ``(C, 65536)`` histogram counts.

Shards (``--shard K/N``) split pass 1 into its own step with no barrier between processes: shard
K counts its images into ``OUT/relabel-counts-K-of-N.h5`` (:func:`count_shard`); then every shard
reads all N count files (:func:`read_counts`), adds them up (integers, so exactly the one-process
histograms) and writes its labels with the one-process thresholds. A count file (format
``blda-relabel-counts``, version 1) holds root attributes ``format``, ``version``, ``shard``
(``"K/N"``), ``digest`` (of the run's settings), ``grid_lo``/``grid_hi``/``grid_bins``, and
datasets ``run`` (the run's settings as JSON), ``names`` (the images counted) and ``counts``
(``(C, B)`` int64). A shard's manifest ``manifest-K-of-N.json`` also holds ``partial`` (its raw
counts: ``shard``, ``num_images``, ``after``, ``flows``, ``quality``), which
:func:`merge_manifests` adds up into the manifest of one process.

Manifest (format ``blda-relabel``, version 1), keys sorted, floats rounded to 6 decimals,
undefined values ``null``::

    {"format": "blda-relabel", "version": 1, "complete": true,
     "class_names": [...], "stores": [...], "num_images": n, "num_pixels": N,
     "settings": {"method", "tau", "clamp", "min_confidence", "keep_portion", "pseudo_dir",
                  "color", "cityscapes_ids", "weights_format", "out_suffix",
                  "pseudo_suffix"},
     "statistics": {"method", "tau", "stats", "stats_fingerprint", "stats_labels", "anchors",
                    "anchors_fingerprint", "estimator", ...},  (io.corrections.Correction)
     "pixels": {"argmax": {<class>: n, ..., "ignore": n}, "relabelled": {...},
                ["pseudo_dir": {...}]},
     "ignore_fraction": f,
     "changes": {"argmax": {"changed_pixels": n, "changed_fraction": f,
                            "flow": [[...]]}, ["pseudo_dir": {...}]},
     "flow_labels": [<class>, ..., "ignore"],
     "thresholds": {<class>: {"min_confidence", "portion_confidence", "portion_logodds",
                              "portion_kept_fraction", "pixels"}},
     "quality": null | {"argmax" | "relabelled" | "pseudo_dir":
                        {"miou", "pixel_acc", "scored_pixels", "coverage"}}}

``flow[a][b]`` counts pixels whose label went from ``flow_labels[a]`` (plain argmax, or the
``--pseudo-dir`` label) to ``flow_labels[b]``; its diagonal (unchanged pixels) is zero.
``quality`` (only when every image has a label, in the store or in ``--labels DIR``) scores
each set over its non-ignored pixels: mIoU and pixel accuracy in percent, coverage = kept share
of the labelled pixels.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from blda_posthoc.core.classes import IGNORE_INDEX, palette_for
from blda_posthoc.core.correct import image_confidence, resize_logits
from blda_posthoc.core.evaluate import ConfusionMatrix, summarize
from blda_posthoc.core.fit import channel_argmax
from blda_posthoc.core.relabel import (
    ConfidenceHistogram,
    KeepThresholds,
    LogOddsGrid,
    keep_thresholds,
    kept_confidence,
    select,
    transitions,
)
from blda_posthoc.errors import InputError
from blda_posthoc.io.images import WEIGHT_FORMATS, find_files, read_label, write_weight_map
from blda_posthoc.io.jsonfiles import count_array, read_parts, write_json
from blda_posthoc.io.schema import MAX_COUNT_SUM, Node
from blda_posthoc.io.store import MAX_CLASSES, LogitStore, Record, check_dataset
from blda_posthoc.outputs import (
    canonical,
    check_no_unsharded_run,
    check_not_input,
    settings_digest,
    shard_suffix,
    write_bytes,
)
from blda_posthoc.pipelines.correct import (
    BackgroundWriter,
    check_cityscapes_ids,
    check_outputs,
    output_paths,
    write_label_map,
)
from blda_posthoc.pipelines.corrections import Correction
from blda_posthoc.report.tables import round_or_none

FORMAT = "blda-relabel"
VERSION = 1
MANIFEST = "manifest.json"
COUNTS_FORMAT = "blda-relabel-counts"
COUNTS_VERSION = 1
DECIMALS = 6
Progress = Callable[[Iterable[str], int], Iterable[str]]


@dataclass
class RelabelSettings:
    """What a relabelling run does (recorded in the manifest).

    Attributes:
        tau: Correction strength (recorded only; the correction carries it).
        clamp: The maps' CDF clamp ``r`` (recorded only).
        min_confidence: Ignore pixels whose corrected confidence is below this, or None.
        keep_portion: Class-balanced portion kept per class, or None.
        pseudo_dir: Folder of the user's current pseudo-labels to compare against, or None.
        color: Also write palette previews.
        cityscapes_ids: Also write Cityscapes labelIds (``NAME_labelIds.png``).
        method: The correction method (recorded only).
        weights_format: The format of the per-pixel quality weights (``--weights-out``), a
            key of :data:`WEIGHT_FORMATS`, or None without weights. Their folder is not
            recorded (a moved pair of folders can still be resumed).
        out_suffix: Stem ending of the written label (and weight) files: ``NAME<out_suffix>``,
            e.g. ``_gtFine_labelTrainIds`` for mmsegmentation's ``CityscapesDataset``.
        pseudo_suffix: Stem ending of the files under ``pseudo_dir``: ``NAME<pseudo_suffix>.png``
            (a previous round written with ``out_suffix``).
    """

    tau: float
    clamp: float
    min_confidence: float | None = None
    keep_portion: float | None = None
    pseudo_dir: Path | None = None
    color: bool = False
    method: str = "blda"
    cityscapes_ids: bool = False
    weights_format: str | None = None
    out_suffix: str = ""
    pseudo_suffix: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "method": self.method,
            "tau": self.tau,
            "clamp": self.clamp,
            "min_confidence": self.min_confidence,
            "keep_portion": self.keep_portion,
            "pseudo_dir": None if self.pseudo_dir is None else str(self.pseudo_dir),
            "color": self.color,
            "cityscapes_ids": self.cityscapes_ids,
            "weights_format": self.weights_format,
            "out_suffix": self.out_suffix,
            "pseudo_suffix": self.pseudo_suffix,
        }


@dataclass
class Tally:
    """Counts accumulated over the written pseudo-labels.

    Attributes:
        num_classes: ``C``.
        flows: ``(C + 1, C + 1)`` transitions per baseline (``argmax``, ``pseudo_dir``).
        after: ``(C + 1,)`` relabelled pixels per class, last entry ignore.
        quality: Confusion matrices per pseudo-label set, scored over non-ignored pixels.
    """

    num_classes: int
    flows: dict[str, np.ndarray] = field(default_factory=dict)
    after: np.ndarray | None = None
    quality: dict[str, ConfusionMatrix] = field(default_factory=dict)

    def add(
        self,
        after: torch.Tensor,
        baselines: dict[str, torch.Tensor],
        label: torch.Tensor | None,
    ) -> None:
        """Add one image: its relabelled map, baseline maps, and its true label (or None)."""
        c = self.num_classes
        for key, before in baselines.items():
            flow = transitions(before, after, c)
            self.flows[key] = self.flows.get(key, 0) + flow
        counts = np.bincount(
            torch.where(after == IGNORE_INDEX, c, after.long()).reshape(-1).cpu().numpy(),
            minlength=c + 1,
        )
        self.after = counts if self.after is None else self.after + counts
        if label is None:
            return
        for key, pred in (*baselines.items(), ("relabelled", after)):
            # Scored over the pixels the set keeps, as evaluate --ignore-pred-ignore does.
            matrix = self.quality.setdefault(key, ConfusionMatrix(c, ignore_pred_ignore=True))
            matrix.update(pred.long().cpu(), label.cpu())


def pseudo_label_files(pseudo_dir: Path, names: Sequence[str], suffix: str = "") -> dict[str, Path]:
    """The ``NAME<suffix>.png`` of every image under ``pseudo_dir``; refuse when one is missing."""
    found = find_files(pseudo_dir, (".png",), suffix)
    missing = [n for n in names if n not in found]
    if missing:
        raise InputError(
            f"{pseudo_dir / (missing[0] + suffix + '.png')}: no pseudo-label for image "
            f"{missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return {n: found[n] for n in names}


def read_label_map(path: Path, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """Read a trainId PNG, checking its size and that values are classes or 255."""
    label = read_label(path)
    if label.shape != tuple(size):
        raise InputError(f"{path}: size {label.shape} differs from the image's {tuple(size)}")
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        raise InputError(
            f"{path}: value {int(label[bad].max())} is neither a class (0..{num_classes - 1}) "
            f"nor {IGNORE_INDEX}"
        )
    return label


def confidence_histogram(
    store: LogitStore,
    correction: Correction,
    *,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> ConfidenceHistogram:
    """Pass 1: per-class histograms of the corrected confidence log-odds over the whole store."""
    hist = ConfidenceHistogram(store.num_classes, device=device)
    images = store.iter_images(device=device, progress=progress, resize=False)
    for record, z in images:
        _, pred, logodds = image_confidence(
            z, record.size, correction.corrector, correction.tau, plain=False
        )
        hist.update(pred, logodds)
    return hist


def counts_path(out_dir: Path, shard: tuple[int, int]) -> Path:
    """Where shard ``(K, N)`` keeps its pass-1 counts: ``OUT/relabel-counts-K-of-N.h5``."""
    return Path(out_dir) / f"relabel-counts{shard_suffix(shard)}.h5"


def count_shard(
    store: LogitStore,
    correction: Correction,
    out_dir: Path,
    shard: tuple[int, int],
    run: Mapping[str, Any],
    *,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Iterable[Path | None] = (),
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> tuple[Path, bool]:
    """Pass 1 of shard ``(K, N)`` on its own: count its images into ``out_dir``.

    Args:
        store: The logits, holding shard K's images.
        correction: The correction.
        out_dir: The shards' output folder.
        shard: ``(K, N)``.
        run: The run's settings (recorded; the relabel step checks them).
        overwrite: Count again over an existing count file.
        resume: Keep an existing count file of this run.
        inputs: Input files and folders, which ``out_dir`` may not overlap.
        device: Where to compute.
        progress: Wraps the iteration over image names.

    Returns:
        The count file and whether it was written now (False: kept on ``resume``).
    """
    path = counts_path(out_dir, shard)
    if path.exists() and not overwrite:
        if not resume:
            raise InputError(
                f"{path}: already exists (use --overwrite to count again, or --resume to keep it)"
            )
        _read_count_file(path, shard, run, LogOddsGrid.for_classes(store.num_classes))
        return path, False
    check_not_input(out_dir, inputs, folder=True, option="--out-dir")
    check_no_unsharded_run(out_dir)
    hist = confidence_histogram(store, correction, device=device, progress=progress)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs["format"] = COUNTS_FORMAT
        f.attrs["version"] = COUNTS_VERSION
        f.attrs["shard"] = f"{shard[0]}/{shard[1]}"
        f.attrs["digest"] = settings_digest(run)
        grid = hist.grid
        f.attrs["grid_lo"], f.attrs["grid_hi"], f.attrs["grid_bins"] = grid.lo, grid.hi, grid.bins
        f.create_dataset("run", data=json.dumps(dict(run), sort_keys=True))
        f.create_dataset("names", data=list(store.names), dtype=h5py.string_dtype())
        f.create_dataset(
            "counts", data=hist.counts(), compression="gzip", compression_opts=4, shuffle=True
        )
    write_bytes(path, buffer.getvalue())
    return path, True


def read_counts(
    out_dir: Path,
    num_shards: int,
    run: Mapping[str, Any],
    names: Mapping[str, int],
    num_classes: int,
) -> np.ndarray:
    """The pass-1 histograms of all images: the N shards' count files added up.

    Args:
        out_dir: The shards' output folder.
        num_shards: ``N``.
        run: This run's settings; every count file must record the same.
        names: Every image of the run (before the shard is selected) with its pixel count
            (``H * W`` at the image size): a shard's counts must add up to its images' pixels.
        num_classes: ``C``.

    Returns:
        ``(C, B)`` int64 counts, equal to one process's pass 1.

    Raises:
        InputError: Naming the first count file that is missing, damaged, of another run, or
            that counts an image twice or one outside the stores, or an image no shard counted.
    """
    grid = LogOddsGrid.for_classes(num_classes)
    total: np.ndarray | None = None
    counted: dict[str, Path] = {}
    for k in range(1, num_shards + 1):
        path = counts_path(out_dir, (k, num_shards))
        if not path.is_file():
            raise InputError(
                f"{path}: missing; count shard {k}/{num_shards} first (this command with "
                f"--count-only --shard {k}/{num_shards})"
            )
        part_names, counts = _read_count_file(path, (k, num_shards), run, grid)
        for name in part_names:
            if name in counted:
                raise InputError(f"{path}: image {name!r} counted twice (also in {counted[name]})")
            if name not in names:
                raise InputError(f"{path}: counts image {name!r}, not in the stores")
            counted[name] = path
        pixels = sum(names[name] for name in part_names)
        if int(counts.min(initial=0)) < 0 or int(counts.sum()) != pixels:
            raise InputError(
                f"{path}: damaged count file (its counts do not add up to the {pixels} pixels "
                f"of its {len(part_names)} images)"
            )
        total = counts if total is None else total + counts
    assert total is not None
    if len(counted) != len(names):
        missing = next(n for n in names if n not in counted)
        raise InputError(f"{out_dir}: no count file covers image {missing!r}; recount the shards")
    return total


MAX_COUNTED_NAMES = 1 << 24
"""Most image names one count file may list (checked before they are read)."""


def _read_count_file(
    path: Path, shard: tuple[int, int], run: Mapping[str, Any], grid: LogOddsGrid
) -> tuple[list[str], np.ndarray]:
    """The names and ``(C, B)`` counts of shard ``(K, N)``'s count file, checked against ``run``."""
    k, n = shard
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != COUNTS_FORMAT:
                raise InputError(f"{path}: not a {COUNTS_FORMAT} file")
            if int(f.attrs["version"]) != COUNTS_VERSION:
                raise InputError(f"{path}: {COUNTS_FORMAT} version {f.attrs['version']}")
            recorded = str(f.attrs["shard"])
            digest = str(f.attrs["digest"])
            grid_of = (float(f.attrs["grid_lo"]), float(f.attrs["grid_hi"]))
            bins = int(f.attrs["grid_bins"])
            # Every shape is checked before its data is read (no allocation a file dictates).
            want = (len(run["class_names"]), grid.bins)
            if (grid_of, bins) != ((grid.lo, grid.hi), grid.bins):
                raise InputError(f"{path}: damaged count file (another log-odds grid)")
            counts_set = check_dataset(f, "counts", path, "counts")
            if counts_set.shape != want or counts_set.dtype.kind not in "iu":
                raise InputError(
                    f"{path}: damaged count file (counts are {counts_set.dtype} "
                    f"{counts_set.shape}, expected integers {want})"
                )
            names_set = check_dataset(f, "names", path, "names")
            run_set = check_dataset(f, "run", path, "run")
            if names_set.ndim != 1 or names_set.shape[0] > MAX_COUNTED_NAMES or run_set.ndim:
                raise InputError(
                    f"{path}: damaged count file (names {names_set.shape}, run {run_set.shape})"
                )
            theirs = json.loads(run_set[()])
            if not isinstance(theirs, dict):
                raise InputError(f"{path}: damaged count file (run settings not a JSON object)")
            names = [str(name) for name in names_set.asstr()[()]]
            counts = np.asarray(counts_set[()], dtype=np.int64)
    except InputError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: damaged count file ({exc})") from exc
    if recorded != f"{k}/{n}":
        raise InputError(f"{path}: holds the counts of shard {recorded}, not {k}/{n}")
    if digest != settings_digest(run):
        mine = canonical(run)
        differ = sorted(key for key in mine if theirs.get(key) != mine[key]) or ["settings"]
        raise InputError(
            f"{path}: counts of another run (other {differ[0]}); count again with this "
            f"command and --count-only --shard {k}/{n} --overwrite"
        )
    return names, counts


def _check_not_inputs(out_dir: Path, settings: RelabelSettings, store: LogitStore) -> None:
    inputs = [p.resolve() for p in store.paths]
    if settings.pseudo_dir is not None:
        inputs.append(settings.pseudo_dir.resolve())
    if out_dir.resolve() in inputs:
        raise InputError(f"{out_dir}: the output folder is one of the inputs")


def _check_manifest(path: Path, head: dict[str, Any], overwrite: bool, resume: bool) -> None:
    """Refuse an existing manifest unless asked; on resume it must match this run's settings."""
    if not path.exists() or overwrite:
        return
    if not resume:
        raise InputError(f"{path}: already exists (use --overwrite, or --resume to continue)")
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc}); use --overwrite") from exc
    for key in ("settings", "statistics", "class_names", "stores"):
        if old.get(key) != head[key]:
            raise InputError(
                f"{path}: written with other {key} than this run's; cannot resume "
                "(use --overwrite to start again)"
            )


def relabel_store(
    store: LogitStore,
    correction: Correction,
    out_dir: Path,
    settings: RelabelSettings,
    *,
    overwrite: bool = False,
    resume: bool = False,
    device: torch.device | str = "cpu",
    progress: Callable[[str], Progress | None] | None = None,
    shard: tuple[int, int] | None = None,
    counts: np.ndarray | None = None,
    label_files: dict[str, Path] | None = None,
    weights_dir: Path | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/NAME.png`` pseudo-labels (255 = ignore) and ``out_dir/manifest.json``.

    With ``settings.out_suffix`` the labels are ``out_dir/NAME<out_suffix>.png``.

    With ``weights_dir`` (and ``settings.weights_format``) also the per-pixel quality weights
    ``weights_dir/NAME.png`` (or ``.npy``): the corrected confidence of the kept class, 0 where
    the label is ignore (:func:`blda_posthoc.core.relabel.kept_confidence`). They are written,
    kept on resume and refused on overwrite together with the labels.

    Args:
        store: The logits (with labels, the manifest also scores the pseudo-labels).
        correction: The correction (its settings are recorded as ``statistics``).
        out_dir: Output folder (names keep their sub-folders).
        settings: What to do.
        overwrite: Replace existing outputs.
        resume: Keep images whose outputs exist (they are read back for the manifest).
        device: Where to compute.
        progress: Given a pass name, wraps the iteration over image names.
        shard: ``(K, N)`` when ``store`` holds shard K's images: the manifest is
            ``manifest-K-of-N.json`` with a ``partial`` block for :func:`merge_manifests`.
        counts: With ``keep_portion``, the histograms of all images (:func:`read_counts`);
            None counts them here (pass 1).
        label_files: The label PNG of every image (``--labels DIR``, see
            :func:`blda_posthoc.pipelines.evaluate.every_label`), scored instead of the store's
            labels.
        weights_dir: Where to write the weights (the command line passes the unfinished
            folder of its own :class:`blda_posthoc.outputs.OutputFolder`), or None.

    Returns:
        The manifest, with ``"images_written"`` added (not stored in the file).
    """
    _check_not_inputs(out_dir, settings, store)
    if settings.cityscapes_ids:
        check_cityscapes_ids(store.class_names, store.paths[0])
    c = store.num_classes
    head = {
        "format": FORMAT,
        "version": VERSION,
        "class_names": store.class_names,
        "stores": [str(p) for p in store.paths],
        "settings": settings.as_dict(),
        "statistics": correction.settings,
    }
    manifest_path = out_dir / manifest_name(shard)
    _check_manifest(manifest_path, head, overwrite, resume)
    weights = None
    if weights_dir is not None:
        if settings.weights_format not in WEIGHT_FORMATS:
            raise ValueError(f"weights need a format, got {settings.weights_format!r}")
        weights = (weights_dir, WEIGHT_FORMATS[settings.weights_format])
    paths = output_paths(
        out_dir,
        store.names,
        settings.color,
        settings.cityscapes_ids,
        suffix=settings.out_suffix,
        weights=weights,
    )
    todo = set(check_outputs(paths, overwrite, resume))
    pseudo = (
        pseudo_label_files(settings.pseudo_dir, store.names, settings.pseudo_suffix)
        if settings.pseudo_dir
        else None
    )
    label_files = label_files or {}
    with_label = not label_files and store.has_labels()  # read from the store
    wrap = progress or _no_progress
    thresholds, grid = None, None
    if settings.keep_portion is not None:
        grid = LogOddsGrid.for_classes(c)
        if counts is None:
            hist = confidence_histogram(store, correction, device=device, progress=wrap("pass 1/2"))
            counts = hist.counts()
        thresholds = keep_thresholds(counts, grid, settings.keep_portion)
    write_json(manifest_path, {**head, "complete": False}, sort_keys=True)
    tally = Tally(c)
    palette = palette_for(store.class_names) if settings.color else None
    names = [n for n in store.names if n in todo]
    images = store.iter_images(
        names,
        device=device,
        with_label=with_label,
        progress=wrap("pass 2/2" if thresholds is not None else "relabel"),
        resize=False,
    )
    # The PNGs are compressed in a thread while the next image is computed (the same bytes).
    with BackgroundWriter() as writer:
        for record, z in images:
            plain, pred, logodds = image_confidence(
                z, record.size, correction.corrector, correction.tau
            )
            assert plain is not None
            after = select(
                pred,
                logodds,
                min_confidence=settings.min_confidence,
                thresholds=thresholds,
                grid=grid,
            )
            quality = None
            if weights is not None:
                quality = kept_confidence(after, logodds).cpu().numpy()
            files = paths[record.name]
            writer.submit(_write_image, files, after.cpu().numpy(), palette, settings, quality)
            baselines = _baselines(plain, record.name, record.size, pseudo, c)
            tally.add(after, baselines, _label(record, label_files))
    for name in store.names:
        if name not in todo:
            _add_existing(
                store, name, paths[name][0], pseudo, tally, with_label, device, label_files
            )
    manifest = {
        **head,
        "complete": True,
        **_summary(tally, store.class_names),
        "thresholds": _thresholds(store.class_names, settings, thresholds),
        "num_images": len(store.names),
    }
    if shard is not None:
        manifest["partial"] = _partial(tally, shard, len(store.names))
    write_json(manifest_path, manifest, sort_keys=True)
    return {**manifest, "images_written": len(names)}


def manifest_name(shard: tuple[int, int] | None) -> str:
    """``manifest.json``, or ``manifest-K-of-N.json`` for shard ``(K, N)``."""
    return MANIFEST if shard is None else f"manifest{shard_suffix(shard)}.json"


def _partial(tally: Tally, shard: tuple[int, int], num_images: int) -> dict[str, Any]:
    """A shard's raw counts, which :func:`merge_manifests` adds up."""
    assert tally.after is not None
    return {
        "shard": list(shard),
        "num_images": num_images,
        "after": tally.after.tolist(),
        "flows": {key: flow.tolist() for key, flow in sorted(tally.flows.items())},
        "quality": {key: m.compute().tolist() for key, m in sorted(tally.quality.items())},
    }


MERGE_SAME = ("class_names", "stores", "settings", "statistics", "thresholds")
"""What every shard's manifest of one run records alike."""


def merge_manifests(paths: list[Path]) -> dict[str, Any]:
    """The manifest of one process from the ``manifest-K-of-N.json`` of shards 1..N.

    The shards' raw counts are added up and summarised as one process does; the thresholds
    (from the counts of all images) are the same in every shard.

    Raises:
        InputError: A part is missing, given twice, unfinished, damaged or of another run.
    """
    parts = read_parts(paths, FORMAT)
    first_path, first = parts[0]
    c = len(first["class_names"].strings(max_length=MAX_CLASSES, unique=True))
    tally = Tally(c)
    quality = True
    num_images = 0
    flow_keys = set(first["partial"]["flows"].fields())
    quality_keys = set(first["partial"]["quality"].fields()) or {"argmax"}
    for path, data in parts:
        if data.value.get("complete") is not True:
            raise InputError(f"{path}: unfinished shard (rerun it with --resume)")
        if any(data.value.get(key) != first.value.get(key) for key in MERGE_SAME):
            raise InputError(
                f"{path}: not of the same run as {first_path} (other classes, stores, settings, "
                "statistics or thresholds)"
            )
        part = data["partial"]
        num_images += part["num_images"].integer(low=0, high=MAX_COUNT_SUM)
        after = count_array(part["after"], (c + 1,), path, "after")
        flows = {
            key: count_array(v, (c + 1, c + 1), path, f"flow {key}")
            for key, v in part["flows"].fields().items()
            if _known_set(v, key)
        }
        matrices = {
            key: count_array(v, (c, c + 1), path, f"quality {key}")
            for key, v in part["quality"].fields().items()
            if _known_set(v, key, with_relabelled=True)
        }
        if set(flows) != flow_keys:
            raise InputError(f"{path}: damaged partial block (other flows than {first_path})")
        if matrices and ("argmax" not in matrices or set(matrices) != quality_keys):
            raise InputError(
                f"{path}: damaged partial block (quality of other label sets than {first_path})"
            )
        tally.after = after if tally.after is None else tally.after + after
        for key, flow in flows.items():
            tally.flows[key] = tally.flows.get(key, 0) + flow
        quality = quality and bool(matrices)
        for key, matrix in matrices.items():
            tally.quality.setdefault(key, ConfusionMatrix(c, ignore_pred_ignore=True))
            tally.quality[key].matrix += matrix
    if not quality:  # one process scores only when every image has a label
        tally.quality = {}
    head = ("format", "version", "class_names", "stores", "settings", "statistics", "thresholds")
    return {
        **{key: first[key].value for key in head},
        "complete": True,
        **_summary(tally, first["class_names"].strings()),
        "num_images": num_images,
    }


def _known_set(node: Node, key: str, *, with_relabelled: bool = False) -> bool:
    """Whether ``key`` names a label set a manifest counts (else the part is refused)."""
    known = ("argmax", "pseudo_dir", "relabelled") if with_relabelled else ("argmax", "pseudo_dir")
    if key not in known:
        raise node.error(f"unknown label set {key!r} (expected {', '.join(known)})")
    return True


def _no_progress(_: str) -> Progress | None:
    return None


def _label(record: Record, label_files: dict[str, Path]) -> torch.Tensor | None:
    """An image's label map: its PNG in ``label_files``, else the store's (or None)."""
    path = label_files.get(record.name)
    label = record.label if path is None else read_label(path)
    if label is None:
        return None
    if label.shape != tuple(record.size):
        raise InputError(
            f"{path or record.name}: label size {label.shape} differs from the image's "
            f"{tuple(record.size)}"
        )
    return torch.from_numpy(label)


def _write_image(
    files: list[Path],
    labels: np.ndarray,
    palette: np.ndarray | None,
    settings: RelabelSettings,
    quality: np.ndarray | None,
) -> None:
    """Write one image's pseudo-labels (and extras), then its weights when given (last file)."""
    write_label_map(files, labels, palette, settings.cityscapes_ids)
    if quality is not None:
        assert settings.weights_format is not None
        write_weight_map(files[-1], quality, settings.weights_format)


def _baselines(
    plain: torch.Tensor,
    name: str,
    size: tuple[int, int],
    pseudo: dict[str, Path] | None,
    num_classes: int,
) -> dict[str, torch.Tensor]:
    """The label maps a relabelled image is compared with: its plain argmax, the user's labels."""
    out = {"argmax": plain.to(torch.uint8).cpu()}
    if pseudo is not None:
        out["pseudo_dir"] = torch.from_numpy(read_label_map(pseudo[name], size, num_classes))
    return out


def _add_existing(
    store: LogitStore,
    name: str,
    png: Path,
    pseudo: dict[str, Path] | None,
    tally: Tally,
    with_label: bool,
    device: torch.device | str,
    label_files: dict[str, Path],
) -> None:
    """Count an image kept from an earlier run (resume): read its PNG back; no correction."""
    record = store.read(name, with_label=with_label)
    c = store.num_classes
    try:
        after = torch.from_numpy(read_label_map(png, record.size, c))
    except InputError as exc:
        raise InputError(f"{exc} (cannot resume; use --overwrite)") from exc
    z = torch.from_numpy(record.logits).to(device)
    plain = channel_argmax(resize_logits(z, record.size))
    baselines = _baselines(plain, name, record.size, pseudo, c)
    tally.add(after, baselines, _label(record, label_files))


def _per_class(values: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    """``(C + 1,)`` counts as ``{class: n, ..., "ignore": n}``."""
    return {name: int(v) for name, v in zip([*class_names, "ignore"], values, strict=True)}


def _summary(tally: Tally, class_names: list[str]) -> dict[str, Any]:
    """The manifest's counts, changes and quality."""
    assert tally.after is not None
    total = int(tally.after.sum())
    pixels = {"relabelled": _per_class(tally.after, class_names)}
    changes = {}
    for key, flow in sorted(tally.flows.items()):
        pixels[key] = _per_class(flow.sum(1), class_names)
        changed = flow - np.diag(np.diag(flow))
        changes[key] = {
            "changed_pixels": int(changed.sum()),
            "changed_fraction": round_or_none(changed.sum() / max(total, 1), DECIMALS),
            "flow": changed.tolist(),
        }
    quality = None
    if tally.quality:
        quality = {key: _quality(m) for key, m in sorted(tally.quality.items())}
        labelled = max(tally.quality["argmax"].compute().sum(), 1)
        for entry in quality.values():
            entry["coverage"] = round_or_none(entry["scored_pixels"] / labelled, DECIMALS)
    return {
        "num_pixels": total,
        "pixels": pixels,
        "ignore_fraction": round_or_none(tally.after[-1] / max(total, 1), DECIMALS),
        "changes": changes,
        "flow_labels": [*class_names, "ignore"],
        "quality": quality,
    }


def _thresholds(
    class_names: list[str], settings: RelabelSettings, thresholds: KeepThresholds | None
) -> dict[str, dict[str, Any]]:
    out = {}
    for k, name in enumerate(class_names):
        entry: dict[str, Any] = {
            "min_confidence": settings.min_confidence,
            "portion_confidence": None,
            "portion_logodds": None,
            "portion_kept_fraction": None,
            "pixels": None,
        }
        if thresholds is not None:
            entry.update(
                portion_confidence=round_or_none(thresholds.confidence[k], DECIMALS),
                portion_logodds=round_or_none(thresholds.logodds[k], DECIMALS),
                portion_kept_fraction=round_or_none(thresholds.kept_fraction[k], DECIMALS),
                pixels=int(thresholds.pixels[k]),
            )
        out[name] = entry
    return out


def _quality(matrix: ConfusionMatrix) -> dict[str, Any]:
    """Score a pseudo-label set: mIoU and pixel accuracy (percent) over non-ignored pixels."""
    s = summarize(matrix.compute())
    return {
        "miou": round_or_none(s["miou"], DECIMALS),
        "pixel_acc": round_or_none(s["pixel_acc"], DECIMALS),
        "scored_pixels": s["num_pixels"],
    }
