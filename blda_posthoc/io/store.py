"""The logits store (format ``blda-logits``, version 1): one HDF5 file of per-image logits.

Layout::

    /                      attrs: format="blda-logits", version=1, class_names (JSON list),
                                  num_classes, dtype, created_by, [shard "K/N"]
    /images/<quoted name>  group, attrs: name, height, width (original image size),
                                  logit_min, logit_max, has_label, complete
        logits             (C, h, w) float16|float32, chunked, gzip + shuffle
        label              (H, W) uint8 trainIds, 255 = ignore (optional)

``<quoted name>`` is the image name with ``/`` and ``%`` percent-encoded. An image counts only
once its ``complete`` attribute is true; it is set after its data is written and flushed.

A store being written lives at ``STORE.partial`` and is renamed to ``STORE`` when the writer
closes without error, so a killed run leaves either the old file or a resumable partial one.
Several stores (shards) read together through :class:`LogitStore` behave as one dataset.
"""

from __future__ import annotations

import glob
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import h5py
import numpy as np
import torch

from blda_posthoc import __version__
from blda_posthoc.core.correct import resize_logits
from blda_posthoc.io.errors import InputError
from blda_posthoc.io.prefetch import prefetch

Progress = Callable[[Iterable[str], int], Iterable[str]]
"""Wraps an iteration over image names: ``progress(names, count)``."""

FORMAT = "blda-logits"
VERSION = 1
DTYPES = ("float16", "float32")


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
    for c in range(data.shape[0]):
        for y in range(0, data.shape[1], ch):
            for x in range(0, data.shape[2], cw):
                part = data[c, y : y + ch, x : x + cw]
                block = np.zeros((ch, cw), dtype=data.dtype)
                block[: part.shape[0], : part.shape[1]] = part
                shuffled = block.view(np.uint8).reshape(-1, itemsize).T.tobytes()
                deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
                encoded.append(((c, y, x), deflate.compress(shuffled) + deflate.flush()))
    return encoded


def partial_path(path: Path) -> Path:
    """Where a store is written before it is complete."""
    return path.with_name(path.name + ".partial")


def expand_store_paths(specs: Sequence[str | Path]) -> list[Path]:
    """Expand store arguments (paths or glob patterns) into a sorted, de-duplicated list."""
    paths: list[Path] = []
    for spec in specs:
        text = str(spec)
        if any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise InputError(f"{text}: no store matches this pattern")
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


