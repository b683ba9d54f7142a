"""Apply the alignment to every image of a store and write trainId PNGs."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blda_posthoc.core.classes import cityscapes_label_ids, colorize, is_cityscapes, palette_for
from blda_posthoc.core.correct import correct_image, plain_and_predicted
from blda_posthoc.core.fit import channel_argmax
from blda_posthoc.errors import InputError
from blda_posthoc.io.images import read_label, write_png
from blda_posthoc.io.jsonfiles import count_array, read_parts
from blda_posthoc.io.schema import MAX_COUNT_SUM
from blda_posthoc.io.store import MAX_CLASSES, LogitStore, Progress, Record, StoreWriter
from blda_posthoc.outputs import check_clashes, paths_inside
from blda_posthoc.pipelines.corrections import Correction

COLOR_SUFFIX = "_color"
"""Colour previews are written beside the trainId files as ``NAME_color.png``."""

IDS_SUFFIX = "_labelIds"
"""Cityscapes labelIds are written beside the trainId files as ``NAME_labelIds.png``."""

EXTRA_OUTPUTS: dict[str, str] = {"--color": COLOR_SUFFIX, "--cityscapes-ids": IDS_SUFFIX}
"""The option that writes an extra file beside every ``NAME.png``, and that file's suffix."""


def extra_options(color: bool, cityscapes_ids: bool) -> list[str]:
    """The options of :data:`EXTRA_OUTPUTS` that are given, in the order their files come."""
    return [o for o, on in (("--color", color), ("--cityscapes-ids", cityscapes_ids)) if on]


def check_extra_names(names: Iterable[str], where: Path | str, options: Iterable[str]) -> None:
    """Refuse images whose outputs clash, checked on every name before any work.

    Images ``x`` and ``x.png/y`` would need ``x.png`` as a file and as a folder.

    With ``--color`` images ``x`` and ``x_color`` would both write ``x_color.png`` (the preview
    of one, the prediction of the other); likewise ``x_labelIds`` with ``--cityscapes-ids``.

    Args:
        names: The image names.
        where: The store (or folder) the names come from, for the message.
        options: The options given, keys of :data:`EXTRA_OUTPUTS`.

    Raises:
        InputError: Naming the first such pair.
    """
    names = set(names)
    options = list(options)
    suffixes = [".png", *(f"{EXTRA_OUTPUTS[o]}.png" for o in options)]
    check_clashes((f"{name}{suffix}" for name in names for suffix in suffixes), where)
    for option in options:
        suffix = EXTRA_OUTPUTS[option]
        for name in sorted(names):
            if f"{name}{suffix}" in names:
                raise InputError(
                    f"{where}: images '{name}' and '{name}{suffix}' both need "
                    f"{name}{suffix}.png with {option} (the {option} file of one, the prediction "
                    f"of the other); leave out {option}"
                )


def check_cityscapes_ids(class_names: Sequence[str], where: Path | str) -> None:
    """Refuse ``--cityscapes-ids`` unless the classes are the 19 Cityscapes ones, in order."""
    if not is_cityscapes(list(class_names)):
        shown = ", ".join(list(class_names)[:4]) + (", ..." if len(class_names) > 4 else "")
        hint = ""
        if len(class_names) == 19:
            hint = " (if they are Cityscapes', name them: blda info --rename-classes cityscapes)"
        raise InputError(
            f"{where}: --cityscapes-ids needs the 19 Cityscapes classes in trainId order "
            f"(road, sidewalk, building, ...); this store has {len(class_names)}: {shown}" + hint
        )


def check_extras(store: LogitStore, color: bool, cityscapes_ids: bool) -> None:
    """Refuse the extra files a store's images cannot have (before any work)."""
    check_extra_names(store.names, store.paths[0], extra_options(color, cityscapes_ids))
    if cityscapes_ids:
        check_cityscapes_ids(store.class_names, store.paths[0])


