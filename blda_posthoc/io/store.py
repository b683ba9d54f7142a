"""The logits store (format ``blda-logits``, version 1): one HDF5 file of per-image logits.

Layout::

    /                      attrs: format="blda-logits", version=1, class_names (JSON list),
                                  num_classes, dtype, created_by, [shard "K/N"],
                                  [run_settings (JSON: what --resume checks)],
                                  [fingerprint (content of the whole store)]
    /images/<quoted name>  group, attrs: name, height, width (original image size),
                                  logit_min, logit_max, has_label, [fingerprint], complete
        logits             (C, h, w) float16|float32, chunked, gzip + shuffle
        label              (H, W) uint8 trainIds, 255 = ignore (optional)

``<quoted name>`` is the image name with ``/`` and ``%`` percent-encoded. An image counts only
once its ``complete`` attribute is true; it is set after its data is written and flushed.

A store being written lives at ``STORE.partial`` and is renamed to ``STORE`` when the writer
closes without error, so a killed run leaves either the old file or a resumable partial one.
Several stores (shards) read together through :class:`LogitStore` behave as one dataset.
Stores written with ``--shard K/N`` (root attribute ``shard``) must be read as one complete run:
every K of N exactly once, one N, the same ``run_settings``.

Fingerprints (provenance): each image's ``fingerprint`` is the first 16 hex digits of the
sha256 of its name, logits shape and dtype, original size, stored (compressed) logit chunks and
label bytes, computed while it is written; the root ``fingerprint`` hashes the name-sorted image
fingerprints with the class names, dtype and run settings, written when the store is finished.
Files derived from a store record it (:attr:`LogitStore.fingerprints`). A store written before
fingerprints existed has none; readers then use ``meta-`` plus a hash of its metadata (names,
sizes, logit ranges, the logits' stored byte counts): it changes when the store is replaced by
another, but not when logits are edited in place keeping all of those.

Limits that readers and writers enforce (a store breaking them is refused with an error naming
it): image names follow :func:`blda_posthoc.outputs.check_name`; class names follow
:func:`blda_posthoc.io.names.check_class_names` (2 to 255 unique, non-empty names); logits
finite and within :data:`LOGIT_LIMITS` of the storage dtype; label values class ids or 255;
image sides up to :data:`MAX_SIDE` and at most :data:`MAX_VALUES` logits per image at its full
size; no links to other files, no external storage, no virtual datasets.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import h5py
import numpy as np
import torch

from blda_posthoc import __version__, outputs
from blda_posthoc.core import defaults
from blda_posthoc.core.classes import IGNORE_INDEX
from blda_posthoc.core.correct import resize_logits
from blda_posthoc.errors import InputError
from blda_posthoc.io.chunks import read_chunked
from blda_posthoc.io.names import MAX_CLASSES as MAX_CLASSES  # re-exported (stores hold at most)
from blda_posthoc.io.names import check_class_names
from blda_posthoc.io.prefetch import prefetch
from blda_posthoc.io.schema import MAX_PARTS, check_version
from blda_posthoc.outputs import (
    Claim,
    canonical,
    check_name,
    check_settings,
    disk_error,
    is_regular_file,
    kept_note,
)

# Defined where `blda CMD -h` reads them (no torch there); re-exported here.
MAX_SIDE = defaults.MAX_SIDE

Progress = Callable[[Iterable[str], int], Iterable[str]]
"""Wraps an iteration over image names: ``progress(names, count)``."""

FORMAT = "blda-logits"
VERSION = 1
DTYPES = ("float16", "float32")
LOGIT_LIMITS = {"float16": 65504.0, "float32": 1e9}
"""Largest logit magnitude a store holds, per storage dtype (float16: its whole range)."""
LOGIT_LIMIT = LOGIT_LIMITS["float32"]
MAX_VALUES = 1 << 28
"""Most logits of one image at its full size (``C * H * W``; 1 GiB as float32): the budget
every shape a store declares is checked against before anything is allocated. Commands hold an
image's logits at its full size with their scores and temporaries (docs/safety.md gives the
measured peak at this limit)."""
RESERVE_MARGIN = 1 << 20
"""Bytes reserved beyond an image's data for HDF5 metadata (see :meth:`StoreWriter.write`)."""


@dataclass
class Record:
    """One image of a store.

    Attributes:
        name: Image name (relative path without extension).
        logits: ``(C, h, w)`` float32 logits.
        label: ``(H, W)`` uint8 trainIds (255 = ignore), or None.
        size: ``(H, W)``, the image's original size.
    """

    name: str
    logits: np.ndarray
    label: np.ndarray | None
    size: tuple[int, int]


GZIP_LEVEL = 1
CHUNK_SIZE = 512


def chunk_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """HDF5 chunk shape of a ``(C, h, w)`` logits dataset: one channel, at most 512 x 512."""
    return 1, min(shape[1], CHUNK_SIZE), min(shape[2], CHUNK_SIZE)


