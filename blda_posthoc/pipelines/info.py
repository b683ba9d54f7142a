"""What a logits store or a stats file holds, and renaming its classes after the fact.

:func:`describe_file` returns a JSON-ready dict (``blda info --json`` prints
``{"format": "blda-info", "version": 1, "files": [...]}`` with one dict per file);
:func:`format_description` renders one as text. Keys of a store's dict::

    path, kind="logits store", format, version, created_by, file_bytes, class_names,
    num_classes, dtype, shard (null unless sharded), content (null unless correct --scores-out),
    images (complete), incomplete_images, labelled_images, image_sizes {"HxW": n},
    logit_sizes {"hxw": n}, logit_range [min, max] | null

and of a stats file's::

    path, kind="stats file", format, version, created_by, file_bytes, class_names,
    num_classes, estimator, components, grid {lo, hi, bins}, fingerprint,
    fingerprint_attribute, labels, min_pixels, num_images, num_pixels, sources, settings,
    cells_below_min_pixels, anchor_pixels {positive, negative},
    sample_pixels (null for version 1), calibrations [kind, ...],
    calibrated (null, or {kind, fingerprint, source} of the calibration behind /calibrated)

:func:`rename_classes` rewrites only the class names (and, for a stats file, its fingerprint,
which covers the names) through a temporary file that then replaces the original: a failure
leaves the original untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py

from blda_posthoc import outputs
from blda_posthoc.core.fit import LogitStats
from blda_posthoc.errors import InputError
from blda_posthoc.io import stats as stats_io
from blda_posthoc.io import store as store_io
from blda_posthoc.io.names import describe_names
from blda_posthoc.io.schema import check_version
from blda_posthoc.pipelines.memory import read_stats_within_budget

FORMAT = "blda-info"
VERSION = 1
KINDS = {store_io.FORMAT: "logits store", stats_io.FORMAT: "stats file"}


def _open(path: Path, mode: str = "r") -> h5py.File:
    """Open an HDF5 file of a known format; one-line errors otherwise."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a logits store or stats file")
    try:
        f = h5py.File(path, mode)
    except Exception as exc:  # noqa: BLE001 - h5py raises several types for bad files
        raise InputError(f"{path}: not a readable HDF5 file ({exc})") from exc
    try:
        fmt = f.attrs.get("format")
    except Exception as exc:  # noqa: BLE001
        f.close()
        raise InputError(f"{path}: damaged file ({exc})") from exc
    fmt = fmt.decode(errors="replace") if isinstance(fmt, bytes) else fmt
    if not isinstance(fmt, str) or fmt not in KINDS:
        f.close()
        raise InputError(
            f"{path}: not a logits store or stats file (format {fmt!r}, expected "
            f"{' or '.join(map(repr, KINDS))})"
        )
    return f


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def describe_file(path: Path | str) -> dict[str, Any]:
    """Describe a logits store or a stats file.

    Args:
        path: The file.

    Returns:
        A JSON-ready dict (see the module docstring).

    Raises:
        InputError: not a readable store or stats file, or an unsupported version.
    """
    path = Path(path)
    try:
        return _describe(path)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file is bad input
        raise InputError(f"{path}: damaged file ({exc})") from exc


def _describe(path: Path) -> dict[str, Any]:
    with _open(path) as f:
        fmt = _text(f.attrs["format"])
        readable = (store_io.VERSION,) if fmt == store_io.FORMAT else stats_io.READABLE_VERSIONS
        kind = "logits store" if fmt == store_io.FORMAT else "stats"
        version = check_version(f.attrs.get("version"), readable, f"{path}: {kind}")
        head = {
            "path": str(path),
            "kind": KINDS[fmt],
            "format": fmt,
            "version": version,
            "created_by": _text(f.attrs.get("created_by", "")) or None,
            "file_bytes": path.stat().st_size,
        }
        if fmt == store_io.FORMAT:
            return {**head, **_describe_store(f, path)}
        stored_fingerprint = _text(f.attrs.get("fingerprint", "")) or None
    stats = read_stats_within_budget(path)  # checks the version and reads the histograms
    return {**head, **_describe_stats(stats, stored_fingerprint)}


