"""The stats file (format ``blda-stats``, version 1): fitted logit distributions in HDF5.

Layout::

    /            attrs: format="blda-stats", version=1, class_names (JSON list), num_classes,
                        estimator (hist|gmm), grid_lo, grid_hi, grid_bins, fingerprint,
                        settings (JSON: labels, min_pixels, components, num_images,
                        num_pixels, sources, resolution), created_by
    /edges               (B + 1,) float64 logit-grid edges
    /cells/counts        (C, C, B) int64: counts[c, l, b] = pixels labelled c whose logit l is
                         in bin b (diagonal: positive cells, off-diagonal: negative cells)
    /cells/pixels        (C, C) int64 pixels per cell
    /anchors/counts      (2, B) int64: row 0 positive anchor P+, row 1 negative anchor P-
    /cells/gmm/{weights,means,sigmas}     (C, C, K) float64   (estimator gmm only)
    /anchors/gmm/{weights,means,sigmas}   (2, K) float64      (estimator gmm only)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py

from blda_posthoc import __version__
from blda_posthoc.core.correct import (
    DEFAULT_CLAMP,
    DEFAULT_MIN_PIXELS,
    AlignmentMaps,
    build_maps,
    lookup_tables,
)
from blda_posthoc.core.fit import Grid, LogitStats, Mixture
from blda_posthoc.io.errors import InputError

FORMAT = "blda-stats"
VERSION = 1


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
    with h5py.File(tmp, "w") as f:
        a = f.attrs
        a["format"] = FORMAT
        a["version"] = VERSION
        a["class_names"] = json.dumps(stats.class_names)
        a["num_classes"] = stats.num_classes
        a["estimator"] = stats.estimator
        a["grid_lo"], a["grid_hi"], a["grid_bins"] = stats.grid.lo, stats.grid.hi, stats.grid.bins
        a["fingerprint"] = stats.fingerprint
        a["settings"] = json.dumps(stats.settings, sort_keys=True)
        a["created_by"] = f"blda-posthoc {__version__}"
        f.create_dataset("edges", data=stats.grid.edges)
        opts = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        f.create_dataset("cells/counts", data=stats.counts, **opts)
        f.create_dataset("cells/pixels", data=stats.cell_pixels)
        f.create_dataset("anchors/counts", data=stats.anchor_counts, **opts)
        for group, mix in (("cells", stats.mixtures), ("anchors", stats.anchor_mixtures)):
            if mix is not None:
                for key in ("weights", "means", "sigmas"):
                    f.create_dataset(f"{group}/gmm/{key}", data=getattr(mix, key))
    os.replace(tmp, path)


def read_stats(path: Path) -> LogitStats:
    """Read a stats file, checking its format and version."""
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
        if version != VERSION:
            raise InputError(f"{path}: stats version {version} is not supported (need {VERSION})")
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


def _read_mixture(group: h5py.Group) -> Mixture:
    return Mixture(group["weights"][()], group["means"][()], group["sigmas"][()])


def load_alignment(
    stats_path: Path,
    anchors_path: Path | None,
    class_names: list[str],
    clamp: float = DEFAULT_CLAMP,
    min_pixels: int | None = None,
    tau: float | None = None,
) -> tuple[AlignmentMaps, LogitStats, LogitStats]:
    """Read conditionals (and anchors, default the same file) and tabulate the maps.

    Args:
        stats_path: Stats file of the conditionals ``F_ij``.
        anchors_path: Stats file of the anchors, or None for ``stats_path``.
        class_names: The store's class names, which both files must share.
        clamp: ``r``.
        min_pixels: Cells with fewer pixels get no shift; default the stats file's setting.
        tau: When given, the lookup tables for this ``tau`` are built now (and cached), so that
            a ``tau`` these statistics cannot take is reported before any output is written.

    Returns:
        ``(maps, conditionals, anchors)``.
    """
    cond = read_stats(stats_path)
    anchors = cond if anchors_path is None else read_stats(anchors_path)
    for path, stats in ((stats_path, cond), (anchors_path or stats_path, anchors)):
        if stats.class_names != class_names:
            raise InputError(
                f"{path}: class names {stats.class_names} differ from the store's {class_names}"
            )
    if min_pixels is None:
        min_pixels = int(cond.settings.get("min_pixels", DEFAULT_MIN_PIXELS))
    anchor_pixels = anchors.anchor_counts.sum(-1)
    if (anchor_pixels < max(min_pixels, 1)).any():
        raise InputError(
            f"{anchors_path or stats_path}: anchors hold too few pixels "
            f"(positive {anchor_pixels[0]}, negative {anchor_pixels[1]}; need {min_pixels})"
        )
    if not 0.0 <= clamp < 0.5:
        raise InputError(f"--clamp must lie in [0, 0.5), got {clamp}")
    maps = build_maps(cond, anchors, clamp, min_pixels)
    if tau:
        try:
            lookup_tables(maps, tau)
        except ValueError as exc:
            raise InputError(f"{stats_path}: {exc}") from exc
    return maps, cond, anchors


def alignment_settings(
    maps: AlignmentMaps,
    cond: LogitStats,
    anchors: LogitStats,
    stats_path: Path,
    anchors_path: Path | None,
    tau: float,
) -> dict[str, Any]:
    """How a correction was set up, for reports and manifests."""
    return {
        "tau": tau,
        "clamp": maps.clamp,
        "min_pixels": maps.min_pixels,
        "stats": str(stats_path),
        "stats_fingerprint": cond.fingerprint,
        "stats_labels": cond.settings.get("labels"),
        "anchors": str(anchors_path or stats_path),
        "anchors_fingerprint": anchors.fingerprint,
        "estimator": cond.estimator,
        "skipped_cells": [list(ij) for ij in maps.skipped],
    }