def chunk_offsets(shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``(c, y, x)`` offsets of every chunk of a ``(C, h, w)`` logits dataset, in write order."""
    _, ch, cw = chunk_shape(shape)
    return [
        (c, y, x)
        for c in range(shape[0])
        for y in range(0, shape[1], ch)
        for x in range(0, shape[2], cw)
    ]


def encode_logits(logits: np.ndarray, dtype: str) -> list[tuple[tuple[int, int, int], bytes]]:
    """Compress ``(C, h, w)`` logits chunk by chunk exactly as the store's filters do.

    Byte shuffle, then deflate (zlib, level :data:`GZIP_LEVEL`, run-length strategy: about 40%
    less CPU than the default strategy for about 20% more bytes on float16 logits; any reader of
    the gzip filter decodes it); edge chunks are padded with zeros to the full chunk shape, as
    HDF5 does. numpy and zlib release the GIL here, so several threads can encode images in
    parallel while :meth:`StoreWriter.write` (``encoded=``) only copies bytes into the file.

    Args:
        logits: ``(C, h, w)`` logits.
        dtype: Storage dtype, ``float16`` or ``float32``.

    Returns:
        ``((c, y, x) chunk offset, compressed bytes)`` for every chunk.
    """
    data = np.asarray(logits).astype(dtype, copy=False)
    _, ch, cw = chunk_shape(data.shape)
    itemsize = data.dtype.itemsize
    encoded = []
    for c, y, x in chunk_offsets(data.shape):
        part = data[c, y : y + ch, x : x + cw]
        block = np.zeros((ch, cw), dtype=data.dtype)
        block[: part.shape[0], : part.shape[1]] = part
        shuffled = block.view(np.uint8).reshape(-1, itemsize).T.tobytes()
        deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
        encoded.append(((c, y, x), deflate.compress(shuffled) + deflate.flush()))
    return encoded


def partial_path(path: Path) -> Path:
    """Where a store is written before it is complete."""
    return outputs.partial_path(path)


def expand_store_paths(specs: Sequence[str | Path]) -> list[Path]:
    """Expand file arguments (stores, shard reports; paths or glob patterns): sorted, unique."""
    paths: list[Path] = []
    for spec in specs:
        text = str(spec)
        if any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise InputError(f"{text}: no file matches this pattern")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(text))
    seen: set[Path] = set()
    unique = []
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def check_label_values(label: np.ndarray, num_classes: int, where: str) -> None:
    """Refuse a uint8 label map holding a value that is neither a class id nor 255 (ignore).

    Every command reads labels through the store, so a label no class can match is refused
    once, here, instead of being dropped by one command and refused by another.
    """
    if num_classes >= IGNORE_INDEX or not label.size:
        return
    top = label.max()
    if top < num_classes:
        return
    bad = label[(label >= num_classes) & (label != IGNORE_INDEX)]
    if bad.size:
        raise InputError(
            f"{where}: label value {int(bad.max())} is neither a class id (0..{num_classes - 1})"
            f" nor the ignore value {IGNORE_INDEX} ({bad.size} pixels)"
        )


def check_logit_values(
    logits: np.ndarray, where: str, dtype: str = "float32"
) -> tuple[float, float]:
    """``(min, max)`` of logits, checking they are finite and fit a store of ``dtype``.

    Args:
        logits: Logits of any shape and float dtype (before the storage cast: values beyond the
            float16 range would become infinite in a float16 store).
        where: What they are, for messages.
        dtype: Storage dtype.

    Returns:
        ``(min, max)`` of the logits as ``dtype`` stores them.
    """
    if logits.size == 0:
        raise InputError(f"{where}: no logits (shape {tuple(logits.shape)})")
    return check_logit_range(float(np.min(logits)), float(np.max(logits)), where, dtype)


def check_logit_range(
    low: float, high: float, where: str, dtype: str = "float32"
) -> tuple[float, float]:
    """:func:`check_logit_values` given the logits' ``(min, max)`` (NaN when one is NaN)."""
    if not (np.isfinite(low) and np.isfinite(high)):  # min/max propagate NaN
        raise InputError(f"{where}: logits contain NaN or infinite values")
    peak = max(-low, high)
    if dtype == "float16" and peak > LOGIT_LIMITS["float16"]:
        raise InputError(
            f"{where}: logits reach {peak:.4g}, beyond the float16 range (±65504) of the store; "
            "use --dtype float32"
        )
    if peak > LOGIT_LIMIT:
        raise InputError(
            f"{where}: logits reach {peak:.4g}, beyond the ±{LOGIT_LIMIT:g} a store holds; "
            "rescale them"
        )
    stored = np.array([low, high]).astype(dtype)
    return float(stored[0]), float(stored[1])


class StoreWriter:
    """Write a logits store image by image; use as a context manager.

    The store's path is claimed first (``STORE.lock``: a second writer stops at once), and
    the store is built at ``STORE.partial``, created exclusively, and renamed to ``STORE`` when
    the writer closes without error. Before each image, the disk space it needs is reserved, so
    a full disk ends in an error that leaves the images written so far resumable.

    A resumed store is rewritten at close, in name order, exactly as one uninterrupted run
    writes it; writers therefore write images in name order.

    Args:
        path: Final store path; data goes to ``path.partial`` until the writer closes.
        class_names: One name per logit channel.
        dtype: Storage dtype of the logits, ``float16`` or ``float32``.
        overwrite: Replace an existing store (only once the new one is complete).
        resume: Continue a partial (or complete) store, keeping its complete images.
        attrs: Extra root attributes (e.g. ``shard``).
        settings: What determines the logits (model, preprocessing, sources); recorded, and
            ``resume`` requires equal settings. None records none (and resumes only a store
            that records none).
    """

    def __init__(
        self,
        path: Path,
        class_names: Sequence[str],
        *,
        dtype: str = "float16",
        overwrite: bool = False,
        resume: bool = False,
        attrs: Mapping[str, str | int | float] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise InputError(f"{path}: storage dtype must be one of {DTYPES}, got {dtype!r}")
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.class_names = check_class_names(list(class_names), self.path)
        self.dtype = dtype
        self.attrs = dict(attrs or {})
        self.settings = None if settings is None else canonical(settings)
        self.resumed = False
        self.changed = False
        self.broken = False
        self._name_bytes = 0
        self.claim = Claim(self.path)
        try:
            self.file = self._open(overwrite, resume)
        except BaseException:
            self.claim.release()
            raise

    # -- opening

    def _open(self, overwrite: bool, resume: bool) -> h5py.File:
        if self.path.exists() and not (overwrite or resume):
            raise InputError(f"{self.path}: already exists (use --overwrite to replace it)")
        if self.path.exists() and not is_regular_file(self.path):
            raise InputError(f"{self.path}: is not a regular file; refusing to replace it")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{self.path.parent}: cannot create ({exc.strerror})") from exc
        moved = resume and not os.path.lexists(self.tmp) and self.path.exists()
        if moved:
            os.replace(self.path, self.tmp)
        if resume and os.path.lexists(self.tmp):
            try:
                file = self._open_existing()
            except BaseException:
                if moved:  # leave a complete store complete when it cannot be resumed
                    os.replace(self.tmp, self.path)
                raise
            self.resumed = not moved
            return file
        if os.path.lexists(self.tmp):
            if not (overwrite or resume):
                raise InputError(
                    f"{self.tmp}: an unfinished run is there (use --resume to continue it or "
                    "--overwrite to start over)"
                )
            os.unlink(self.tmp)  # under our claim: nobody else is writing it
        return self._create(self.tmp)

    def _create(self, path: Path) -> h5py.File:
        try:  # "x": O_EXCL, so neither an existing file nor a symbolic link is followed
            file = h5py.File(path, "x", track_order=True, locking=False)
        except (OSError, ValueError) as exc:
            raise _store_error(exc, path, "cannot create") from exc
        try:
            outputs.reserve(file.id.get_vfd_handle(), 0, RESERVE_MARGIN, path)
        except InputError:
            file.close()
            path.unlink(missing_ok=True)
            raise
        root = file.attrs
        root["format"] = FORMAT
        root["version"] = VERSION
        root["class_names"] = json.dumps(self.class_names)
        root["num_classes"] = len(self.class_names)
        root["dtype"] = self.dtype
        root["created_by"] = f"blda-posthoc {__version__}"
        for key, value in self.attrs.items():
            root[key] = value
        if self.settings is not None:
            root["run_settings"] = json.dumps(self.settings, sort_keys=True)
        file.require_group("images")
        file.flush()  # from here a killed run leaves a file that --resume can open
        return file

    def _open_existing(self) -> h5py.File:
        if not is_regular_file(self.tmp):
            raise InputError(f"{self.tmp}: is not a regular file; refusing to resume it")
        try:
            f = h5py.File(self.tmp, "a", locking=False)
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{self.tmp}: damaged, cannot resume ({_first_line(exc)}); use --overwrite to "
                "start again"
            ) from exc
        try:
            meta = _check_root(self.tmp, f)
            if meta.class_names != self.class_names:
                raise InputError(f"{self.tmp}: class names differ from this run's; cannot resume")
            if meta.dtype != self.dtype:
                raise InputError(
                    f"{self.tmp}: stored as {meta.dtype}, not {self.dtype}; cannot resume"
                )
            for key, value in self.attrs.items():
                if _text(f.attrs.get(key)) != str(value):
                    raise InputError(
                        f"{self.tmp}: holds {key} {_text(f.attrs.get(key))}, not this run's "
                        f"{value}; cannot resume"
                    )
            if self.settings is not None:
                recorded = meta.run_settings
                check_settings(self.tmp, recorded, self.settings)
            odd = sorted(set(f) - {"images"})
            if odd:
                raise InputError(f"{self.tmp}: holds {odd[0]!r}, not a store's; cannot resume")
            self._drop_incomplete(f)
        except InputError:
            f.close()
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file is bad input
            f.close()
            raise InputError(
                f"{self.tmp}: damaged, cannot resume ({_first_line(exc)}); use --overwrite to "
                "start again"
            ) from exc
        return f

    def _drop_incomplete(self, f: h5py.File) -> None:
        """Drop unfinished images; check every finished one as :class:`LogitStore` would."""
        images = _group(f, "images", self.tmp)
        for key in list(images):
            group = _image_group(images, key, self.tmp)
            if group is None:
                del images[key]
                self.changed = True
            else:
                self._check_kept(group, key)

    def _check_kept(self, group: h5py.Group, key: str) -> None:
        """Refuse a kept image that is not plain data as this writer stores it.

        Its datasets must be hard links inside the file (no external, virtual or linked
        storage: the rule of every reader), its logits ``(C, h, w)`` of the store's dtype,
        chunked as :func:`chunk_shape`, its label ``(H, W)`` uint8 of the recorded size, its
        attributes of the right types; else nothing is copied into the final store.
        """
        where = f"kept image {key!r}"
        odd = sorted(set(group) - {"logits", "label"})
        if odd:
            raise InputError(f"{self.tmp}: {where}: holds {odd[0]!r}, not a store's; cannot resume")
        if bool(group.attrs.get("has_label", False)) != ("label" in group):
            raise InputError(f"{self.tmp}: {where}: has_label disagrees with its data")
        name = check_name(_text(group.attrs.get("name")), self.tmp)
        if quote(name, safe="") != key:
            raise InputError(f"{self.tmp}: images/{key} holds the name {name!r}; cannot resume")
        attrs = group.attrs
        height, width = attrs.get("height"), attrs.get("width")
        if not all(
            isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)
            for v in (height, width)
        ):
            raise InputError(f"{self.tmp}: {where}: size {height!r}x{width!r}; cannot resume")
        size = (int(height), int(width))
        _check_size(size, len(self.class_names), f"{self.tmp}: {where}")
        for bound in ("logit_min", "logit_max"):
            value = attrs.get(bound)
            if not isinstance(value, float | int | np.floating | np.integer) or not np.isfinite(
                value
            ):
                raise InputError(f"{self.tmp}: {where}: {bound} is {value!r}; cannot resume")
        logits = check_dataset(group, "logits", self.tmp, f"{where} logits")
        shape = tuple(logits.shape)
        if (
            logits.dtype != np.dtype(self.dtype)
            or len(shape) != 3
            or shape[0] != len(self.class_names)
            or min(shape) < 1
            or max(shape[1:]) > MAX_SIDE
            or logits.chunks != chunk_shape(shape)
            or logits.compression != "gzip"
            or not logits.shuffle
        ):
            raise InputError(
                f"{self.tmp}: {where}: logits are {logits.dtype} {shape} chunked {logits.chunks}, "
                f"not as this writer stores them; cannot resume (use --overwrite)"
            )
        if "label" in group:
            label = check_dataset(group, "label", self.tmp, f"{where} label")
            if label.dtype != np.uint8 or tuple(label.shape) != size:
                raise InputError(
                    f"{self.tmp}: {where}: label is {label.dtype} {tuple(label.shape)}, expected "
                    f"uint8 {size}; cannot resume (use --overwrite)"
                )

    # -- writing

    def has(self, name: str) -> bool:
        """Whether ``name`` is already stored completely (for resume)."""
        group = self.file["images"].get(quote(name, safe=""))
        return group is not None and bool(group.attrs.get("complete", False))

    def complete_count(self) -> int:
        """How many images are stored completely."""
        images = self.file["images"]
        return sum(bool(images[key].attrs.get("complete", False)) for key in images)

    def write(
        self,
        name: str,
        logits: np.ndarray,
        label: np.ndarray | None = None,
        size: tuple[int, int] | None = None,
        value_range: tuple[float, float] | None = None,
        encoded: Sequence[tuple[tuple[int, int, int], bytes]] | None = None,
    ) -> None:
        """Store one image.

        Args:
            name: Image name (see :func:`blda_posthoc.outputs.check_name`).
            logits: ``(C, h, w)`` logits (any float dtype; stored as the store's dtype, and
                checked to be finite and within :data:`LOGIT_LIMIT` after that cast).
            label: ``(H, W)`` uint8 trainIds, or None.
            size: ``(H, W)`` original image size; default the label's size, else ``(h, w)``.
            value_range: ``(min, max)`` of ``logits`` as stored, from a caller that has computed
                it and checked that the logits are finite (saves two slow passes).
            encoded: The logits' chunks as :func:`encode_logits` returns them (compressed
                beforehand, e.g. in parallel threads); default: encoded here.
        """
        check_name(name, self.path)
        c = len(self.class_names)
        if logits.ndim != 3 or logits.shape[0] != c or min(logits.shape) < 1:
            raise InputError(
                f"{name}: expected logits of shape ({c}, h, w) with h, w >= 1, "
                f"got {tuple(logits.shape)}"
            )
        if value_range is None:
            value_range = check_logit_values(logits, name, self.dtype)
        elif max(-value_range[0], value_range[1]) > LOGIT_LIMITS[self.dtype]:
            raise InputError(f"{name}: logits exceed the {self.dtype} store's range")
        if label is not None:
            label = np.asarray(label)
            if label.dtype != np.uint8 or label.ndim != 2 or min(label.shape) < 1:
                raise InputError(
                    f"{name}: label must be a (H, W) uint8 map, got {label.dtype} {label.shape}"
                )
        if size is None:
            shape = label.shape if label is not None else logits.shape[1:]
            size = (int(shape[0]), int(shape[1]))
        _check_size(size, c, name)
        if label is not None and tuple(label.shape) != tuple(size):
            raise InputError(f"{name}: label is {label.shape}, the image {tuple(size)}")
        if label is not None:
            check_label_values(label, c, f"{self.path}: {name}")
        if encoded is None:
            encoded = encode_logits(logits, self.dtype)
        if self.broken:
            raise InputError(f"{self.tmp}: an earlier write failed; the store cannot continue")
        self._put(self.tmp, name, tuple(logits.shape), encoded, label, size, value_range)
        self.changed = True

    def _put(
        self,
        path: Path,
        name: str,
        shape: tuple[int, ...],
        encoded: Sequence[tuple[tuple[int, int, int], bytes]],
        label: np.ndarray | None,
        size: tuple[int, int],
        value_range: tuple[float, float],
    ) -> None:
        """Reserve the disk space one image needs, then write its group."""
        need = sum(len(chunk) for _, chunk in encoded) + RESERVE_MARGIN + 2 * self._name_bytes
        need += label.nbytes if label is not None else 0
        outputs.reserve(self.file.id.get_vfd_handle(), self.file.id.get_filesize(), need, path)
        fingerprint = image_fingerprint(name, shape, self.dtype, encoded, label, size)
        try:
            _write_group(
                self.file, name, shape, self.dtype, encoded, label, size, value_range, fingerprint
            )
        except Exception as exc:  # noqa: BLE001 - HDF5 failed half-way: never touch it again
            self._abandon()
            raise _store_error(exc, path, "cannot write") from exc
        self._name_bytes += len(quote(name, safe="")) + 16

    def _abandon(self) -> None:
        """Keep a file whose write failed open and untouched until the process exits.

        HDF5 (2.0) can crash the process when a file whose write failed is flushed or closed;
        the command line ends such a process without closing it (see
        :func:`blda_posthoc.outputs.abandoned`).
        """
        self.broken = True
        outputs.abandon(self.file)

    # -- closing

    def close(self, success: bool = True) -> None:
        """Close the file; on success move it to its final name.

        On failure the partial store is kept when it holds complete images (for ``--resume``)
        and removed otherwise.
        """
        try:
            if self.broken:
                return
            if success and self.resumed and self.changed:
                self._rebuild()
            if success:
                self._close_file()
                os.replace(self.tmp, self.path)
                return
            kept = self.complete_count()
            self.file.close()
            if not kept:
                self.tmp.unlink(missing_ok=True)
        finally:
            self.claim.release()

    def _fingerprint(self) -> str:
        """The store's content fingerprint, from its complete images' fingerprints."""
        images = self.file["images"]
        prints = {}
        for key in images:
            attrs = images[key].attrs
            if attrs.get("complete", False):
                prints[str(attrs["name"])] = _text(attrs.get("fingerprint")) or ""
        return store_fingerprint(prints, self.class_names, self.dtype, self.settings)

    def _close_file(self) -> None:
        """Record the fingerprint, flush, drop reserved space beyond the data, close."""
        try:
            self.file.attrs["fingerprint"] = self._fingerprint()
            self.file.flush()
            size = self.file.id.get_filesize()
            os.ftruncate(self.file.id.get_vfd_handle(), size)
            self.file.close()
        except Exception as exc:  # noqa: BLE001
            self._abandon()
            raise _store_error(exc, self.tmp, "cannot finish") from exc

    def _rebuild(self) -> None:
        """Rewrite a resumed store in name order, as one uninterrupted run writes it."""
        fresh_path = self.tmp.with_name(self.tmp.name + ".rewrite")
        if os.path.lexists(fresh_path):
            os.unlink(fresh_path)
        old = self.file
        images = old["images"]
        keys = sorted(
            (str(images[key].attrs["name"]), key)
            for key in images
            if images[key].attrs.get("complete", False)
        )
        self.file = self._create(fresh_path)
        self._name_bytes = 0
        try:
            for name, key in keys:
                group = images[key]
                dset = group["logits"]
                encoded = [(o, dset.id.read_direct_chunk(o)[1]) for o in chunk_offsets(dset.shape)]
                label = group["label"][()] if "label" in group else None
                attrs = group.attrs
                size = (int(attrs["height"]), int(attrs["width"]))
                value_range = (float(attrs["logit_min"]), float(attrs["logit_max"]))
                self._put(fresh_path, name, tuple(dset.shape), encoded, label, size, value_range)
        except BaseException:
            if not self.broken:
                self.file.close()
            self.file = old
            fresh_path.unlink(missing_ok=True)
            raise
        old.close()
        os.replace(fresh_path, self.tmp)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        kept = 0
        if exc is not None and not self.broken:
            try:
                kept = self.complete_count()
            except Exception:  # noqa: BLE001 - describing the stop must not hide its cause
                kept = 0
        self.close(success=exc_type is None)
        if exc is not None:
            if self.broken:
                kept_note(exc, f"{self.tmp} may be damaged; --resume checks it")
            elif kept:
                kept_note(
                    exc,
                    f"{kept} finished image{'s are' if kept != 1 else ' is'} kept in "
                    f"{self.tmp}; rerun with --resume to continue",
                )


