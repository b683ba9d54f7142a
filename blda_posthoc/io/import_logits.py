"""Build a logits store from ``.npy`` logits (and trainId PNG labels) that users already have."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from blda_posthoc.core.classes import IGNORE_INDEX, default_names
from blda_posthoc.io.errors import InputError
from blda_posthoc.io.images import find_files, read_label, suffix_hint
from blda_posthoc.io.store import StoreWriter

Progress = Callable[[Iterable[str], int], Iterable[str]]


def import_npy_folder(
    logits_dir: Path,
    out: Path,
    *,
    labels_dir: Path | None = None,
    label_suffix: str = "",
    class_names: list[str] | None = None,
    dtype: str = "float16",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> int:
    """Import every ``NAME.npy`` ``(C, h, w)`` under ``logits_dir`` into a store at ``out``.

    Args:
        logits_dir: Folder searched recursively for ``.npy`` files.
        out: Store to write.
        labels_dir: Optional folder of ``NAME{label_suffix}.png`` trainId labels; every image
            needs one, and its size becomes the image's recorded size.
        label_suffix: Ending of label stems to strip when matching names.
        class_names: One per channel; default ``class_0 ...``.
        dtype: Storage dtype.
        overwrite: Replace an existing store.
        progress: Wraps the iteration over names (e.g. a progress bar).

    Returns:
        The number of images written.
    """
    arrays = find_files(logits_dir, (".npy",))
    if not arrays:
        raise InputError(f"{logits_dir}: no .npy files found")
    labels = find_files(labels_dir, (".png",), label_suffix) if labels_dir else {}
    if labels_dir is not None:
        missing = [n for n in arrays if n not in labels]
        if missing:
            hint = suffix_hint(missing, find_files(labels_dir, (".png",)))
            raise InputError(
                f"{labels_dir}: no label for {len(missing)} image(s), e.g. {missing[0]!r}{hint}"
            )
    first = _load(arrays[next(iter(arrays))])
    names = class_names or default_names(first.shape[0])
    if len(names) != first.shape[0]:
        raise InputError(
            f"{arrays[next(iter(arrays))]}: {first.shape[0]} channels but {len(names)} class names"
        )
    iterable: Iterable[str] = arrays
    if progress is not None:
        iterable = progress(arrays, len(arrays))
    with StoreWriter(out, names, dtype=dtype, overwrite=overwrite) as writer:
        for name in iterable:
            logits = _load(arrays[name])
            if logits.shape[0] != len(names):
                raise InputError(
                    f"{arrays[name]}: {logits.shape[0]} channels, expected {len(names)}"
                )
            label = None
            if name in labels:
                label = read_label(labels[name])
                _check_label(labels[name], label, len(names))
            writer.write(name, logits, label)
    return len(arrays)


def _load(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read .npy ({exc})") from exc
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
        raise InputError(
            f"{path}: expected float logits of shape (C, h, w), got {array.dtype} {array.shape}"
        )
    return array


def _check_label(path: Path, label: np.ndarray, num_classes: int) -> None:
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        raise InputError(
            f"{path}: label value {int(label[bad].max())} is not a class id (0..{num_classes - 1})"
            " or 255"
        )
