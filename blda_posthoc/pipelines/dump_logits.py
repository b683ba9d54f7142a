"""Running a model over an image folder into a logits store (what ``blda dump-logits`` does).

The pipeline overlaps its three stages: worker processes of a torch ``DataLoader`` decode the
images (and labels), the calling thread runs the model, and a writer thread compresses and writes
the logits through a bounded queue. Shape legend: ``N`` images, ``C`` classes, ``H, W`` image
size, ``h, w`` stored logits size.

Sharding: with ``shard=(K, N)`` the images, sorted by name, at indices ``i`` with
``i % N == K - 1`` are processed and written to ``OUT-K-of-N.EXT`` (see :func:`shard_path`);
:func:`torchrun_shard` reads the shard from ``torchrun``'s ``RANK``/``WORLD_SIZE``.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from blda_posthoc.core.classes import default_names
from blda_posthoc.core.infer import Model, Preprocess, predict_logits
from blda_posthoc.errors import InputError
from blda_posthoc.io.images import IMAGE_EXTENSIONS, find_files, read_label, read_rgb, suffix_hint
from blda_posthoc.io.store import LOGIT_LIMITS, StoreWriter, encode_logits, partial_path

Log = Callable[[str], None]


@dataclass(frozen=True)
class Item:
    """One image to process: its name, image file and optional label file."""

    name: str
    image: Path
    label: Path | None


@dataclass
class DumpOptions:
    """Everything about a dump run except the model.

    Attributes:
        out: Store path (before the shard suffix is added).
        preprocess: Normalisation, resizing and window options.
        class_names: Channel names; None to use ``num_classes`` or the model's channel count.
        num_classes: Expected channel count when ``class_names`` is None.
        device: Where the model runs (the images are moved there).
        batch_size: Images per forward pass (images of different sizes are never mixed).
        precision: ``fp32``, ``fp16`` or ``bf16`` autocast.
        dtype: Storage dtype, ``float16`` or ``float32``.
        workers: DataLoader worker processes for decoding (0: decode in this thread).
        resume: Skip images already complete in an existing (partial) store.
        overwrite: Replace an existing store.
        shard: ``(K, N)``, 1-based, or None for all images.
        queue_size: Images waiting for the writer thread at most; 0 writes in the calling
            thread instead (no overlap; for benchmarks).
        encoders: Threads compressing logits for the writer (0: half the CPU cores, 1 to 8).
        model_id: What identifies the model (see :func:`blda_posthoc.io.models.model_identity`);
            recorded with the other settings that ``resume`` requires to match.
    """

    out: Path
    preprocess: Preprocess = field(default_factory=Preprocess)
    class_names: list[str] | None = None
    num_classes: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 1
    precision: str = "fp32"
    dtype: str = "float16"
    workers: int = 0
    resume: bool = False
    overwrite: bool = False
    shard: tuple[int, int] | None = None
    queue_size: int = 4
    encoders: int = 0
    model_id: str | None = None


@dataclass
class DumpResult:
    """What a run did: the store written, images computed now and images already there."""

    path: Path
    class_names: list[str]
    written: int
    skipped: int


def collect_items(
    images: Path, labels: Path | None = None, image_suffix: str = "", label_suffix: str = ""
) -> list[Item]:
    """Pair every image under ``images`` with its label under ``labels``, sorted by name.

    Args:
        images: Image folder (PNG/JPEG, searched recursively).
        labels: Label folder (PNG trainIds), or None.
        image_suffix: Ending of image stems to strip from names (e.g. ``_leftImg8bit``).
        label_suffix: Ending of label stems (e.g. ``_gtFine_labelTrainIds``).

    Returns:
        One item per image; each has a label when ``labels`` is given.
    """
    found = find_files(images, IMAGE_EXTENSIONS, image_suffix)
    if not found:
        hint = f" ending in {image_suffix!r}" if image_suffix else ""
        raise InputError(f"{images}: no PNG/JPEG images{hint} found")
    if labels is None:
        return [Item(name, path, None) for name, path in found.items()]
    label_files = find_files(labels, (".png",), label_suffix)
    missing = [name for name in found if name not in label_files]
    if missing:
        more = f" (and {len(missing) - 1} more image(s))" if len(missing) > 1 else ""
        hint = suffix_hint(missing, find_files(labels, (".png",)))
        raise InputError(
            f"{found[missing[0]]}: no label {missing[0]}{label_suffix}.png under {labels}"
            f"{more}{hint}"
        )
    return [Item(name, path, label_files[name]) for name, path in found.items()]


def select_shard(items: Sequence[Item], shard: tuple[int, int] | None) -> list[Item]:
    """The items of shard ``(K, N)``: sorted by name, indices ``i`` with ``i % N == K - 1``."""
    ordered = sorted(items, key=lambda item: item.name)
    if shard is None:
        return ordered
    k, n = check_shard(shard)
    return ordered[k - 1 :: n]


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """Validate a 1-based shard ``(K, N)``."""
    k, n = shard
    if n < 1 or not 1 <= k <= n:
        raise InputError(f"--shard {k}/{n}: need 1 <= K <= N")
    return k, n


def shard_path(out: Path, shard: tuple[int, int] | None) -> Path:
    """Store path of a shard: ``tgt.h5`` with ``(1, 2)`` gives ``tgt-1-of-2.h5``."""
    if shard is None or shard[1] == 1:
        return out
    k, n = shard
    return out.with_name(f"{out.stem}-{k}-of-{n}{out.suffix}")


def torchrun_shard(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard ``(RANK + 1, WORLD_SIZE)`` under ``torchrun``; None when not distributed."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
    except ValueError as exc:
        raise InputError(f"RANK/WORLD_SIZE: not integers ({exc})") from exc
    if world <= 1:
        return None
    return check_shard((rank + 1, world))


def torchrun_device(
    spec: str, device: torch.device, env: Mapping[str, str] | None = None
) -> torch.device:
    """Under ``torchrun`` with ``--device auto`` and CUDA, use ``cuda:LOCAL_RANK``."""
    env = os.environ if env is None else env
    if spec == "auto" and device.type == "cuda" and "LOCAL_RANK" in env:
        device = torch.device("cuda", int(env["LOCAL_RANK"]))
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


class ImageDataset(Dataset[dict[str, Any]]):
    """Decode items into samples; errors travel as messages (workers cannot raise cleanly).

    A sample is ``{"name", "image": (H, W, 3) uint8 tensor, "label": (H, W) uint8 array or None,
    "error": message or None}``.
    """

    def __init__(self, items: Sequence[Item]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        sample: dict[str, Any] = {"name": item.name, "image": None, "label": None, "error": None}
        try:
            image = read_rgb(item.image)
            sample["image"] = torch.from_numpy(np.require(image, requirements=["C", "W"]))
            if item.label is not None:
                label = read_label(item.label)
                if label.shape != image.shape[:2]:
                    raise InputError(
                        f"{item.label}: label is {label.shape[0]}x{label.shape[1]} but the image "
                        f"is {image.shape[0]}x{image.shape[1]}"
                    )
                sample["label"] = label
        except InputError as exc:
            sample["error"] = str(exc)
        return sample


def collate_by_size(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stack runs of consecutive same-size samples into groups (order kept).

    Returns:
        Groups ``{"names": [...], "images": (n, H, W, 3) uint8, "labels": [...], "error"}``.
    """
    groups: list[dict[str, Any]] = []
    run: list[dict[str, Any]] = []

    def flush() -> None:
        if run:
            images = torch.stack([s["image"] for s in run])
            names = [s["name"] for s in run]
            groups.append(
                {
                    "names": names,
                    "images": images,
                    "labels": [s["label"] for s in run],
                    "error": None,
                }
            )
            run.clear()

    for sample in samples:
        if sample["error"] is not None:
            flush()
            groups.append({"names": [sample["name"]], "error": sample["error"]})
            break
        if run and run[0]["image"].shape != sample["image"].shape:
            flush()
        run.append(sample)
    flush()
    return groups