def _write_group(
    file: h5py.File,
    name: str,
    shape: tuple[int, ...],
    dtype: str,
    encoded: Sequence[tuple[tuple[int, int, int], bytes]],
    label: np.ndarray | None,
    size: tuple[int, int],
    value_range: tuple[float, float],
    fingerprint: str,
) -> None:
    """Write one image's group: data, flush, then ``complete``, flush."""
    key = quote(name, safe="")
    images = file["images"]
    if key in images:
        del images[key]
    group = images.create_group(key)
    filters = {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}
    dset = group.create_dataset(
        "logits", shape=shape, dtype=dtype, chunks=chunk_shape(shape), **filters
    )
    for offset, chunk in encoded:
        dset.id.write_direct_chunk(offset, chunk)
    if label is not None:
        group.create_dataset(
            "label", data=label, chunks=True, compression="gzip", compression_opts=1
        )
    group.attrs["name"] = name
    group.attrs["height"] = int(size[0])
    group.attrs["width"] = int(size[1])
    group.attrs["logit_min"] = float(value_range[0])
    group.attrs["logit_max"] = float(value_range[1])
    group.attrs["has_label"] = label is not None
    group.attrs["fingerprint"] = fingerprint
    file.flush()
    group.attrs["complete"] = True
    file.flush()


