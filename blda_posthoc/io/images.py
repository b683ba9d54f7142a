"""Finding, reading and writing images and trainId label maps."""

from __future__ import annotations

import bisect
import contextlib
import io
import os
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from blda_posthoc.core import defaults
from blda_posthoc.errors import InputError
from blda_posthoc.outputs import atomic_file, check_name, write_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def find_files(root: Path, extensions: Iterable[str], suffix: str = "") -> dict[str, Path]:
    """Map names to files under ``root``, recursively, in sorted order.

    A name is the path relative to ``root`` with ``/`` separators, without the extension and
    without ``suffix`` (e.g. ``_leftImg8bit``). Files whose stem does not end in ``suffix`` are
    skipped.

    Args:
        root: Folder to search.
        extensions: Lower-case extensions with the dot, e.g. ``(".png",)``.
        suffix: Ending of the stem to strip.

    Returns:
        ``{name: path}`` sorted by name.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    exts = tuple(e.lower() for e in extensions)
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            stem, ext = os.path.splitext(filename)
            if ext.lower() not in exts or not stem.endswith(suffix):
                continue
            if suffix:
                stem = stem[: -len(suffix)]
            rel = os.path.relpath(os.path.join(dirpath, stem), root).replace(os.sep, "/")
            check_name(rel, os.path.join(dirpath, filename))
            if rel in found:
                raise InputError(f"{os.path.join(dirpath, filename)}: name {rel!r} is not unique")
            found[rel] = Path(dirpath) / filename
    return dict(sorted(found.items()))


def suggest_suffix(missing_names: Sequence[str], available_stems: Iterable[str]) -> str | None:
    """Guess the ``--label-suffix`` (or ``--image-suffix``) a user forgot.

    A stem ``NAME + SUFFIX`` in the folder that extends a missing ``NAME`` votes for
    ``SUFFIX``; the suffix with most votes wins (ties: the shorter, then alphabetical).

    Args:
        missing_names: Names that found no file (relative paths without extension).
        available_stems: What the folder holds: relative paths without extension and without
            any suffix stripped (``find_files(folder, exts)``).

    Returns:
        The suffix, or None when no stem extends a missing name.

    Example:
        >>> suggest_suffix(["a/x_000"], ["a/x_000_gtFine_labelTrainIds", "a/y_001_gtFine_color"])
        '_gtFine_labelTrainIds'
    """
    stems = sorted(set(available_stems))
    votes: Counter[str] = Counter()
    for name in list(missing_names)[:1000]:  # enough to vote; bounded on huge folders
        for stem in stems[bisect.bisect_left(stems, name) :]:
            if not stem.startswith(name):
                break
            if len(stem) > len(name):
                votes[stem[len(name) :]] += 1
    if not votes:
        return None
    return min(votes, key=lambda suffix: (-votes[suffix], len(suffix), suffix))


def suffix_hint(
    missing_names: Sequence[str], available: dict[str, Path], option: str = "--label-suffix"
) -> str:
    """A hint to append to a "no label for ..." message, or ``""`` when none fits.

    Args:
        missing_names: Names without a file.
        available: ``find_files(folder, exts)`` of the folder (no suffix stripped).
        option: The option to suggest.

    Returns:
        E.g. `` — the folder holds 'x_gtFine_labelTrainIds.png': try --label-suffix
        _gtFine_labelTrainIds``.
    """
    suffix = suggest_suffix(missing_names, available)
    if suffix is None:
        return ""
    example = next((available[n + suffix] for n in missing_names if n + suffix in available), None)
    holds = f" — the folder holds {example.name!r}" if example is not None else ""
    return f"{holds}: try {option} {suffix}"


MAX_PIXELS = 1 << 28
"""Largest image or label (pixels) read; larger files are refused before decoding."""

_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
    MemoryError,
    Image.DecompressionBombError,
)
"""What Pillow raises on damaged or hostile files (its decoders are not uniform)."""


@contextlib.contextmanager
def _open_image(path: Path, what: str) -> Iterator[Image.Image]:
    """Open an image, refusing more than :data:`MAX_PIXELS` pixels before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS or min(width, height) < 1:
                    raise InputError(
                        f"{path}: {what} of {width}x{height} pixels is out of range "
                        f"(1 to {MAX_PIXELS} pixels)"
                    )
                yield img
    except InputError:
        raise
    except (*_DECODE_ERRORS, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path}: cannot read {what} ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_label(path: Path) -> np.ndarray:
    """Read a single-channel trainId PNG as a ``(H, W)`` uint8 array."""
    with _open_image(path, "label image") as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise InputError(
                f"{path}: label must be a single-channel PNG of trainIds, got mode {img.mode}"
            )
        array = np.asarray(img)
    if array.ndim != 2:
        raise InputError(f"{path}: label must be a (H, W) map, got shape {array.shape}")
    if array.min(initial=0) < 0 or array.max(initial=0) > 255:
        raise InputError(f"{path}: label values outside 0..255")
    return array.astype(np.uint8)


def read_rgb(path: Path) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` uint8 RGB."""
    with _open_image(path, "image") as img:
        return np.asarray(img.convert("RGB"))


def write_png(path: Path, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write a ``(H, W)`` uint8 map (or ``(H, W, 3)`` RGB) as PNG, atomically.

    The PNG goes to an exclusively created temporary file beside ``path`` (never through a
    symbolic link) and is renamed to ``path`` when complete; a full disk is an error naming
    ``path``, which is then left as it was.

    Args:
        path: Destination; parent folders are created.
        array: ``(H, W)`` uint8 or ``(H, W, 3)`` uint8.
        palette: Optional ``(256, 3)`` palette to store an indexed (``P``) PNG; the pixel values
            stay the trainIds.
    """
    img = Image.fromarray(np.ascontiguousarray(array))
    if palette is not None:
        img = img.convert("L") if img.mode != "L" else img
        img = img.copy()
        img.putpalette(palette.astype(np.uint8).flatten().tolist())
    with atomic_file(path) as handle:
        img.save(handle, format="PNG")


# Defined where `blda CMD -h` reads it (no numpy there); re-exported here.
WEIGHT_FORMATS = defaults.WEIGHT_FORMATS


def write_weight_map(path: Path, weights: np.ndarray, fmt: str) -> None:
    """Write a ``(H, W)`` map of per-pixel weights in ``[0, 1]``, atomically.

    Args:
        path: Destination (its extension is :data:`WEIGHT_FORMATS` ``[fmt]``).
        weights: ``(H, W)`` float weights in ``[0, 1]``.
        fmt: ``png``: 8-bit grey PNG of ``round(255 * weight)``; ``npy``: float16 ``.npy``.
    """
    if fmt == "png":
        write_png(path, np.rint(np.clip(weights, 0.0, 1.0) * 255.0).astype(np.uint8))
    elif fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(weights, dtype=np.float16), allow_pickle=False)
        write_bytes(path, buffer.getvalue())
    else:
        raise ValueError(f"weight format must be one of {sorted(WEIGHT_FORMATS)}, got {fmt!r}")
