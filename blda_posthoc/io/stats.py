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
    /calibration/<kind>/{scale,bias}  (C,) float64, kind in temperature|vector|bias
    /calibrated/...      the same layout as the root (attrs, edges, cells, anchors) for
                         the statistics of calibrated logits
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from blda_posthoc import __version__
from blda_posthoc.core.fit import Grid, LogitStats, Mixture, PixelSample, StatsExtras
from blda_posthoc.errors import InputError
from blda_posthoc.io.schema import check_version
from blda_posthoc.io.store import LOGIT_LIMIT, check_class_names, check_dataset, check_group
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
    return stats


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
    names = check_class_names(names, path)
    if not isinstance(settings, dict):
        raise _bad(path, "settings are not a JSON object")
    c = len(names)
    lo, hi = _number(a, "grid_lo", path), _number(a, "grid_hi", path)
    bins = _number(a, "grid_bins", path, int)
    if not (lo < hi and max(-lo, hi) <= LOGIT_LIMIT and 2 <= bins <= MAX_BINS):
        raise _bad(path, f"logit grid [{lo:g}, {hi:g}] with {bins} bins is out of range")
    if c * c * bins > MAX_CELL_VALUES:
        raise _bad(path, f"{c} classes x {bins} bins is too large")
    estimator = _text(a.get("estimator"))
    if estimator not in ("hist", "gmm"):
        raise _bad(path, f"unknown estimator {estimator!r}")
    stats = LogitStats(
        class_names=names,
        grid=Grid(lo, hi, bins),
        counts=_array(f, "cells/counts", path, (c, c, bins), "iu").astype(np.int64),
        anchor_counts=_array(f, "anchors/counts", path, (2, bins), "iu").astype(np.int64),
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
    if not (lo < hi and 1 <= bins <= MAX_BINS):
        raise _bad(path, f"confidence grid [{lo:g}, {hi:g}] with {bins} bins is out of range")
    logits = _array(f, "sample/logits", path, (None, c), "f", limit=MAX_SAMPLE * c)
    labels = _array(f, "sample/labels", path, (logits.shape[0],), "u", limit=MAX_SAMPLE)
    if labels.size and ((labels >= c) & (labels != 255)).any():
        raise _bad(path, "sample labels are neither classes nor 255")
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
        sample=PixelSample(logits.astype(np.float32), labels.astype(np.uint8)),
        calibrations=calibrations,
        calibrated=_read_group(check_group(f, "calibrated", path), path)
        if "calibrated" in f
        else None,
    )


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