def _describe_store(f: h5py.File, path: Path) -> dict[str, Any]:
    names = json.loads(f.attrs["class_names"])
    complete = incomplete = labelled = 0
    image_sizes: Counter[str] = Counter()
    logit_sizes: Counter[str] = Counter()
    low, high = float("inf"), float("-inf")
    images = store_io.check_group(f, "images", path)
    for key in images:
        store_io.check_group(images, key, path)  # no links to other objects or files
        group = images[key]
        a = group.attrs
        if not a.get("complete", False):
            incomplete += 1
            continue
        complete += 1
        labelled += bool(a.get("has_label", False))
        image_sizes[f"{int(a['height'])}x{int(a['width'])}"] += 1
        shape = store_io.check_dataset(group, "logits", path, f"images/{key}/logits").shape
        logit_sizes[f"{shape[1]}x{shape[2]}"] += 1
        low, high = min(low, float(a["logit_min"])), max(high, float(a["logit_max"]))
    return {
        "class_names": names,
        "num_classes": len(names),
        "dtype": _text(f.attrs.get("dtype", "")) or None,
        "shard": _text(f.attrs["shard"]) if "shard" in f.attrs else None,
        "content": _text(f.attrs["content"]) if "content" in f.attrs else None,
        "images": complete,
        "incomplete_images": incomplete,
        "labelled_images": labelled,
        "image_sizes": dict(image_sizes.most_common()),
        "logit_sizes": dict(logit_sizes.most_common()),
        "logit_range": [low, high] if complete else None,
    }


def _describe_stats(stats: LogitStats, stored_fingerprint: str | None) -> dict[str, Any]:
    settings = dict(stats.settings)
    min_pixels = settings.get("min_pixels")
    below = None
    if min_pixels is not None:
        below = int((stats.cell_pixels < max(int(min_pixels), 1)).sum())
    anchor_pixels = stats.anchor_counts.sum(-1)
    return {
        "class_names": list(stats.class_names),
        "num_classes": stats.num_classes,
        "estimator": stats.estimator,
        "components": settings.get("components"),
        "grid": {"lo": stats.grid.lo, "hi": stats.grid.hi, "bins": stats.grid.bins},
        "fingerprint": stats.fingerprint,
        "fingerprint_attribute": stored_fingerprint,
        "labels": settings.get("labels"),
        "min_pixels": min_pixels,
        "num_images": settings.get("num_images"),
        "num_pixels": settings.get("num_pixels"),
        "sources": settings.get("sources", []),
        "settings": settings,
        "cells_below_min_pixels": below,
        "anchor_pixels": {"positive": int(anchor_pixels[0]), "negative": int(anchor_pixels[1])},
        **_describe_extras(stats),
    }


def _describe_extras(stats: LogitStats) -> dict[str, Any]:
    """What a version-2 stats file holds beyond the histograms (None / empty for version 1)."""
    extras = stats.extras
    if extras is None:
        return {"sample_pixels": None, "calibrations": [], "calibrated": None}
    calibrated = None
    if extras.calibrated is not None:
        calibrated = dict(extras.calibrated.settings.get("calibration") or {})
    return {
        "sample_pixels": int(extras.sample.labels.shape[0]),
        "calibrations": sorted(extras.calibrations),
        "calibrated": calibrated,
    }


def describe_files(paths: Sequence[Path | str]) -> dict[str, Any]:
    """The ``blda info --json`` document for several files."""
    return {"format": FORMAT, "version": VERSION, "files": [describe_file(p) for p in paths]}


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _counts(sizes: dict[str, int], limit: int = 4) -> str:
    shown = [f"{size} ({n})" for size, n in list(sizes.items())[:limit]]
    more = f", {len(sizes) - limit} more sizes" if len(sizes) > limit else ""
    return ", ".join(shown) + more if shown else "-"


