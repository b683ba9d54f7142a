"""Apply the alignment to every image of a store and write trainId PNGs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blda_posthoc.core.classes import colorize, palette_for
from blda_posthoc.core.correct import correct_image
from blda_posthoc.io.corrections import Correction
from blda_posthoc.io.errors import InputError
from blda_posthoc.io.images import read_label, write_png
from blda_posthoc.io.outputs import paths_inside
from blda_posthoc.io.store import LogitStore, Progress, Record, StoreWriter

COLOR_SUFFIX = "_color"
"""Colour previews are written beside the trainId files as ``NAME_color.png``."""


def check_color_names(names: Iterable[str], where: Path | str) -> None:
    """Refuse images ``NAME`` and ``NAME_color`` together when previews are written.

    With ``--color`` both would write ``NAME_color.png`` (the preview of one, the prediction
    of the other).

    Args:
        names: The image names.
        where: The store (or folder) the names come from, for the message.

    Raises:
        InputError: Naming the first such pair.
    """
    names = set(names)
    for name in sorted(names):
        if f"{name}{COLOR_SUFFIX}" in names:
            raise InputError(
                f"{where}: images '{name}' and '{name}{COLOR_SUFFIX}' both need "
                f"{name}{COLOR_SUFFIX}.png with --color (the preview of one, the prediction of "
                "the other); leave out --color"
            )


def output_paths(out_dir: Path, names: Iterable[str], color: bool) -> dict[str, list[Path]]:
    """The files written per image: ``NAME.png`` and, with ``color``, ``NAME_color.png``.

    Every path is checked to lie inside ``out_dir`` (see
    :func:`blda_posthoc.io.outputs.paths_inside`), and no two images may write the same file.
    """
    names = list(names)
    if color:
        check_color_names(names, out_dir)
    suffixes = [".png", f"{COLOR_SUFFIX}.png"] if color else [".png"]
    files = paths_inside(out_dir, [f"{name}{suffix}" for name in names for suffix in suffixes])
    step = len(suffixes)
    return {name: files[i * step : (i + 1) * step] for i, name in enumerate(names)}


def check_outputs(paths: dict[str, list[Path]], overwrite: bool, resume: bool) -> list[str]:
    """Names still to write; refuse (before writing anything) to replace existing files.

    Args:
        paths: Output files per name.
        overwrite: Replace existing files.
        resume: Skip names whose files all exist.

    Returns:
        The names to process.
    """
    todo = []
    for name, files in paths.items():
        exists = [f.exists() for f in files]
        if all(exists) and resume:
            continue
        if any(exists) and not overwrite and not resume:
            first = files[exists.index(True)]
            raise InputError(f"{first}: already exists (use --overwrite, or --resume to skip)")
        todo.append(name)
    return todo


@dataclass
class CorrectedImage:
    """One image of a store after the correction.

    Attributes:
        record: The store's record (``label`` only when asked for).
        logits: ``(C, H, W)`` logits resized to the image size, on the compute device.
        pred: ``(H, W)`` int64 corrected prediction.
        scores: ``(C, H, W)`` corrected log-scores (not normalised).
    """

    record: Record
    logits: torch.Tensor
    pred: torch.Tensor
    scores: torch.Tensor


def corrected_images(
    store: LogitStore,
    names: Sequence[str],
    correction: Correction,
    *,
    with_label: bool = False,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> Iterator[CorrectedImage]:
    """Read, resize and correct the images ``names`` of a store, one at a time.

    Args:
        store: The logits.
        names: Images to visit, in this order.
        correction: The correction (its corrector on ``device``).
        with_label: Also read label maps.
        device: Where to compute.
        progress: Wraps the iteration over image names.

    Yields:
        One :class:`CorrectedImage` per name.
    """
    images = store.iter_images(names, device=device, with_label=with_label, progress=progress)
    for record, z in images:
        pred, scores = correct_image(z, record.size, correction.corrector, correction.tau)
        yield CorrectedImage(record, z, pred, scores)


def write_label_map(files: list[Path], label_map: np.ndarray, palette: np.ndarray | None) -> None:
    """Write ``files[0]`` (trainIds) and, with a palette, ``files[1]`` (colour preview).

    Args:
        files: Output paths from :func:`output_paths`.
        label_map: ``(H, W)`` uint8 trainIds (255 = ignore).
        palette: ``(256, 3)`` colours, or None for no preview.
    """
    write_png(files[0], label_map)
    if palette is not None:
        write_png(files[1], colorize(label_map, palette))


def correct_store(
    store: LogitStore,
    correction: Correction,
    out_dir: Path,
    *,
    color: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    scores_out: Path | None = None,
    shard: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Correct every image and write ``out_dir/NAME.png`` trainIds at the image's size.

    Args:
        store: The logits.
        correction: The correction.
        out_dir: Output folder (names keep their sub-folders); the command line passes the
            unfinished folder of a :class:`blda_posthoc.io.outputs.OutputFolder`.
        color: Also write ``NAME_color.png`` palette previews.
        overwrite: Replace existing PNGs (and ``scores_out``).
        resume: Keep images whose outputs exist; they are read back for the counts.
        scores_out: Also write the corrected log-scores ``(C, H, W)`` as a logits store here
            (its argmax is the prediction, its softmax the renormalised probabilities), with
            the input's label maps, so that it can be evaluated like the input.
        shard: ``(K, N)`` when ``store`` holds shard K's images (recorded in ``scores_out``'s
            root attribute ``shard``, as ``dump-logits`` does).
        device: Where to compute.
        progress: Wraps the iteration over image names.

    Returns:
        ``{"images": n, "written": n_now, "pixels_before": [C], "pixels_after": [C],
        "changed_pixels": n, "flow": [[C] * C]}`` with per-class predicted pixel counts over
        all ``n`` images (kept ones included) before and after the correction, and
        ``flow[a][b]`` the pixels that went from class ``a`` (plain argmax) to ``b`` (zero
        diagonal); ``written`` counts the images computed by this call.
    """
    paths = output_paths(out_dir, store.names, color)
    todo = check_outputs(paths, overwrite, resume)
    palette = palette_for(store.class_names)
    c = store.num_classes
    flow = np.zeros(c * c, dtype=np.int64)  # (before, after) pairs, flattened
    with contextlib.ExitStack() as stack:
        scores_store = None
        if scores_out is not None:
            content = f"corrected log-scores (method={correction.method}, tau={correction.tau:g})"
            attrs: dict[str, str | int | float] = {"content": content}
            if shard is not None and shard[1] > 1:
                attrs["shard"] = f"{shard[0]}/{shard[1]}"
            scores_store = stack.enter_context(
                StoreWriter(
                    scores_out,
                    store.class_names,
                    overwrite=overwrite,
                    attrs=attrs,
                    settings=correction.settings,
                )
            )
        with_label = scores_store is not None
        images = corrected_images(
            store, todo, correction, with_label=with_label, device=device, progress=progress
        )
        for image in images:
            label_map = image.pred.cpu().numpy().astype(np.uint8)
            flow += _pairs(image.logits.argmax(0).cpu().numpy(), label_map, c)
            write_label_map(paths[image.record.name], label_map, palette if color else None)
            if scores_store is not None:
                record = image.record
                scores = image.scores.cpu().numpy()
                scores_store.write(record.name, scores, label=record.label, size=record.size)
    done = set(todo)
    kept = [name for name in store.names if name not in done]
    for record, z in store.iter_images(kept, device=device):
        kept_map = _kept_prediction(paths[record.name][0], record.size, c)
        flow += _pairs(z.argmax(0).cpu().numpy(), kept_map, c)
    square = flow.reshape(c, c)
    changed = square - np.diag(np.diag(square))
    return {
        "images": len(store.names),
        "written": len(todo),
        "pixels_before": square.sum(1).tolist(),
        "pixels_after": square.sum(0).tolist(),
        "changed_pixels": int(changed.sum()),
        "flow": changed.tolist(),
    }


def _pairs(before: np.ndarray, after: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C * C,)`` counts of the (before, after) class pairs of two equal-shape label maps."""
    pairs = before.reshape(-1).astype(np.int64) * num_classes + after.reshape(-1)
    return np.bincount(pairs, minlength=num_classes * num_classes)


def _kept_prediction(path: Path, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """A prediction kept from an interrupted run, read back and checked (flattened)."""
    label = read_label(path)
    if label.shape != tuple(size) or int(label.max(initial=0)) >= num_classes:
        raise InputError(
            f"{path}: not a prediction of this run (size {label.shape}, classes up to "
            f"{int(label.max(initial=0))}); cannot resume (use --overwrite)"
        )
    return label.reshape(-1)
