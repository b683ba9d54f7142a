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

import json
import os
from pathlib import Path

import h5py

from blda_posthoc import __version__
from blda_posthoc.core.fit import Grid, LogitStats, Mixture, PixelSample, StatsExtras
from blda_posthoc.io.errors import InputError

FORMAT = "blda-stats"
VERSION = 2
READABLE_VERSIONS = (1, 2)


def write_stats(path: Path, stats: LogitStats, overwrite: bool = False) -> None:
    """Write statistics atomically (temporary file, then rename).

    Args:
        path: Destination.
        stats: What to write.
        overwrite: Replace an existing file.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["created_by"] = f"blda-posthoc {__version__}"
            _write_group(f, stats)
            if stats.extras is not None:
                _write_extras(f, stats.extras)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed


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


def read_stats(path: Path) -> LogitStats:
    """Read a stats file (version 1 or 2), checking its format and version."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such stats file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc})") from exc
    with f:
        fmt = f.attrs.get("format")
        if fmt != FORMAT:
            raise InputError(f"{path}: not a stats file (format {fmt!r}, expected {FORMAT!r})")
        version = int(f.attrs.get("version", -1))
        if version not in READABLE_VERSIONS:
            raise InputError(
                f"{path}: stats version {version} is not supported (need one of "
                f"{', '.join(map(str, READABLE_VERSIONS))})"
            )
        try:
            stats = _read_group(f)
            if "predicted" in f:
                stats.extras = _read_extras(f)
        except (KeyError, ValueError, TypeError) as exc:
            raise InputError(f"{path}: damaged stats file ({exc})") from exc
    return stats


def _read_group(f: h5py.Group) -> LogitStats:
    a = f.attrs
    stats = LogitStats(
        class_names=json.loads(a["class_names"]),
        grid=Grid(float(a["grid_lo"]), float(a["grid_hi"]), int(a["grid_bins"])),
        counts=f["cells/counts"][()],
        anchor_counts=f["anchors/counts"][()],
        estimator=str(a["estimator"]),
        settings=json.loads(a["settings"]),
    )
    if stats.estimator == "gmm":
        stats.mixtures = _read_mixture(f["cells/gmm"])
        stats.anchor_mixtures = _read_mixture(f["anchors/gmm"])
    return stats


def _read_extras(f: h5py.File) -> StatsExtras:
    conf = f["confidence/counts"]
    calibrations = {
        kind: (group["scale"][()], group["bias"][()])
        for kind, group in f.get("calibration", {}).items()
    }
    return StatsExtras(
        predicted=f["predicted"][()],
        confidence=conf[()],
        confidence_grid=(float(conf.attrs["lo"]), float(conf.attrs["hi"]), int(conf.attrs["bins"])),
        sample=PixelSample(f["sample/logits"][()], f["sample/labels"][()]),
        calibrations=calibrations,
        calibrated=_read_group(f["calibrated"]) if "calibrated" in f else None,
    )


def _read_mixture(group: h5py.Group) -> Mixture:
    return Mixture(group["weights"][()], group["means"][()], group["sigmas"][()])
