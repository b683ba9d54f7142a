"""The stats file (format ``blda-stats``, version 2): fitted logit distributions in HDF5.

Layout::

    /            attrs: format="blda-stats", version=2, class_names (JSON list), num_classes,
                        estimator (hist|gmm), grid_lo, grid_hi, grid_bins, fingerprint,
                        settings (JSON: labels, min_pixels, components, num_images,
                        num_pixels, sources, resolution, sample_pixels, seed, calibration),
                        created_by
    /edges               (B + 1,) float64 logit-grid edges
    /cells/counts        (C, C, B) int64: counts[c, l, b] = pixels labelled c whose logit l is
                         in bin b (diagonal: positive cells, off-diagonal: negative cells)
    /cells/pixels        (C, C) int64 pixels per cell
    /anchors/counts      (2, B) int64: row 0 positive anchor P+, row 1 negative anchor P-
    /cells/gmm/{weights,means,sigmas}     (C, C, K) float64   (estimator gmm only)
    /anchors/gmm/{weights,means,sigmas}   (2, K) float64      (estimator gmm only)
  version 2 adds (all optional for readers; version 1 files have none of them):
    /predicted           (C,) int64 pixels per predicted (argmax) class
    /confidence/counts   (C, B') int64 top-1 confidence log-odds per predicted class,
                         attrs lo, hi, bins
    /sample/logits       (S, C) float32 seeded pixel sample;  /sample/labels (S,) uint8
    /sample/image_counts (M,) int64 pixels drawn per image, in the sample's order (optional:
                         files written before it was added have none; occurrence-adjust
                         needs it)
    /calibration/<kind>/{scale,bias}  (C,) float64, kind in temperature|vector|bias
    /calibrated/...      the same layout as the root (attrs, edges, cells, anchors) for
                         the statistics of calibrated logits
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from blda_posthoc import __version__
from blda_posthoc.core.fit import Grid, LogitStats, Mixture, PixelSample, StatsExtras
from blda_posthoc.errors import InputError
from blda_posthoc.io.names import check_class_names, describe_names
from blda_posthoc.io.schema import check_version
from blda_posthoc.io.store import LOGIT_LIMIT, check_dataset, check_group
from blda_posthoc.outputs import write_bytes

FORMAT = "blda-stats"
VERSION = 2
READABLE_VERSIONS = (1, 2)


def write_stats(path: Path, stats: LogitStats, overwrite: bool = False) -> None:
    """Write statistics atomically, never leaving a half-written file under ``path``.

    The file is built in memory, then written to an exclusively created temporary file and
    renamed (see :func:`blda_posthoc.outputs.write_bytes`), so a full disk is a clean error
    and two runs writing the same path never mix their bytes.

    Args:
        path: Destination.
        stats: What to write.
        overwrite: Replace an existing file.
    """
    path = Path(path)
    check_stats(stats, path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists (use --overwrite to replace it)")
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        f.attrs["created_by"] = f"blda-posthoc {__version__}"
        _write_group(f, stats)
        if stats.extras is not None:
            _write_extras(f, stats.extras)
    write_bytes(path, buffer.getvalue())


COMPRESSED = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


def _write_group(f: h5py.Group, stats: LogitStats) -> None:
    """The histograms (and mixtures) of ``stats`` with their attributes, into group ``f``."""
    a = f.attrs
    a["class_names"] = json.dumps(stats.class_names)
    a["num_classes"] = stats.num_classes
    a["estimator"] = stats.estimator
    a["grid_lo"], a["grid_hi"], a["grid_bins"] = stats.grid.lo, stats.grid.hi, stats.grid.bins
    a["fingerprint"] = stats.fingerprint
    a["settings"] = json.dumps(stats.settings, sort_keys=True)
    f.create_dataset("edges", data=stats.grid.edges)
    f.create_dataset("cells/counts", data=stats.counts, **COMPRESSED)
    f.create_dataset("cells/pixels", data=stats.cell_pixels)
    f.create_dataset("anchors/counts", data=stats.anchor_counts, **COMPRESSED)
    for group, mix in (("cells", stats.mixtures), ("anchors", stats.anchor_mixtures)):
        if mix is not None:
            for key in ("weights", "means", "sigmas"):
                f.create_dataset(f"{group}/gmm/{key}", data=getattr(mix, key))


def _write_extras(f: h5py.File, extras: StatsExtras) -> None:
    f.create_dataset("predicted", data=extras.predicted)
    conf = f.create_dataset("confidence/counts", data=extras.confidence, **COMPRESSED)
    lo, hi, bins = extras.confidence_grid
    conf.attrs["lo"], conf.attrs["hi"], conf.attrs["bins"] = lo, hi, bins
    f.create_dataset("sample/logits", data=extras.sample.logits, **COMPRESSED)
    f.create_dataset("sample/labels", data=extras.sample.labels, **COMPRESSED)
    if extras.sample.image_counts is not None:
        f.create_dataset("sample/image_counts", data=extras.sample.image_counts, **COMPRESSED)
    for kind, (scale, bias) in extras.calibrations.items():
        f.create_dataset(f"calibration/{kind}/scale", data=scale)
        f.create_dataset(f"calibration/{kind}/bias", data=bias)
    if extras.calibrated is not None:
        _write_group(f.create_group("calibrated"), extras.calibrated)


MAX_BINS = 1 << 16
"""Most histogram bins a stats file may hold."""
MAX_CELL_VALUES = 1 << 28
"""Most ``C * C * B`` histogram counts a stats file may hold (2 GiB of int64)."""
MAX_SAMPLE = 1 << 24
"""Most pixels in a stats file's pixel sample."""
MAX_TOTAL_COUNT = 2.0**53
"""Counts in one dataset must add up to at most this (no int64 overflow, exact in float64)."""