FINGERPRINT_DIGITS = 16


def image_fingerprint(
    name: str,
    shape: tuple[int, ...],
    dtype: str,
    encoded: Sequence[tuple[tuple[int, int, int], bytes]],
    label: np.ndarray | None,
    size: tuple[int, int],
) -> str:
    """An image's content fingerprint: its name, shape, dtype, size, stored chunks and label."""
    digest = hashlib.sha256()
    digest.update(json.dumps([name, list(shape), dtype, list(size)]).encode())
    for offset, chunk in encoded:
        digest.update(repr(tuple(offset)).encode())
        digest.update(len(chunk).to_bytes(8, "little"))
        digest.update(chunk)
    if label is not None:
        digest.update(b"label" + repr(tuple(label.shape)).encode())
        digest.update(np.ascontiguousarray(label).tobytes())
    return digest.hexdigest()[:FINGERPRINT_DIGITS]


def store_fingerprint(
    images: Mapping[str, str],
    class_names: Sequence[str],
    dtype: str,
    settings: Mapping[str, Any] | None,
) -> str:
    """A store's content fingerprint: its images' fingerprints (by name), classes, settings."""
    body = {
        "images": sorted(images.items()),
        "class_names": list(class_names),
        "dtype": dtype,
        "settings": None if settings is None else canonical(settings),
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_DIGITS]


