"""Build a logits store from ``.npy`` logits (and trainId PNG labels) that users already have."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from blda_posthoc.core.classes import IGNORE_INDEX, default_names
from blda_posthoc.core.correct import same_aspect
from blda_posthoc.errors import InputError
from blda_posthoc.io.images import find_files, read_label, suffix_hint
from blda_posthoc.io.names import MAX_CLASSES, MIN_CLASSES
from blda_posthoc.io.store import (
    MAX_SIDE,
    MAX_VALUES,
    StoreWriter,
    check_logit_values,
)

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
    resume: bool = False,
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
        overwrite: Replace an existing store (once the new one is complete).
        resume: Continue an interrupted import (same folders and options), keeping the images
            already stored.
        progress: Wraps the iteration over names (e.g. a progress bar).

    Returns:
        The number of images written now.
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
    settings = {
        "logits_dir": str(Path(logits_dir).resolve()),
        "labels_dir": None if labels_dir is None else str(Path(labels_dir).resolve()),
        "label_suffix": label_suffix,
    }
    with StoreWriter(
        out, names, dtype=dtype, overwrite=overwrite, resume=resume, settings=settings
    ) as writer:
        todo = [name for name in arrays if not writer.has(name)]
        iterable: Iterable[str] = todo
        if progress is not None:
            iterable = progress(todo, len(todo))
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
                _check_label_size(labels[name], label.shape, logits.shape[1:], arrays[name])
            value_range = check_logit_values(logits, str(arrays[name]), dtype)
            writer.write(name, logits, label, value_range=value_range)
    return len(todo)


def _load(path: Path) -> np.ndarray:
    """Read one ``(C, h, w)`` float ``.npy``, checking its header before reading the data."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises many types for bad files
        raise InputError(f"{path}: cannot read .npy ({_first_line(exc)})") from exc
    if not isinstance(array, np.ndarray):
        raise InputError(f"{path}: not a .npy array (an .npz archive?)")
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
        raise InputError(
            f"{path}: expected float logits of shape (C, h, w), got {array.dtype} {array.shape}"
        )
    c, h, w = array.shape
    if not (MIN_CLASSES <= c <= MAX_CLASSES and 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise InputError(
            f"{path}: shape {array.shape} is out of range ({MIN_CLASSES} to {MAX_CLASSES} "
            f"classes, sides 1 to {MAX_SIDE})"
        )
    if c * h * w > MAX_VALUES:
        raise InputError(f"{path}: {c * h * w} logits in one image; at most {MAX_VALUES}")
    try:
        return np.array(array)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: cannot read .npy ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_label(path: Path, label: np.ndarray, num_classes: int) -> None:
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        raise InputError(
            f"{path}: label value {int(label[bad].max())} is not a class id (0..{num_classes - 1})"
            " or 255"
        )


def _check_label_size(
    path: Path, label: tuple[int, ...], logits: tuple[int, ...], array: Path
) -> None:
    """Refuse a label the logits cannot be resized onto without distorting the image.

    The label's size becomes the image's size and the logits are resized bilinearly onto it,
    so they must be the label's image scaled down (or not at all) by one factor: no side
    larger than the label's, and the same aspect ratio up to one logit pixel of rounding per
    side (:func:`blda_posthoc.core.correct.same_aspect`). A transposed, stretched or smaller
    label belongs to another image, or the logits are laid out ``(C, w, h)``.
    """
    (big_h, big_w), (h, w) = label[:2], logits
    if h > big_h or w > big_w or not same_aspect((h, w), (big_h, big_w)):
        raise InputError(
            f"{path}: label is {big_h}x{big_w} but the logits in {array} are {h}x{w}; logits "
            "must be their label's image scaled by one factor (no side larger, the same aspect "
            "ratio up to rounding): another image's label, or logits laid out (C, w, h)?"
        )