def read_stats(path: Path) -> LogitStats:
    """Read a stats file (version 1 or 2), checking its format, version, shapes and values.

    Every shape is checked before its dataset is read (see the ``MAX_*`` budgets), and the
    statistics read are then checked by :func:`check_stats`, the rule :func:`write_stats` also
    applies before writing.

    Raises:
        InputError: Naming the file, for anything missing, malformed, out of range or stored
            outside the file (external storage, virtual datasets, links).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such stats file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a stats file")
    try:
        f = h5py.File(path, "r")
    except Exception as exc:  # noqa: BLE001 - h5py raises several types for bad files
        raise InputError(f"{path}: not a readable HDF5 file ({_first_line(exc)})") from exc
    with f:
        fmt = _text(f.attrs.get("format"))
        if fmt != FORMAT:
            raise InputError(f"{path}: not a stats file (format {fmt!r}, expected {FORMAT!r})")
        check_version(f.attrs.get("version"), READABLE_VERSIONS, f"{path}: stats")
        try:
            stats = _read_group(f, path)
            if "predicted" in f:
                stats.extras = _read_extras(f, path, stats.num_classes)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file is bad input
            raise InputError(f"{path}: damaged stats file ({_first_line(exc)})") from exc
    check_stats(stats, path, damaged=True)
    return stats


def stats_size(path: Path) -> tuple[int, int, int] | None:
    """``(C, B, groups)`` of a stats file from its dataset shapes, without reading any data.

    ``groups`` counts the ``(C, C, B)`` count arrays :func:`read_stats` would hold (the root's
    and ``/calibrated``'s). For a memory estimate before reading: a file whose shapes cannot be
    read this way gives None (:func:`read_stats` then says what is wrong with it).
    """
    try:
        with h5py.File(path, "r") as f:
            shapes = [
                check_dataset(f, key, Path(path), key).shape
                for key in ("cells/counts", "calibrated/cells/counts")
                if key == "cells/counts" or "calibrated" in f
            ]
    except Exception:  # noqa: BLE001 - read_stats reports a bad file
        return None
    if any(len(shape) != 3 for shape in shapes):
        return None
    return int(shapes[0][0]), max(int(shape[2]) for shape in shapes), len(shapes)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def _bad(path: Path, what: str) -> InputError:
    return InputError(f"{path}: damaged stats file ({what})")


def _number(attrs: h5py.AttributeManager, key: str, path: Path, kind: type = float) -> Any:
    value = attrs.get(key)
    ok = (int, np.integer) if kind is int else (int, float, np.integer, np.floating)
    if isinstance(value, bool | np.bool_) or not isinstance(value, ok):
        raise _bad(path, f"attribute {key!r} is {value!r}")
    if not np.isfinite(value):
        raise _bad(path, f"attribute {key!r} is {value!r}")
    return kind(value)


def _array(
    group: h5py.Group,
    key: str,
    path: Path,
    shape: tuple[int | None, ...],
    kinds: str,
    *,
    limit: int = MAX_CELL_VALUES,
) -> np.ndarray:
    """A dataset checked before reading: inside the file, dtype kind, shape, size; finite."""
    dset = check_dataset(group, key, path, f"{group.name.rstrip('/')}/{key}")
    if dset.dtype.kind not in kinds or len(dset.shape) != len(shape):
        raise _bad(path, f"{dset.name} is {dset.dtype} {dset.shape}")
    if any(want is not None and got != want for got, want in zip(dset.shape, shape, strict=True)):
        raise _bad(path, f"{dset.name} has shape {dset.shape}, expected {shape}")
    if int(np.prod(dset.shape)) > limit:
        raise _bad(path, f"{dset.name} is too large ({dset.shape})")
    data = dset[()]
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise _bad(path, f"{dset.name} holds NaN or infinite values")
    if data.dtype.kind in "iu" and data.size:
        if data.min() < 0:
            raise _bad(path, f"{dset.name} holds negative counts")
        if float(data.sum(dtype=np.float64)) > MAX_TOTAL_COUNT:
            raise _bad(path, f"{dset.name} holds counts too large to add up")
    if data.dtype.kind == "f" and data.size and float(np.abs(data).max()) > LOGIT_LIMIT:
        raise _bad(path, f"{dset.name} holds values beyond ±{LOGIT_LIMIT:g}")
    return data


def _read_group(f: h5py.Group, path: Path) -> LogitStats:
    a = f.attrs
    try:
        names = json.loads(_text(a.get("class_names")) or "")
        settings = json.loads(_text(a.get("settings")) or "")
    except ValueError as exc:
        raise _bad(path, f"{f.name}: attributes are not valid JSON") from exc
    names = check_class_names(names, path if f.name == "/" else f"{path}: {f.name.lstrip('/')}")
    if not isinstance(settings, dict):
        raise _bad(path, "settings are not a JSON object")
    c = len(names)
    lo, hi = _number(a, "grid_lo", path), _number(a, "grid_hi", path)
    bins = _number(a, "grid_bins", path, int)
    _check_grid(lo, hi, bins, c, _bad_in(path))
    estimator = _text(a.get("estimator"))
    if estimator not in ("hist", "gmm"):
        raise _bad(path, f"unknown estimator {estimator!r}")
    stats = LogitStats(
        class_names=names,
        grid=Grid(lo, hi, bins),
        counts=_array(f, "cells/counts", path, (c, c, bins), "iu").astype(np.int64, copy=False),
        anchor_counts=_array(f, "anchors/counts", path, (2, bins), "iu").astype(
            np.int64, copy=False
        ),
        estimator=estimator,
        settings=settings,
    )
    if stats.estimator == "gmm":
        stats.mixtures = _read_mixture(f, "cells/gmm", path, (c, c))
        stats.anchor_mixtures = _read_mixture(f, "anchors/gmm", path, (2,))
    return stats


def _read_extras(f: h5py.File, path: Path, c: int) -> StatsExtras:
    conf = check_dataset(f, "confidence/counts", path, "confidence/counts")
    lo, hi = _number(conf.attrs, "lo", path), _number(conf.attrs, "hi", path)
    bins = _number(conf.attrs, "bins", path, int)
    _check_confidence_grid(lo, hi, bins, c, _bad_in(path))
    logits = _array(f, "sample/logits", path, (None, c), "f", limit=MAX_SAMPLE * c)
    labels = _array(f, "sample/labels", path, (logits.shape[0],), "u", limit=MAX_SAMPLE)
    image_counts = None
    if "sample/image_counts" in f:  # written since the per-image sample counts exist
        image_counts = _array(f, "sample/image_counts", path, (None,), "iu", limit=MAX_SAMPLE)
        if image_counts.sum() != labels.size:
            raise _bad(path, "sample/image_counts do not add up to the sample's pixels")
        image_counts = image_counts.astype(np.int64)
    calibrations = {}
    if "calibration" in f:
        group = check_group(f, "calibration", path)
        for kind in group:
            sub = check_group(group, kind, path)
            calibrations[kind] = (
                _array(sub, "scale", path, (c,), "f"),
                _array(sub, "bias", path, (c,), "f"),
            )
    return StatsExtras(
        predicted=_array(f, "predicted", path, (c,), "iu").astype(np.int64),
        confidence=_array(f, "confidence/counts", path, (c, bins), "iu").astype(np.int64),
        confidence_grid=(lo, hi, bins),
        sample=PixelSample(logits.astype(np.float32), labels.astype(np.uint8), image_counts),
        calibrations=calibrations,
        calibrated=_read_group(check_group(f, "calibrated", path), path)
        if "calibrated" in f
        else None,
    )


MIN_RELATIVE_STEP = 1e-6
"""Smallest grid step relative to the grid's largest magnitude (float32 logits resolve about
1.2e-7 of their magnitude: a finer grid cannot tell its bins apart)."""
CONFIDENCE_LIMIT = 1e3
"""Largest magnitude of the confidence log-odds grid (float64 probabilities end near ±745)."""
MAX_CALIBRATION_SCALE = 1e4
"""Largest calibration scale (temperatures below 1e-4); a scale of 0 or below is never valid."""
LABEL_SOURCES = ("gt", "pseudo")
ESTIMATORS = ("hist", "gmm")
CALIBRATION_KINDS = ("temperature", "vector", "bias")

Fail = Callable[[str], InputError]


def _bad_in(path: Path | str, damaged: bool = True) -> Fail:
    """How a check reports a problem: a damaged file (reading) or bad statistics (writing)."""
    if damaged:
        return lambda what: InputError(f"{path}: damaged stats file ({what})")
    return lambda what: InputError(f"{path}: cannot write these statistics ({what})")


def _check_grid(lo: float, hi: float, bins: int, c: int, fail: Fail) -> None:
    """The logit grid: finite, ordered, within the logit limit, resolvable, and not too large."""
    top = max(abs(lo), abs(hi), 1.0)
    if not (
        np.isfinite(lo)
        and np.isfinite(hi)
        and lo < hi
        and top <= LOGIT_LIMIT
        and 2 <= bins <= MAX_BINS
        and (hi - lo) / bins >= MIN_RELATIVE_STEP * top
    ):
        raise fail(
            f"logit grid [{lo:g}, {hi:g}] with {bins} bins is out of range (2 to {MAX_BINS} "
            f"bins within ±{LOGIT_LIMIT:g}, steps of at least {MIN_RELATIVE_STEP:g} of the "
            "largest edge)"
        )
    if c * c * bins > MAX_CELL_VALUES:
        raise fail(f"{c} classes x {bins} bins is too large (at most {MAX_CELL_VALUES} counts)")


def _check_confidence_grid(lo: float, hi: float, bins: int, c: int, fail: Fail) -> None:
    if not (
        np.isfinite(lo)
        and np.isfinite(hi)
        and lo < hi
        and max(abs(lo), abs(hi)) <= CONFIDENCE_LIMIT
        and 1 <= bins <= MAX_BINS
    ):
        raise fail(
            f"confidence grid [{lo:g}, {hi:g}] with {bins} bins is out of range (1 to "
            f"{MAX_BINS} bins within ±{CONFIDENCE_LIMIT:g})"
        )


def _whole(value: object, low: int = 0, high: int = 1 << 62) -> bool:
    return (
        isinstance(value, int | np.integer)
        and not isinstance(value, bool | np.bool_)
        and low <= int(value) <= high
    )


def _check_settings(settings: object, fail: Fail, where: str = "settings") -> None:
    """The recorded settings: each known key of its type and range (unknown keys are kept)."""
    if not isinstance(settings, dict):
        raise fail(f"{where} are not a JSON object")
    rules: dict[str, tuple[str, Callable[[object], bool]]] = {
        "labels": ("'gt' or 'pseudo'", lambda v: v in LABEL_SOURCES),
        "min_pixels": ("a whole number >= 0", _whole),
        "bins": ("a whole number of bins", lambda v: _whole(v, 2, MAX_BINS)),
        "components": ("null or 1 to 64", lambda v: v is None or _whole(v, 1, 64)),
        "num_images": ("a whole number >= 0", _whole),
        "num_pixels": ("a whole number >= 0", _whole),
        "sample_pixels": ("a whole number >= 0", _whole),
        "calibration_pixels": ("a whole number >= 0", _whole),
        "seed": ("a whole number", lambda v: _whole(v, -(1 << 63))),
        "resolution": ("text", lambda v: isinstance(v, str)),
        "sources": (
            "a list of paths",
            lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        ),
        "calibration": ("null or a calibration record", _calibration_record),
    }
    for key, (want, ok) in rules.items():
        if key in settings and not ok(settings[key]):
            raise fail(f"{where}: {key} is {json.dumps(settings[key])[:40]}, expected {want}")


def _calibration_record(value: object) -> bool:
    if value is None:
        return True
    return (
        isinstance(value, dict)
        and value.get("kind") in CALIBRATION_KINDS
        and isinstance(value.get("fingerprint"), str)
        and isinstance(value.get("source"), str | None)
    )


def check_stats(stats: LogitStats, path: Path | str, *, damaged: bool = False) -> None:
    """Check the rules every stats file obeys (what is written can always be read back).

    :func:`read_stats` applies them after reading, :func:`write_stats` before writing.

    Args:
        stats: The statistics.
        path: The file, for messages.
        damaged: Word the message as a damaged file (reading) rather than bad statistics.

    Raises:
        InputError: Class names (2 to 255 unique, non-empty), settings (types and ranges of
            the known keys), the logit and confidence grids, array shapes, calibrations (known
            kinds; scales in ``(0, 1e4]``), sample labels, and the ``calibrated`` statistics (the
            same class names and estimator, a calibration record).
    """
    fail = _bad_in(path, damaged)
    _check_group(stats, path, fail, "")
    extras = stats.extras
    if extras is None:
        return
    c = stats.num_classes
    lo, hi, bins = extras.confidence_grid
    _check_confidence_grid(lo, hi, bins, c, fail)
    _check_shape(extras.predicted, (c,), "predicted", fail)
    _check_shape(extras.confidence, (c, bins), "confidence/counts", fail)
    logits, labels = extras.sample.logits, extras.sample.labels
    if logits.ndim != 2 or logits.shape[1] != c or labels.shape != (logits.shape[0],):
        raise fail(f"sample is {logits.shape} logits and {labels.shape} labels for {c} classes")
    if labels.size and ((labels >= c) & (labels != 255)).any():
        raise fail("sample labels are neither classes nor 255")
    for kind, (scale, bias) in extras.calibrations.items():
        if kind not in CALIBRATION_KINDS:
            raise fail(f"unknown calibration {kind!r} (known: {', '.join(CALIBRATION_KINDS)})")
        _check_shape(scale, (c,), f"calibration/{kind}/scale", fail)
        _check_shape(bias, (c,), f"calibration/{kind}/bias", fail)
        scale = np.asarray(scale, np.float64)
        if not (np.isfinite(scale).all() and np.isfinite(bias).all()):
            raise fail(f"calibration/{kind} holds NaN or infinite values")
        if not ((scale > 0) & (scale <= MAX_CALIBRATION_SCALE)).all():
            raise fail(
                f"calibration/{kind}/scale holds {float(scale.min()):g}; scales lie in "
                f"(0, {MAX_CALIBRATION_SCALE:g}]"
            )
    calibrated = extras.calibrated
    if calibrated is not None:
        _check_group(calibrated, path, fail, "calibrated ")
        if calibrated.class_names != stats.class_names:
            raise fail(
                "calibrated statistics name other classes "
                f"({describe_names(calibrated.class_names)}) than the file "
                f"({describe_names(stats.class_names)})"
            )
        if calibrated.estimator != stats.estimator:
            raise fail(
                f"calibrated statistics use the {calibrated.estimator} estimator, the file "
                f"{stats.estimator}"
            )
        if not isinstance(calibrated.settings.get("calibration"), dict):
            raise fail("calibrated statistics record no calibration")


def _check_group(stats: LogitStats, path: Path | str, fail: Fail, where: str) -> None:
    check_class_names(stats.class_names, f"{path}: {where}class names")
    c, grid = stats.num_classes, stats.grid
    _check_grid(grid.lo, grid.hi, grid.bins, c, fail)
    _check_settings(stats.settings, fail, f"{where}settings")
    if stats.estimator not in ESTIMATORS:
        raise fail(f"unknown estimator {stats.estimator!r}")
    _check_shape(stats.counts, (c, c, grid.bins), f"{where}cells/counts", fail)
    _check_shape(stats.anchor_counts, (2, grid.bins), f"{where}anchors/counts", fail)
    if stats.estimator == "gmm" and (stats.mixtures is None or stats.anchor_mixtures is None):
        raise fail(f"{where}gmm statistics without mixtures")


def _check_shape(array: np.ndarray, shape: tuple[int, ...], key: str, fail: Fail) -> None:
    if tuple(np.shape(array)) != shape:
        raise fail(f"{key} has shape {tuple(np.shape(array))}, expected {shape}")


def _read_mixture(f: h5py.Group, key: str, path: Path, lead: tuple[int, ...]) -> Mixture:
    group = check_group(f, key, path)
    weights = _array(group, "weights", path, (*lead, None), "f", limit=1 << 24)
    k = weights.shape[-1]
    if not 1 <= k <= 64:
        raise _bad(path, f"{key}: {k} mixture components")
    means = _array(group, "means", path, (*lead, k), "f")
    sigmas = _array(group, "sigmas", path, (*lead, k), "f")
    if (weights < 0).any() or (sigmas <= 0).any():
        raise _bad(path, f"{key}: negative weights or non-positive sigmas")
    return Mixture(weights, means, sigmas)