class BackgroundWriter:
    """Write records to a :class:`StoreWriter` from a thread, through a bounded queue.

    The logits are compressed by a pool of encoder threads (:func:`encode_logits`, which
    releases the GIL) as soon as they are queued; the writer thread copies the compressed
    chunks into the file in order. h5py serialises all its calls, so compressing inside it
    would use one core and hold the GIL.

    Args:
        store: The open store.
        maxsize: Records waiting at most; ``put`` blocks beyond that.
        encoders: Encoder threads.
    """

    def __init__(self, store: StoreWriter, maxsize: int = 4, encoders: int = 1) -> None:
        self.store = store
        self.pool = ThreadPoolExecutor(max_workers=max(1, encoders), thread_name_prefix="encode")
        self.queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=max(1, maxsize))
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, name="blda-store-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            record = self.queue.get()
            if record is None:
                return
            if self.error is not None:
                continue
            try:
                name, logits, label, size, value_range, encoding = record
                self.store.write(name, logits, label, size, value_range, encoding.result())
                self.written += 1
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc

    def put(
        self,
        name: str,
        logits: np.ndarray,
        label: np.ndarray | None,
        size: tuple[int, int],
        value_range: tuple[float, float],
    ) -> None:
        """Queue one record (the arguments of :meth:`StoreWriter.write`); raise its errors."""
        encoding = self.pool.submit(encode_logits, logits, self.store.dtype)
        while True:
            self._raise()
            try:
                self.queue.put((name, logits, label, size, value_range, encoding), timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Write what is queued, stop the threads and raise the writer's error, if any."""
        self.queue.put(None)
        self.thread.join()
        self.pool.shutdown()
        self._raise()


class _Inline:
    """The :class:`BackgroundWriter` interface, writing in the calling thread."""

    def __init__(self, store: StoreWriter) -> None:
        self.store = store
        self.written = 0

    def put(self, *record: Any) -> None:
        self.store.write(*record)
        self.written += 1

    def close(self) -> None:
        pass


def dump_logits(
    model: Model,
    items: Sequence[Item],
    options: DumpOptions,
    *,
    model_name: str = "model",
    progress: Callable[..., Any] | None = None,
    log: Log | None = None,
) -> DumpResult:
    """Run ``model`` over ``items`` and write their logits (and labels) to a store.

    Args:
        model: ``(N, 3, h, w)`` float32 input on ``options.device`` to the model's output.
        items: Images to process (see :func:`collect_items`); the shard is selected here.
        options: Output, preprocessing and run options.
        model_name: How the model is named in error messages.
        progress: Optional ``progress(iterable, total, desc)`` returning a tqdm-like bar (used
            with ``update``/``close``), e.g. :func:`blda_posthoc.cli.common.progress`.
        log: Optional ``log(message)`` for notes on stderr.

    Returns:
        What was written where.
    """
    say: Log = log or (lambda message: None)
    todo = select_shard(items, options.shard)
    out = shard_path(options.out, options.shard)
    if not todo:
        raise InputError(f"{out}: shard {options.shard} holds no image")
    attrs: dict[str, str | int | float] = {}
    if options.shard is not None and options.shard[1] > 1:
        attrs["shard"] = f"{options.shard[0]}/{options.shard[1]}"
    check_output(out, resume=options.resume, overwrite=options.overwrite)
    names = _class_names(model, todo[0], options, model_name, say)
    with StoreWriter(
        out,
        names,
        dtype=options.dtype,
        overwrite=options.overwrite,
        resume=options.resume,
        attrs=attrs,
        settings=run_settings(options, labels=todo[0].label is not None),
    ) as store:
        remaining = [item for item in todo if not store.has(item.name)]
        if len(remaining) < len(todo):
            say(f"resuming {out}: {len(todo) - len(remaining)} of {len(todo)} images already done")
        written = _run(model, remaining, store, names, options, model_name, progress)
    return DumpResult(out, names, written, len(todo) - len(remaining))


def run_settings(options: DumpOptions, *, labels: bool) -> dict[str, Any]:
    """What determines a dump's logits: ``--resume`` continues a store only when these match.

    The model (``model_id``), preprocessing, autocast precision and whether labels are stored;
    the storage dtype, shard and class names are checked from the store's own attributes.
    """
    return {
        "model": options.model_id,
        "preprocess": dataclasses.asdict(options.preprocess),
        "precision": options.precision,
        "labels": labels,
    }


def check_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse early (before the model loads or runs) to replace outputs unasked.

    Args:
        out: The store to write (a shard's own path, see :func:`shard_path`).
        resume: ``--resume``: an existing store is continued.
        overwrite: ``--overwrite``: an existing store is replaced.
    """
    if resume or overwrite:
        return
    if out.exists():
        raise InputError(f"{out}: already exists (use --overwrite to replace it)")
    partial = partial_path(out)
    if partial.exists():
        raise InputError(
            f"{partial}: an unfinished run is there (use --resume to continue it or "
            "--overwrite to start over)"
        )


def _class_names(
    model: Model, first: Item, options: DumpOptions, model_name: str, say: Log
) -> list[str]:
    """Class names from the options, or from the channel count of one forward pass."""
    if options.class_names is not None:
        if options.num_classes is not None and options.num_classes != len(options.class_names):
            raise InputError(
                f"--num-classes {options.num_classes} differs from the "
                f"{len(options.class_names)} names of --class-names"
            )
        return list(options.class_names)
    if options.num_classes is not None:
        return default_names(options.num_classes)
    sample = ImageDataset([first])[0]
    if sample["error"] is not None:
        raise InputError(sample["error"])
    logits = _forward(model, sample["image"][None], options, model_name, first.name)
    channels = int(logits.shape[1])
    say(
        f"no --class-names or --num-classes: the model outputs {channels} channels, "
        f"named class_0..class_{channels - 1} (name them later with "
        "`blda info --rename-classes NAMES STORE`)"
    )
    return default_names(channels)


def _model_error(exc: BaseException) -> str:
    """One line saying why a model failed.

    TorchScript errors (``torch.jit.Error``) start with an interpreter preamble and a traceback
    of the scripted code and end with the Python exception the model raised; that last line is
    the reason.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and "TorchScript" in lines[0]:
        return lines[-1].removeprefix("builtins.")
    return lines[0]


def _forward(
    model: Model, images: torch.Tensor, options: DumpOptions, model_name: str, first: str
) -> torch.Tensor:
    """Logits ``(n, C, h, w)`` of ``(n, H, W, 3)`` uint8 images; model failures become errors."""
    images = images.to(options.device, non_blocking=True)
    try:
        logits = predict_logits(model, images, options.preprocess, options.precision)
    except Exception as exc:  # noqa: BLE001 - a failing model (torch.jit.Error, assert) is bad input
        text = _model_error(exc)
        hint = " (try a smaller --batch-size)" if "out of memory" in text else ""
        raise InputError(f"{model_name}: failed on {first}: {text}{hint}") from exc
    if logits.shape[0] != images.shape[0] or min(logits.shape) < 1:
        raise InputError(
            f"{model_name}: returned logits of shape {tuple(logits.shape)} for "
            f"{images.shape[0]} image(s) ({first}); expected (N, C, h, w)"
        )
    return logits


def _run(
    model: Model,
    items: Sequence[Item],
    store: StoreWriter,
    names: list[str],
    options: DumpOptions,
    model_name: str,
    progress: Callable[..., Any] | None,
) -> int:
    """Decode, infer and write ``items``; return how many images were written."""
    if not items:
        return 0
    loader = DataLoader(
        ImageDataset(items),
        batch_size=max(1, options.batch_size),
        shuffle=False,
        num_workers=max(0, options.workers),
        collate_fn=collate_by_size,
        pin_memory=options.device.type == "cuda",
    )
    storage = torch.float16 if options.dtype == "float16" else torch.float32
    bar = progress(None, total=len(items), desc="dump-logits") if progress else None
    writer: BackgroundWriter | _Inline = _Inline(store)
    if options.queue_size:
        writer = BackgroundWriter(store, options.queue_size, _encoders(options.encoders))
    try:
        for groups in loader:
            for group in groups:
                if group["error"] is not None:
                    raise InputError(group["error"])
                logits = _forward(model, group["images"], options, model_name, group["names"][0])
                _check_channels(logits, names, model_name)
                ranges = value_ranges(logits, storage, group["names"])
                array = logits.to(storage).cpu().numpy()
                size = tuple(group["images"].shape[1:3])
                for index, name in enumerate(group["names"]):
                    writer.put(name, array[index], group["labels"][index], size, ranges[index])
                if bar is not None:
                    bar.update(len(group["names"]))
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return writer.written


def _encoders(requested: int) -> int:
    """Encoder threads: ``requested``, or half the CPU cores (1 to 8)."""
    return requested if requested > 0 else max(1, min(8, (os.cpu_count() or 2) // 2))


def _check_channels(logits: torch.Tensor, names: list[str], model_name: str) -> None:
    if logits.shape[1] != len(names):
        raise InputError(
            f"{model_name}: outputs {logits.shape[1]} channels but {len(names)} classes were "
            "given (--class-names / --num-classes)"
        )


def value_ranges(
    logits: torch.Tensor, storage: torch.dtype, names: Sequence[str]
) -> list[tuple[float, float]]:
    """Per-image ``(min, max)`` of the logits as stored, checking they are finite and fit.

    Args:
        logits: ``(N, C, h, w)`` float32 logits.
        storage: Storage dtype (``torch.float16`` or ``torch.float32``).
        names: The ``N`` image names, for error messages.

    Returns:
        One ``(min, max)`` per image, rounded to the storage dtype.
    """
    flat = logits.flatten(1)
    finite = torch.isfinite(flat).all(dim=1)
    if not bool(finite.all()):
        bad = names[int((~finite).nonzero()[0, 0])]
        raise InputError(f"{bad}: the model gives NaN or infinite logits")
    low, high = flat.amin(dim=1), flat.amax(dim=1)
    limit = LOGIT_LIMITS["float16" if storage == torch.float16 else "float32"]
    beyond = (high > limit) | (low < -limit)
    if bool(beyond.any()):
        bad = names[int(beyond.nonzero()[0, 0])]
        dtype = "float16" if storage == torch.float16 else "float32"
        hint = "use --dtype float32" if dtype == "float16" else "rescale them"
        raise InputError(
            f"{bad}: the model gives logits beyond ±{limit:g}, which a {dtype} store cannot "
            f"hold; {hint}"
        )
    low, high = low.to(storage).float().cpu(), high.to(storage).float().cpu()
    return list(zip(low.tolist(), high.tolist(), strict=True))