def output_paths(
    out_dir: Path,
    names: Iterable[str],
    color: bool,
    cityscapes_ids: bool = False,
    *,
    suffix: str = "",
    weights: tuple[Path, str] | None = None,
) -> dict[str, list[Path]]:
    """The files written per image: ``NAME<suffix>.png``, then the extras that are asked for.

    The extras are ``NAME_color.png`` with ``color`` and ``NAME_labelIds.png`` with
    ``cityscapes_ids``, in this order, then with ``weights = (folder, extension)`` the
    per-pixel weights ``folder/NAME<suffix><extension>`` (``relabel --weights-out``), always
    last. ``suffix`` is ``relabel --out-suffix`` (e.g. ``_gtFine_labelTrainIds``).
    Every path is checked to lie inside its folder (see
    :func:`blda_posthoc.outputs.paths_inside`), and no two images may write the same file.
    """
    names = list(names)
    options = extra_options(color, cityscapes_ids)
    check_extra_names(names, out_dir, options)
    suffixes = [f"{suffix}.png", *(f"{EXTRA_OUTPUTS[o]}.png" for o in options)]
    files = paths_inside(out_dir, [f"{name}{suffix}" for name in names for suffix in suffixes])
    step = len(suffixes)
    out = {name: files[i * step : (i + 1) * step] for i, name in enumerate(names)}
    if weights is not None:
        folder, extension = weights
        for name, path in zip(
            names, paths_inside(folder, [f"{n}{suffix}{extension}" for n in names]), strict=True
        ):
            out[name].append(path)
    return out


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


def corrected_predictions(
    store: LogitStore,
    names: Sequence[str],
    correction: Correction,
    *,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> Iterator[tuple[Record, torch.Tensor, torch.Tensor]]:
    """As :func:`corrected_images`, the predictions alone (see :func:`plain_and_predicted`).

    The logits are resized a band of rows at a time: no ``(C, H, W)`` copy, no scores.

    Yields:
        ``(record, plain (H, W), pred (H, W))`` per name: the plain argmax and the corrected
        prediction (the same tensor for the identity).
    """
    images = store.iter_images(names, device=device, progress=progress, resize=False)
    for record, z in images:
        plain, pred = plain_and_predicted(z, record.size, correction.corrector, correction.tau)
        assert plain is not None
        yield record, plain, pred


class BackgroundWriter:
    """Runs file writes in one thread, in order, at most ``ahead`` of them waiting.

    The caller computes the next image while the last one is compressed (zlib releases the
    GIL). An error of a write is raised by the next :meth:`submit` or on leaving the ``with``
    block; on leaving, every submitted write has finished (none is left half-way).
    """

    def __init__(self, ahead: int = 1) -> None:
        self.ahead = ahead
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="blda-write")
        self.pending: collections.deque[Future[None]] = collections.deque()

    def submit(self, write: Callable[..., None], *args: Any) -> None:
        """Queue ``write(*args)``; wait while more than ``ahead`` writes are pending."""
        self.pending.append(self.pool.submit(write, *args))
        while len(self.pending) > self.ahead:
            self.pending.popleft().result()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        try:
            while self.pending:
                future = self.pending.popleft()
                if kind is None:
                    future.result()
                else:  # already failing: let the writes finish, keep the first error
                    future.exception()
        finally:
            self.pool.shutdown(wait=True)


def write_label_map(
    files: list[Path],
    label_map: np.ndarray,
    palette: np.ndarray | None,
    cityscapes_ids: bool = False,
) -> None:
    """Write ``files[0]`` (trainIds), then the extras of :func:`output_paths`, in its order.

    Args:
        files: Output paths from :func:`output_paths` (a trailing weights file is left to the
            caller).
        label_map: ``(H, W)`` uint8 trainIds (255 = ignore).
        palette: ``(256, 3)`` colours for ``NAME_color.png``, or None for no preview.
        cityscapes_ids: Also write ``NAME_labelIds.png`` (Cityscapes classes only).
    """
    write_png(files[0], label_map)
    extras = iter(files[1:])
    if palette is not None:
        write_png(next(extras), colorize(label_map, palette))
    if cityscapes_ids:
        write_png(next(extras), cityscapes_label_ids(label_map))