def _recorded_fingerprint(f: h5py.File, path: Path) -> str | None:
    """The root ``fingerprint`` a store records (None for a store written before them)."""
    if "fingerprint" not in f.attrs:
        return None
    value = _text(f.attrs.get("fingerprint"))
    if (
        value is None
        or len(value) != FINGERPRINT_DIGITS
        or any(ch not in "0123456789abcdef" for ch in value)
    ):
        raise InputError(
            f"{path}: damaged logits store (fingerprint {value!r} is not 16 hex digits)"
        )
    return value


def _metadata_fingerprint(images: h5py.Group, keys: Iterable[str]) -> str:
    """``meta-`` and a hash of the metadata of a store without a fingerprint (see module doc)."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        group = images[key]
        attrs = group.attrs
        fields = [key] + [
            str(attrs.get(k)) for k in ("height", "width", "logit_min", "logit_max", "has_label")
        ]
        for part in ("logits", "label"):
            link = group.get(part, getlink=True)
            if isinstance(link, h5py.HardLink) and isinstance(group.get(part), h5py.Dataset):
                fields.append(f"{part}:{group[part].shape}:{group[part].id.get_storage_size()}")
        digest.update(json.dumps(fields).encode())
    return "meta-" + digest.hexdigest()[:FINGERPRINT_DIGITS]


def _shard_of(f: h5py.File, path: Path) -> tuple[int, int] | None:
    """The ``shard`` attribute ``"K/N"`` of a store, checked (None when it has none)."""
    if "shard" not in f.attrs:
        return None
    text = _text(f.attrs.get("shard")) or ""
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n) <= MAX_PARTS):
        raise InputError(f"{path}: damaged logits store (shard {text!r} is not K/N)")
    return int(k), int(n)


def check_shard_set(
    paths: Sequence[Path],
    shards: Sequence[tuple[int, int] | None],
    settings: Sequence[dict[str, Any] | None],
) -> None:
    """Stores written with ``--shard K/N`` must be given as one complete run.

    Every K of one N exactly once, all with the same run settings; stores without a ``shard``
    attribute may be read beside them.

    Raises:
        InputError: One line naming the odd, repeated or missing shard.
    """
    sharded = [i for i, shard in enumerate(shards) if shard is not None]
    if not sharded:
        return
    first = sharded[0]
    k0, n0 = shards[first] or (0, 0)
    seen: dict[int, Path] = {}
    for i in sharded:
        k, n = shards[i] or (0, 0)
        if n != n0:
            raise InputError(
                f"{paths[i]}: shard {k}/{n} is not of the same run as {paths[first]} "
                f"(shard {k0}/{n0})"
            )
        if canonical(settings[i] or {}) != canonical(settings[first] or {}):
            raise InputError(
                f"{paths[i]}: shard {k}/{n} is not of the same run as {paths[first]} "
                "(other run settings: another model, preprocessing or correction)"
            )
        if k in seen:
            raise InputError(f"{paths[i]}: shard {k}/{n} given twice (also {seen[k]})")
        seen[k] = paths[i]
    if len(seen) != n0:
        missing = next(k for k in range(1, n0 + 1) if k not in seen)
        raise InputError(
            f"{paths[first]}: shard {missing}/{n0} of its run is missing ({len(seen)} of {n0} "
            f"given); give every shard, e.g. {_shard_pattern(paths[first], (k0, n0))}"
        )


def _shard_pattern(path: Path, shard: tuple[int, int]) -> str:
    suffix = f"-{shard[0]}-of-{shard[1]}"
    stem = path.stem[: -len(suffix)] if path.stem.endswith(suffix) else path.stem
    return f"'{path.with_name(f'{stem}-*-of-{shard[1]}{path.suffix}')}'"


def _store_error(exc: BaseException, path: Path, doing: str) -> InputError:
    full = disk_error(exc, path)
    if full is not None:
        return full
    return InputError(f"{path}: {doing} ({_first_line(exc)})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _text(value: object) -> str | None:
    """An HDF5 string attribute as ``str`` (None when absent or not text)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        return value
    return None