def format_description(d: dict[str, Any]) -> str:
    """Render one :func:`describe_file` dict as indented text lines."""
    rows: list[tuple[str, str]] = [
        ("format", f"{d['format']} version {d['version']} ({d['created_by'] or 'unknown writer'})"),
        ("file size", _human_bytes(d["file_bytes"])),
        ("classes", describe_names(d["class_names"], limit=64)),
    ]
    if d["kind"] == "logits store":
        rows += [
            ("images", f"{d['images']} complete, {d['labelled_images']} with a label"),
            ("image sizes", _counts(d["image_sizes"])),
            ("logit sizes", f"{_counts(d['logit_sizes'])}, stored as {d['dtype']}"),
        ]
        if d["logit_range"] is not None:
            rows.append(("logit range", f"{d['logit_range'][0]:.3g} .. {d['logit_range'][1]:.3g}"))
        if d["incomplete_images"]:
            rows.append(("incomplete", f"{d['incomplete_images']} images (not read by commands)"))
        if d["shard"]:
            rows.append(("shard", d["shard"]))
        if d["content"]:
            rows.append(("content", d["content"]))
    else:
        grid = d["grid"]
        estimator = d["estimator"] + (
            f", {d['components']} components" if d["estimator"] == "gmm" else ""
        )
        rows += [
            ("estimator", estimator),
            ("grid", f"{grid['bins']} bins from {grid['lo']:g} to {grid['hi']:g}"),
            ("labels", f"{d['labels']} ({d['num_images']} images, {d['num_pixels']} pixels)"),
            ("sources", ", ".join(d["sources"]) or "-"),
        ]
        if d["min_pixels"] is not None:
            c2 = d["num_classes"] ** 2
            rows.append(
                (
                    "min pixels",
                    f"{d['min_pixels']}: {d['cells_below_min_pixels']} of {c2} cells below "
                    "(no shift there)",
                )
            )
        a = d["anchor_pixels"]
        rows.append(("anchors", f"P+ {a['positive']} pixels, P- {a['negative']} pixels"))
        if d["sample_pixels"] is not None:
            rows.append(("pixel sample", f"{d['sample_pixels']} pixels"))
        if d["calibrations"]:
            rows.append(("calibrations", ", ".join(d["calibrations"])))
        if d["calibrated"] is not None:
            cal = d["calibrated"]
            source = f" from {cal['source']}" if cal.get("source") else ""
            kind = cal.get("kind", "calibrated")
            rows.append(("calibrated", f"statistics of {kind}-calibrated logits{source}"))
        fingerprint = d["fingerprint"]
        if d["fingerprint_attribute"] not in (None, fingerprint):
            fingerprint += f" (the file's attribute says {d['fingerprint_attribute']})"
        rows.append(("fingerprint", fingerprint))
    width = max(len(key) for key, _ in rows)
    lines = [f"{d['path']}: {d['kind']}"]
    for key, value in rows:
        wrapped = textwrap.wrap(value, 96 - width, break_on_hyphens=False) or [""]
        lines.append(f"  {key.ljust(width)}  {wrapped[0]}")
        lines += [f"  {'':{width}}  {more}" for more in wrapped[1:]]
    return "\n".join(lines)


def rename_classes(path: Path | str, names: Sequence[str]) -> list[str]:
    """Set the class names of a store or stats file, atomically.

    A store is copied to a temporary name beside it, the copy's ``class_names`` attribute is
    rewritten, and the copy replaces the original. A stats file is read and written again with
    the new names (through a temporary file, see :func:`blda_posthoc.io.stats.write_stats`),
    which also updates its fingerprint (the fingerprint covers the names); a version-1 stats
    file is written as version 2.

    Args:
        path: A logits store or stats file.
        names: New names, one per class (the count must not change).

    Returns:
        The old names.

    Raises:
        InputError: not a store or stats file, or the count differs.
    """
    path = Path(path)
    with _open(path) as f:
        fmt = _text(f.attrs["format"])
    # The names are read by the format's validating reader: a damaged file is refused here.
    stats = read_stats_within_budget(path) if fmt == stats_io.FORMAT else None
    old = stats.class_names if stats is not None else store_io.store_class_names(path)
    if len(names) != len(old):
        raise InputError(
            f"{path}: --rename-classes gives {describe_names(list(names))}, but the file has "
            f"{len(old)} classes ({describe_names(old)})"
        )
    if list(names) == old:
        return old
    if stats is not None:
        stats.class_names = list(names)
        if stats.extras is not None and stats.extras.calibrated is not None:
            stats.extras.calibrated.class_names = list(names)
        try:
            stats_io.write_stats(path, stats, overwrite=True)
        except (OSError, InputError) as exc:
            why = str(exc).removeprefix(f"{path}: ")
            raise InputError(f"{path}: cannot rename its classes ({why})") from exc
        return old
    tmp = outputs.temporary_name(path)  # unguessable, created exclusively below
    with outputs.Claim(path):  # no other blda run writes the store meanwhile
        try:
            with outputs.atomic_file(tmp) as handle, open(path, "rb") as source:
                shutil.copyfileobj(source, handle)
            shutil.copymode(path, tmp)
            with h5py.File(tmp, "a") as f:
                f.attrs["class_names"] = json.dumps(list(names))
            os.replace(tmp, path)
        except OSError as exc:
            full = outputs.disk_error(exc, path)
            raise full or InputError(f"{path}: cannot rename its classes ({exc})") from exc
        finally:
            tmp.unlink(missing_ok=True)
    return old