def correct_store(
    store: LogitStore,
    correction: Correction,
    out_dir: Path,
    *,
    color: bool = False,
    cityscapes_ids: bool = False,
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
            unfinished folder of a :class:`blda_posthoc.outputs.OutputFolder`.
        color: Also write ``NAME_color.png`` palette previews.
        cityscapes_ids: Also write ``NAME_labelIds.png`` Cityscapes labelIds (the store's
            classes must be the 19 Cityscapes ones).
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
    if cityscapes_ids:
        check_cityscapes_ids(store.class_names, store.paths[0])
    paths = output_paths(out_dir, store.names, color, cityscapes_ids)
    todo = check_outputs(paths, overwrite, resume)
    palette = palette_for(store.class_names) if color else None
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
        # PNGs are compressed in a thread while the next image is computed (the same bytes).
        writer = stack.enter_context(BackgroundWriter())
        # (record, plain argmax, prediction, scores or None)
        predictions: Iterator[tuple[Record, torch.Tensor, torch.Tensor, torch.Tensor | None]]
        if scores_store is None:
            predictions = (
                (record, plain, pred, None)
                for record, plain, pred in corrected_predictions(
                    store, todo, correction, device=device, progress=progress
                )
            )
        else:
            identity = correction.corrector.is_identity(correction.tau)
            predictions = (
                (
                    image.record,
                    image.pred if identity else channel_argmax(image.logits),
                    image.pred,
                    image.scores,
                )
                for image in corrected_images(
                    store, todo, correction, with_label=True, device=device, progress=progress
                )
            )
        for record, before, pred, scores in predictions:
            label_map = pred.cpu().numpy().astype(np.uint8)
            flow += _pairs(before.cpu().numpy(), label_map, c)
            writer.submit(write_label_map, paths[record.name], label_map, palette, cityscapes_ids)
            if scores_store is not None and scores is not None:
                scores_store.write(
                    record.name, scores.cpu().numpy(), label=record.label, size=record.size
                )
    done = set(todo)
    kept = [name for name in store.names if name not in done]
    for record, z in store.iter_images(kept, device=device):
        kept_map = _kept_prediction(paths[record.name][0], record.size, c)
        flow += _pairs(channel_argmax(z).cpu().numpy(), kept_map, c)
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


SUMMARY_FORMAT = "blda-correct"
"""``format`` of ``correct.json`` and of the shards' ``correct-K-of-N.json``."""

ADDED_UP = ("images", "changed_pixels", "pixels_before", "pixels_after", "flow")
"""Counts of a correct summary that shards add up (numbers, lists and lists of lists)."""


def merge_summaries(paths: list[Path]) -> dict[str, Any]:
    """The ``correct.json`` of one process from the ``correct-K-of-N.json`` of shards 1..N.

    Raises:
        InputError: A part is missing, given twice, damaged or of another run.
    """
    parts = read_parts(paths, SUMMARY_FORMAT)
    first_path, first = parts[0]
    merged = {k: v for k, v in first.value.items() if k not in (*ADDED_UP, "shard", "partial")}
    c = len(first["class_names"].strings(max_length=MAX_CLASSES, unique=True))
    shapes = {"images": (), "changed_pixels": (), "pixels_before": (c,)}
    shapes.update({"pixels_after": (c,), "flow": (c, c)})
    totals: dict[str, np.ndarray] = {}
    for path, data in parts:
        if any(
            data.value.get(k) != first.value.get(k) for k in ("class_names", "settings", "version")
        ):
            raise InputError(
                f"{path}: not of the same run as {first_path} (other classes or settings)"
            )
        for key in ADDED_UP:
            value = count_array(data[key], shapes[key], path, key)
            totals[key] = totals[key] + value if key in totals else value
    recorded = first["partial"].get("num_images")
    expected = None if recorded is None else recorded.integer(low=0, high=MAX_COUNT_SUM)
    if expected is not None and int(totals["images"]) != expected:
        raise InputError(
            f"{first_path}: the shards hold {int(totals['images'])} images, the stores {expected}"
        )
    return {**merged, **{key: value.tolist() for key, value in totals.items()}}