def _check_size(size: tuple[int, int], num_classes: int, where: str | Path) -> None:
    h, w = size
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise InputError(f"{where}: image size {h}x{w} is out of range (sides 1 to {MAX_SIDE})")
    if num_classes * h * w > MAX_VALUES:
        raise InputError(
            f"{where}: image size {h}x{w} with {num_classes} classes needs "
            f"{num_classes * h * w * 4 / 2**30:.1f} GiB of float32 logits at its full size; at "
            f"most {MAX_VALUES * 4 / 2**30:.0f} GiB ({MAX_VALUES} logits) per image: record it "
            "at a smaller size"
        )


@dataclass
class _Root:
    class_names: list[str]
    dtype: str
    run_settings: dict[str, Any] | None


def _check_root(path: Path, f: h5py.File) -> _Root:
    """Check a store's root attributes; return what they say."""
    fmt = _text(f.attrs.get("format"))
    if fmt != FORMAT:
        raise InputError(f"{path}: not a logits store (format {fmt!r}, expected {FORMAT!r})")
    check_version(f.attrs.get("version"), (VERSION,), f"{path}: logits store")
    try:
        names = json.loads(_text(f.attrs.get("class_names")) or "")
    except ValueError as exc:
        raise InputError(f"{path}: class names are not valid JSON") from exc
    names = check_class_names(names, path)
    dtype = _text(f.attrs.get("dtype"))
    if dtype not in DTYPES:
        raise InputError(f"{path}: storage dtype {dtype!r} is not one of {DTYPES}")
    settings = None
    if "run_settings" in f.attrs:
        try:
            settings = json.loads(_text(f.attrs.get("run_settings")) or "")
        except ValueError:
            settings = None
        if not isinstance(settings, dict):
            raise InputError(f"{path}: run settings are not a JSON object")
    return _Root(names, dtype, settings)


def store_class_names(path: Path) -> list[str]:
    """A store's class names, through the same root checks as :class:`LogitStore`."""
    try:
        f = h5py.File(path, "r")
    except Exception as exc:  # noqa: BLE001 - h5py raises several types for bad files
        raise InputError(f"{path}: not a readable HDF5 file ({_first_line(exc)})") from exc
    with f:
        try:
            return _check_root(path, f).class_names
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file is bad input
            raise InputError(f"{path}: damaged logits store ({_first_line(exc)})") from exc