class StoreWriter:
    """Write a logits store image by image; use as a context manager.

    Args:
        path: Final store path; data goes to ``path.partial`` until the writer closes.
        class_names: One name per logit channel.
        dtype: Storage dtype of the logits, ``float16`` or ``float32``.
        overwrite: Replace an existing store at ``path``.
        resume: Continue a partial (or complete) store, keeping its complete images.
        attrs: Extra root attributes (e.g. ``shard``).
    """

    def __init__(
        self,
        path: Path,
        class_names: Sequence[str],
        *,
        dtype: str = "float16",
        overwrite: bool = False,
        resume: bool = False,
        attrs: dict[str, str | int | float] | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise InputError(f"{path}: storage dtype must be one of {DTYPES}, got {dtype!r}")
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.class_names = list(class_names)
        self.dtype = dtype
        if self.path.exists() and not (overwrite or resume):
            raise InputError(f"{self.path}: already exists (use --overwrite to replace it)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        moved = resume and not self.tmp.exists() and self.path.exists()
        if moved:
            os.replace(self.path, self.tmp)
        if resume and self.tmp.exists():
            try:
                self.file = self._open_existing()
            except InputError:
                if moved:  # leave a complete store complete when it cannot be resumed
                    os.replace(self.tmp, self.path)
                raise
        else:
            self.file = h5py.File(self.tmp, "w", track_order=True)
            self._init_root(attrs or {})

    def _open_existing(self) -> h5py.File:
        try:
            f = h5py.File(self.tmp, "a")
        except OSError as exc:
            raise InputError(f"{self.tmp}: cannot reopen to resume ({exc}); delete it") from exc
        _check_root(self.tmp, f)
        names = json.loads(f.attrs["class_names"])
        if names != self.class_names:
            f.close()
            raise InputError(f"{self.tmp}: class names differ from this run's; cannot resume")
        return f

    def _init_root(self, attrs: dict[str, str | int | float]) -> None:
        root = self.file.attrs
        root["format"] = FORMAT
        root["version"] = VERSION
        root["class_names"] = json.dumps(self.class_names)
        root["num_classes"] = len(self.class_names)
        root["dtype"] = self.dtype
        root["created_by"] = f"blda-posthoc {__version__}"
        for key, value in attrs.items():
            root[key] = value
        self.file.require_group("images")

    def has(self, name: str) -> bool:
        """Whether ``name`` is already stored completely (for resume)."""
        group = self.file["images"].get(quote(name, safe=""))
        return group is not None and bool(group.attrs.get("complete", False))

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
            name: Image name.
            logits: ``(C, h, w)`` logits (any float dtype; stored as the store's dtype).
            label: ``(H, W)`` uint8 trainIds, or None.
            size: ``(H, W)`` original image size; default the label's size, else ``(h, w)``.
            value_range: ``(min, max)`` of ``logits``, from a caller that has computed it and
                checked that the logits are finite (saves two slow passes over float16 data).
            encoded: The logits' chunks as :func:`encode_logits` returns them (compressed
                beforehand, e.g. in parallel threads); written as they are.
        """
        if logits.ndim != 3 or logits.shape[0] != len(self.class_names):
            raise InputError(
                f"{name}: expected logits of shape ({len(self.class_names)}, h, w), "
                f"got {tuple(logits.shape)}"
            )
        if value_range is None:
            if not np.isfinite(logits).all():
                raise InputError(f"{name}: logits contain NaN or infinite values")
            value_range = (float(logits.min()), float(logits.max()))
        if size is None:
            shape = label.shape if label is not None else logits.shape[1:]
            size = (int(shape[0]), int(shape[1]))
        key = quote(name, safe="")
        images = self.file["images"]
        if key in images:
            del images[key]
        group = images.create_group(key)
        filters = {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}
        chunks = chunk_shape(logits.shape)
        if encoded is None:
            data = logits.astype(self.dtype, copy=False)
            group.create_dataset("logits", data=data, chunks=chunks, **filters)
        else:
            dset = group.create_dataset(
                "logits", shape=logits.shape, dtype=self.dtype, chunks=chunks, **filters
            )
            for offset, chunk in encoded:
                dset.id.write_direct_chunk(offset, chunk)
        if label is not None:
            label = np.asarray(label)
            if label.dtype != np.uint8 or label.ndim != 2:
                raise InputError(
                    f"{name}: label must be a (H, W) uint8 map, got {label.dtype} {label.shape}"
                )
            group.create_dataset(
                "label", data=label, chunks=True, compression="gzip", compression_opts=1
            )
        group.attrs["name"] = name
        group.attrs["height"] = int(size[0])
        group.attrs["width"] = int(size[1])
        group.attrs["logit_min"] = float(value_range[0])
        group.attrs["logit_max"] = float(value_range[1])
        group.attrs["has_label"] = label is not None
        self.file.flush()
        group.attrs["complete"] = True
        self.file.flush()

    def close(self, success: bool = True) -> None:
        """Close the file; on success move it to its final name."""
        self.file.close()
        if success:
            os.replace(self.tmp, self.path)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(success=exc_type is None)


def _check_root(path: Path, f: h5py.File) -> None:
    fmt = f.attrs.get("format")
    if fmt != FORMAT:
        f.close()
        raise InputError(f"{path}: not a logits store (format {fmt!r}, expected {FORMAT!r})")
    version = int(f.attrs.get("version", -1))
    if version != VERSION:
        f.close()
        raise InputError(
            f"{path}: logits store version {version} is not supported (need {VERSION})"
        )


class LogitStore:
    """Read one or more logits stores as one dataset, in sorted name order.

    Args:
        paths: Store files (shards); they must share class names and hold distinct names.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        if not paths:
            raise InputError("no logits store given")
        self.paths = [Path(p) for p in paths]
        self._files: list[h5py.File] = []
        self._where: dict[str, tuple[int, str]] = {}
        self.class_names: list[str] = []
        for index, path in enumerate(self.paths):
            self._open_one(index, path)
        self.names = sorted(self._where)

    def _open_one(self, index: int, path: Path) -> None:
        if not path.exists():
            hint = (
                " (an unfinished run left a .partial file: use --resume)"
                if partial_path(path).exists()
                else ""
            )
            raise InputError(f"{path}: no such logits store{hint}")
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise InputError(f"{path}: not a readable HDF5 file ({exc})") from exc
        _check_root(path, f)
        names = json.loads(f.attrs["class_names"])
        if index == 0:
            self.class_names = names
        elif names != self.class_names:
            f.close()
            raise InputError(f"{path}: class names differ from {self.paths[0]}")
        self._files.append(f)
        for key, group in f["images"].items():
            if not group.attrs.get("complete", False):
                continue
            name = str(group.attrs["name"])
            if name in self._where:
                other = self.paths[self._where[name][0]]
                raise InputError(f"{path}: image {name!r} is also in {other}")
            self._where[name] = (index, key)

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.names)

    def _group(self, name: str) -> h5py.Group:
        index, key = self._where[name]
        return self._files[index]["images"][key]

    def has_labels(self) -> bool:
        """Whether every image carries a label map."""
        return all(bool(self._group(n).attrs["has_label"]) for n in self.names)

    def size(self, name: str) -> tuple[int, int]:
        """Original ``(H, W)`` of an image."""
        attrs = self._group(name).attrs
        return int(attrs["height"]), int(attrs["width"])

    def logit_range(self) -> tuple[float, float]:
        """Smallest and largest logit over all images (from attributes; no data read)."""
        if not self.names:
            raise InputError(f"{self.paths[0]}: the store holds no complete image")
        lows = [float(self._group(n).attrs["logit_min"]) for n in self.names]
        highs = [float(self._group(n).attrs["logit_max"]) for n in self.names]
        return min(lows), max(highs)

    def read(self, name: str, *, with_label: bool = True) -> Record:
        """Read one image's logits (as float32) and label."""
        group = self._group(name)
        logits = group["logits"][()].astype(np.float32)
        label = group["label"][()] if with_label and "label" in group else None
        return Record(name, logits, label, self.size(name))

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
    ) -> Iterator[tuple[Record, torch.Tensor]]:
        """The one store loop: read, move to ``device`` and resize each image's logits.

        Args:
            names: Images to visit, in this order (default: all, sorted).
            device: Where the logits go.
            with_label: Also read the label maps (``record.label``).
            progress: Wraps the iteration over names (``progress(names, count)``).

        Yields:
            ``(record, z)`` with ``z`` the ``(C, H, W)`` float32 logits at the image's size.
        """
        todo = list(self.names if names is None else names)
        iterable: Iterable[str] = todo if progress is None else progress(todo, len(todo))
        # The next image is read (decompressed) in a thread while the caller works on this one.
        records = prefetch((self.read(name, with_label=with_label) for name in todo), depth=1)
        try:
            for _, record in zip(iterable, records, strict=True):
                z = torch.from_numpy(record.logits).to(device)
                yield record, resize_logits(z, record.size)
        finally:
            records.close()

    def close(self) -> None:
        """Close every file."""
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> LogitStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