def _link_ok(parent: h5py.Group, key: str, path: Path) -> None:
    """Refuse an entry that is a link (to another file or elsewhere in this one)."""
    link = parent.get(key, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise InputError(
            f"{path}: {parent.name.rstrip('/')}/{key} is a {type(link).__name__}; stores may not "
            "link to other objects or files"
        )


def _group(parent: h5py.Group, key: str, path: Path) -> h5py.Group:
    if key not in parent:
        raise InputError(f"{path}: damaged logits store (no {key!r} group)")
    _link_ok(parent, key, path)
    group = parent[key]
    if not isinstance(group, h5py.Group):
        raise InputError(f"{path}: damaged logits store ({key!r} is not a group)")
    return group


def check_group(parent: h5py.Group, key: str, path: Path) -> h5py.Group:
    """A group stored in this file (every part of ``key`` a hard link)."""
    node = parent
    for part in key.split("/"):
        if part not in node:
            raise InputError(f"{path}: {node.name.rstrip('/')}/{part}: missing")
        _link_ok(node, part, path)
        node = node[part]
        if not isinstance(node, h5py.Group):
            raise InputError(f"{path}: {node.name}: not a group")
    return node


def _image_group(images: h5py.Group, key: str, path: Path) -> h5py.Group | None:
    """An image's group when complete and well-formed, None when incomplete."""
    _link_ok(images, key, path)
    group = images[key]
    if not isinstance(group, h5py.Group):
        raise InputError(f"{path}: damaged logits store (images/{key} is not a group)")
    complete = group.attrs.get("complete", False)
    if not isinstance(complete, bool | np.bool_):
        raise InputError(f"{path}: damaged logits store (images/{key}: 'complete' is not a flag)")
    return group if complete else None


def check_dataset(parent: h5py.Group, key: str, path: Path, where: str) -> h5py.Dataset:
    """A dataset stored inside this file: a hard link, no external storage, not virtual.

    Args:
        parent: The group holding it.
        key: Its name.
        path: The file, for messages.
        where: What it is (e.g. ``image 'a/b' logits``), for messages.

    Returns:
        The dataset.
    """
    folder, _, key = key.rpartition("/")
    if folder:
        parent = check_group(parent, folder, path)
    if key not in parent:
        raise InputError(f"{path}: {where}: missing")
    _link_ok(parent, key, path)
    dset = parent[key]
    if not isinstance(dset, h5py.Dataset):
        raise InputError(f"{path}: {where}: not a dataset")
    if dset.is_virtual or dset.external:
        raise InputError(
            f"{path}: {where}: uses {'virtual' if dset.is_virtual else 'external'} storage "
            "(data outside this file), which stores may not"
        )
    return dset


def shard_names(names: Iterable[str], shard: tuple[int, int]) -> list[str]:
    """Shard ``(K, N)`` (1-based) of ``names``: sorted, the indices ``i`` with ``i % N == K - 1``.

    The one rule of every ``--shard K/N`` (``dump-logits`` splits its inputs the same way).
    """
    k, n = shard
    if n < 1 or not 1 <= k <= n:
        raise InputError(f"--shard {k}/{n}: need 1 <= K <= N")
    return sorted(names)[k - 1 :: n]


class LogitStore:
    """Read one or more logits stores as one dataset, in sorted name order.

    Every value read is checked (names, sizes, class count, finite logits within the recorded
    range, data inside the file); a damaged or hostile store ends in an :class:`InputError`
    naming it.

    Args:
        paths: Store files (shards); they must share class names and hold distinct names.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        if not paths:
            raise InputError("no logits store given")
        self.paths = [Path(p) for p in paths]
        self._files: list[h5py.File] = []
        self._where: dict[str, tuple[int, str]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._pool_lock = threading.Lock()
        self._reading = threading.local()
        self.class_names: list[str] = []
        self.fingerprints: list[str] = []
        """Each store's content fingerprint (``meta-...`` for a store written without one)."""
        shards: list[tuple[int, int] | None] = []
        settings: list[dict[str, Any] | None] = []
        try:
            for index, path in enumerate(self.paths):
                root = self._open_one(index, path)
                shards.append(_shard_of(self._files[index], path))
                settings.append(root.run_settings)
            check_shard_set(self.paths, shards, settings)
        except BaseException:
            self.close()
            raise
        self.names = sorted(self._where)
        if not self.names:
            raise InputError(f"{self.paths[0]}: the store holds no complete image")

    def _open_one(self, index: int, path: Path) -> _Root:
        if not path.exists():
            hint = (
                " (an unfinished run left a .partial file: rerun the command that writes it "
                "with --resume)"
                if partial_path(path).exists()
                else ""
            )
            raise InputError(f"{path}: no such logits store{hint}")
        if path.is_dir():
            raise InputError(f"{path}: is a folder, not a logits store")
        try:
            f = h5py.File(path, "r")
        except Exception as exc:  # noqa: BLE001 - h5py raises several types for bad files
            raise InputError(f"{path}: not a readable HDF5 file ({_first_line(exc)})") from exc
        self._files.append(f)
        try:
            root = _check_root(path, f)
            names = root.class_names
            if index == 0:
                self.class_names = names
            elif names != self.class_names:
                raise InputError(f"{path}: class names differ from {self.paths[0]}")
            images = _group(f, "images", path)
            for key in images:
                group = _image_group(images, key, path)
                if group is None:
                    continue
                name = check_name(_text(group.attrs.get("name")), path)
                if quote(name, safe="") != key:
                    raise InputError(f"{path}: images/{key} holds the name {name!r}")
                if name in self._where:
                    other = self.paths[self._where[name][0]]
                    raise InputError(f"{path}: image {name!r} is also in {other}")
                self._where[name] = (index, key)
            recorded = _recorded_fingerprint(f, path)
            if recorded is None:
                mine = [key for n, (i, key) in self._where.items() if i == index]
                recorded = _metadata_fingerprint(images, mine)
            self.fingerprints.append(recorded)
            return root
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file is bad input
            raise InputError(f"{path}: damaged logits store ({_first_line(exc)})") from exc

    def select_shard(self, shard: tuple[int, int] | None) -> None:
        """Keep only the images of shard ``(K, N)`` (1-based) in :attr:`names`.

        The one rule of every ``--shard K/N``: the name-sorted images at indices ``i`` with
        ``i % N == K - 1`` (as ``dump-logits`` splits its inputs). None keeps every image.

        Raises:
            InputError: When the shard holds no image (more shards than images).
        """
        if shard is None:
            return
        k, n = shard
        names = shard_names(self.names, shard)
        if not names:
            raise InputError(
                f"{self.paths[0]}: shard {k}/{n} holds no image ({len(self.names)} images)"
            )
        self.names = names

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.names)

    def _group(self, name: str) -> h5py.Group:
        index, key = self._where[name]
        return self._files[index]["images"][key]

    def _attr(self, name: str, key: str, kind: type) -> Any:
        """One attribute of an image, checked to be of ``kind`` (int, float or bool)."""
        path = self.paths[self._where[name][0]]
        try:
            value = self._group(name).attrs[key]
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{path}: image {name!r}: no {key!r} attribute") from exc
        ok = {
            int: (int, np.integer),
            float: (int, float, np.integer, np.floating),
            bool: (bool, np.bool_),
        }[kind]
        if not isinstance(value, ok) or (kind is float and not np.isfinite(value)):
            raise InputError(f"{path}: image {name!r}: attribute {key!r} is {value!r}")
        return kind(value)

    def has_labels(self) -> bool:
        """Whether every image carries a label map."""
        return all(self._attr(n, "has_label", bool) for n in self.names)

    def size(self, name: str) -> tuple[int, int]:
        """Original ``(H, W)`` of an image."""
        size = self._attr(name, "height", int), self._attr(name, "width", int)
        _check_size(size, self.num_classes, f"{self.paths[self._where[name][0]]}: image {name!r}")
        return size

    def _range(self, name: str) -> tuple[float, float]:
        low, high = self._attr(name, "logit_min", float), self._attr(name, "logit_max", float)
        if low > high or max(-low, high) > LOGIT_LIMIT:
            path = self.paths[self._where[name][0]]
            raise InputError(
                f"{path}: image {name!r}: recorded logit range [{low:g}, {high:g}] is out of "
                f"range (±{LOGIT_LIMIT:g})"
            )
        return low, high

    def logit_range(self) -> tuple[float, float]:
        """Smallest and largest logit over all images (from attributes; no data read)."""
        ranges = self.logit_ranges()
        return min(r[0] for r in ranges.values()), max(r[1] for r in ranges.values())

    def logit_ranges(self) -> dict[str, tuple[float, float]]:
        """Each image's smallest and largest logit (from attributes; no data read)."""
        return {name: self._range(name) for name in self.names}

    def path_of(self, name: str) -> Path:
        """The store file holding image ``name``."""
        return self.paths[self._where[name][0]]

    def read(self, name: str, *, with_label: bool = True) -> Record:
        """Read one image's logits (as float32) and label, checking them."""
        path = self.paths[self._where[name][0]]
        where = f"image {name!r}"
        size = self.size(name)
        low, high = self._range(name)
        group = self._group(name)
        try:
            dset = check_dataset(group, "logits", path, f"{where} logits")
            shape = dset.shape
            if (
                dset.dtype not in (np.float16, np.float32)
                or len(shape) != 3
                or shape[0] != self.num_classes
                or min(shape) < 1
                or shape[1] > MAX_SIDE
                or shape[2] > MAX_SIDE
                or int(np.prod(shape)) > MAX_VALUES
            ):
                raise InputError(
                    f"{path}: {where}: logits are {dset.dtype} {shape}, expected float16/32 "
                    f"({self.num_classes}, h, w)"
                )
            share = getattr(self._reading, "share", None)  # set in iter_images' reader
            decoded = read_chunked(dset, self._decoders(), share)
            if decoded is None:  # not stored as our writer stores logits: h5py reads it
                logits = dset[()].astype(np.float32)
                got = float(np.min(logits)), float(np.max(logits))
            else:
                logits, got = decoded.values, (decoded.low, decoded.high)
            label = None
            if with_label and "label" in group:
                lset = check_dataset(group, "label", path, f"{where} label")
                if lset.dtype != np.uint8 or lset.shape != size:
                    raise InputError(
                        f"{path}: {where}: label is {lset.dtype} {lset.shape}, expected uint8 "
                        f"{size}"
                    )
                label = lset[()]
                check_label_values(label, self.num_classes, f"{path}: {where}")
            elif with_label and self._attr(name, "has_label", bool):
                raise InputError(f"{path}: {where}: its label is missing")
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt chunks, bad filters, ...
            raise InputError(f"{path}: {where}: cannot read ({_first_line(exc)})") from exc
        got_low, got_high = check_logit_range(*got, f"{path}: {where}")
        slack = 1e-3 * max(1.0, abs(low), abs(high))
        if got_low < low - slack or got_high > high + slack:
            raise InputError(
                f"{path}: {where}: logits span [{got_low:g}, {got_high:g}], outside the recorded "
                f"[{low:g}, {high:g}]"
            )
        return Record(name, logits, label, size)

    def __iter__(self) -> Iterator[Record]:
        for name in self.names:
            yield self.read(name)

    def iter_images(
        self,
        names: Sequence[str] | None = None,
        *,
        device: torch.device | str = "cpu",
        with_label: bool = False,
        progress: Progress | None = None,
        resize: bool = True,
    ) -> Iterator[tuple[Record, torch.Tensor]]:
        """The one store loop: read, move to ``device`` and resize each image's logits.

        Args:
            names: Images to visit, in this order (default: all, sorted).
            device: Where the logits go.
            with_label: Also read the label maps (``record.label``).
            progress: Wraps the iteration over names (``progress(names, count)``).
            resize: Resize to the image's size (False: as stored, for callers that resize
                only parts of the image).

        Yields:
            ``(record, z)`` with ``z`` the ``(C, H, W)`` float32 logits at the image's size
            (with ``resize=False``: the stored ``(C, h, w)``, as float32).
        """
        todo = list(self.names if names is None else names)
        iterable: Iterable[str] = todo if progress is None else progress(todo, len(todo))
        # The next image is read (decompressed) in a thread while the caller works on this one;
        # its chunks go to the decoder threads only while the caller waits for it (when the
        # caller computes, its torch threads have the cores).
        waiting = threading.Event()

        def read_all() -> Iterator[Record]:  # runs in the prefetch thread
            self._reading.share = waiting.is_set
            try:
                for name in todo:
                    yield self.read(name, with_label=with_label)
            finally:
                self._reading.share = None

        records = prefetch(read_all(), 1, waiting)
        try:
            for _, record in zip(iterable, records, strict=True):
                z = torch.from_numpy(record.logits).to(device)
                yield record, resize_logits(z, record.size) if resize else z.float()
        finally:
            records.close()

    def _decoders(self) -> ThreadPoolExecutor | None:
        """Threads that decompress chunks: as many as torch uses (``--threads``); None for one."""
        threads = torch.get_num_threads()
        with self._pool_lock:
            if self._pool is not None and self._pool_size != threads:
                self._pool.shutdown(wait=False)
                self._pool = None
            if self._pool is None and threads > 1:
                self._pool = ThreadPoolExecutor(threads, thread_name_prefix="blda-decode")
                self._pool_size = threads
            return self._pool

    def close(self) -> None:
        """Close every file."""
        with self._pool_lock:
            if self._pool is not None:  # its threads finish the chunk they decode, no more
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> LogitStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
