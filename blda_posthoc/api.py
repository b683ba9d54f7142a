"""Python API: fit statistics, build a correction, apply it and evaluate, inside a program.

The same functions the ``blda`` commands run, for training loops and notebooks: arrays and
tensors in, statistics, predictions and metrics out, no files needed (:func:`read_stats` and
:func:`write_stats` read and write the stats files the commands use).

- :func:`fit_stats` is ``blda fit-stats`` over images held in memory or produced by a
  callable; it reads them twice (the histogram grid spans all logits, so their range comes
  first), or three times with ground-truth labels (calibration images first).
- :func:`load` is what ``--method``, ``--stats``, ``--anchors``, ``--tau`` and ``--clamp`` set
  up in ``blda correct`` and ``blda evaluate``.
- :func:`correct` applies a correction to ``(C, H, W)`` or ``(B, C, H, W)`` logits on their own
  device (CPU or GPU), image by image, as ``blda correct`` does.
- :func:`evaluate` is the metric of ``blda evaluate`` (mIoU, mAcc, Bias, ...).
- :class:`StatsAccumulator` gathers statistics batch by batch inside a training loop (one
  pass, on a logit grid fixed up front), mergeable across processes like the stats files.

Bad data raises :class:`InputError` (a :class:`ValueError`) with the message the command would
print.

Shape legend: ``B`` images in a batch, ``C`` classes, ``H, W`` image size.

Example:
    >>> import numpy as np
    >>> from blda_posthoc import api
    >>> rng = np.random.default_rng(0)
    >>> def case(bias):
    ...     labels = rng.integers(0, 3, size=(4, 16, 16))
    ...     logits = rng.normal(size=(4, 3, 16, 16)) + 3 * np.eye(3)[labels].transpose(0, 3, 1, 2)
    ...     logits += np.array(bias)[:, None, None]
    ...     return logits.astype(np.float32), labels
    >>> src_z, src_y = case([0.0, 0.0, 0.0])
    >>> tgt_z, tgt_y = case([0.0, 0.0, 2.0])
    >>> names = ["a", "b", "c", "d"]
    >>> source = api.fit_stats(
    ...     list(zip(names, src_z, src_y)), class_names=["x", "y", "z"], min_pixels=10
    ... )
    >>> target = api.fit_stats(
    ...     [(n, z, None) for n, z in zip(names, tgt_z)], class_names=["x", "y", "z"],
    ...     labels="pseudo", min_pixels=10,
    ... )
    >>> correction = api.load("blda", stats=target, anchors=source)
    >>> pred, scores = api.correct(tgt_z, correction)
    >>> pred.shape, scores.shape
    (torch.Size([4, 16, 16]), torch.Size([4, 3, 16, 16]))
    >>> before = api.evaluate(tgt_z.argmax(1), tgt_y, 3)["miou"]
    >>> after = api.evaluate(pred, tgt_y, 3)["miou"]
    >>> bool(after > before)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blda_posthoc.core.align import DEFAULT_CLAMP
from blda_posthoc.core.classes import IGNORE_INDEX
from blda_posthoc.core.correct import correct_image, resize_logits
from blda_posthoc.core.evaluate import ConfusionMatrix, Summary, summarize
from blda_posthoc.core.fit import (
    ESTIMATORS,
    Grid,
    LogitHistogram,
    LogitStats,
    PixelSample,
    StatsExtras,
    channel_argmax,
    make_stats,
)
from blda_posthoc.core.methods import METHODS, Affine, Aligned, Blended, Shift, removed_reason
from blda_posthoc.core.relabel import ConfidenceHistogram, LogOddsGrid, confidence_logodds
from blda_posthoc.errors import InputError
from blda_posthoc.io.names import MAX_CLASSES, MIN_CLASSES, check_class_names
from blda_posthoc.io.stats import read_stats, write_stats
from blda_posthoc.io.store import MAX_SIDE
from blda_posthoc.pipelines.corrections import (
    API_TERMS,
    CALIBRATION_FOR,
    Correction,
    CorrectionSpec,
    Statistics,
    load_correction,
)
from blda_posthoc.pipelines.fit_stats import (
    CONFIDENCE_BINS,
    DEFAULT_BINS,
    DEFAULT_SAMPLE_PIXELS,
    LABEL_SOURCES,
    FitOptions,
    check_memory,
    check_ranges,
    fit_images,
    vector_calibration,
)

__all__ = [
    "Correction",
    "InputError",
    "LogitStats",
    "StatsAccumulator",
    "Summary",
    "correct",
    "evaluate",
    "fit_stats",
    "load",
    "read_stats",
    "write_stats",
]

ArrayLike = np.ndarray | torch.Tensor
Image = tuple[str, ArrayLike, ArrayLike | None]
"""``(name, logits (C, h, w), label (H, W) or None)``."""
Images = Iterable[Image] | Callable[[], Iterable[Image]]

SOURCE = "<memory>"
"""What the statistics' settings record as their source, and messages name."""
STATS_NAME = Path("<stats>")
ANCHORS_NAME = Path("<anchors>")
CALIBRATION_NAME = "<calibration>"


def fit_stats(
    images: Images,
    *,
    class_names: Sequence[str],
    labels: str = "gt",
    estimator: str = "hist",
    components: int = 5,
    bins: int = DEFAULT_BINS,
    min_pixels: int = 100,
    calibrate: bool = True,
    calibration: LogitStats | None = None,
    sample_pixels: int = DEFAULT_SAMPLE_PIXELS,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LogitStats:
    """Fit statistics over images, as ``blda fit-stats`` does over a store.

    The images are read more than once (the histogram grid must cover every logit before the
    first count, and with ``labels="gt"`` and ``calibrate`` the calibration images are read
    first), so ``images`` must be re-iterable: a list, or a callable returning a fresh
    iterable each time (e.g. a function that runs the model over a data loader). A one-shot
    iterator (a generator) is refused. Only one image is on ``device`` at a time.

    Args:
        images: ``(name, logits, label)`` triples: a unique name, ``(C, h, w)`` logits (numpy
            or torch, any device) and the ``(H, W)`` integer label map (255 = ignore) or None.
            Logits of another size than their label are resized bilinearly to the label's size,
            as the commands do (the label's size is the image's size).
        class_names: The ``C`` class names.
        labels: ``gt`` (the label maps; every image needs one) or ``pseudo`` (the argmax of
            the logits; a label map then only sets the image's size).
        estimator: ``hist`` or ``gmm``.
        components: Mixture components for ``gmm`` (1 to 64).
        bins: Histogram bins over the logit range (16 to 65536).
        min_pixels: Cells with fewer pixels get no shift (recorded for :func:`load`; >= 1).
        calibrate: With ``gt``: fit the temperature, vector-scaling and bias calibrations and
            the statistics of the logits calibrated with the vector scaling (``blda fit-stats
            --label-source gt``); such statistics serve as ``anchors`` of every method.
        calibration: Labelled statistics with calibrations (usually the source's, fitted with
            ``labels="gt"``): also fit the statistics of these images' logits calibrated with
            its vector scaling, as ``blda fit-stats --calibration`` does, so that
            ``load("calibrated-blda", stats=<these>, anchors=calibration)`` works.
        sample_pixels: Size of the seeded pixel sample (at most 10 million).
        seed: Seed of the sample.
        device: Where to compute.

    Returns:
        The statistics; the same counts as ``blda fit-stats`` over a store of the same images
        (imported with ``--dtype float32``).

    Raises:
        TypeError: ``images`` is a one-shot iterator.
        InputError: Bad images (shapes, names, labels, non-finite logits) or settings.
    """
    if labels not in LABEL_SOURCES:
        raise InputError(f"labels must be one of {LABEL_SOURCES}, got {labels!r}")
    if estimator not in ESTIMATORS:
        raise InputError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    # The ranges of the fit-stats options.
    _check_range("components", components, 1, 64)
    _check_range("bins", bins, 16, 1 << 16)
    _check_range("min_pixels", min_pixels, 1, None)
    _check_range("sample_pixels", sample_pixels, 0, 10_000_000)
    source = _reader(images)
    if isinstance(class_names, str):
        raise InputError(f"class_names must be a sequence of names, got the string {class_names!r}")
    names_ = check_class_names(list(class_names), "class_names")
    c = len(names_)
    check_memory(c, bins)
    known = (
        None
        if calibration is None
        else vector_calibration(calibration, CALIBRATION_NAME, names_, API_TERMS.fit_gt)
    )
    options = FitOptions(
        labels=labels,
        estimator=estimator,
        components=components,
        min_pixels=min_pixels,
        bins=bins,
        sample_pixels=sample_pixels,
        seed=seed,
        calibrate=calibrate,
        calibration=known,
        calibration_source=None if calibration is None else CALIBRATION_NAME,
    )
    ranges = _scan(source, c, labels == "gt")
    check_ranges(ranges, bins, lambda _: SOURCE)
    logit_range = (min(r[0] for r in ranges.values()), max(r[1] for r in ranges.values()))

    def read(wanted: Sequence[str] | None) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        keep = None if wanted is None else set(wanted)
        seen = set()
        for name, z, y in _images(source, c):
            if keep is not None and name not in keep:
                continue
            seen.add(name)
            z = _tensor(z).to(device, torch.float32)
            if y is not None:  # the label's size is the image's size
                z = resize_logits(z, (int(y.shape[0]), int(y.shape[1])))
            if labels == "gt":
                assert y is not None
                yield name, z, _tensor(y).to(device, torch.int64)
            else:
                yield name, z, channel_argmax(z)
        if seen != (set(ranges) if keep is None else keep):
            raise InputError(f"{SOURCE}: the images changed between passes over them")

    return fit_images(
        read, sorted(ranges), names_, logit_range, options, device=device, sources=[SOURCE]
    )


def _is_number(value: object) -> bool:
    """A real number (Python or numpy), not a bool, a string or a container."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _check_range(name: str, value: object, low: int, high: int | None) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool | np.bool_):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= (value if high is None else high):
        bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise InputError(f"{name} must be {bound}, got {value}")


def _tensor(values: ArrayLike) -> torch.Tensor:
    """``values`` as a tensor, sharing memory unless it is a read-only numpy array."""
    if isinstance(values, np.ndarray) and not values.flags.writeable:
        values = np.array(values)
    return torch.as_tensor(values)


def _reader(images: Images) -> Callable[[], Iterable[Image]]:
    """A callable giving a fresh pass over ``images`` each time."""
    if callable(images):
        return images
    if iter(images) is images:
        raise TypeError(
            "images is a one-shot iterator; pass a list or a callable returning a fresh iterable"
        )
    return lambda: images


def _images(source: Callable[[], Iterable[Image]], num_classes: int) -> Iterator[Image]:
    """The triples of one pass, with their shapes checked."""
    for item in source():
        try:
            name, z, y = item
        except (TypeError, ValueError):
            raise InputError(
                f"{SOURCE}: each image must be a (name, logits, label) triple"
            ) from None
        if not isinstance(z, np.ndarray | torch.Tensor) or z.ndim != 3:
            raise InputError(f"{SOURCE}: image {name!r}: logits must be a (C, H, W) array")
        if z.shape[0] != num_classes:
            raise InputError(
                f"{SOURCE}: image {name!r}: logits have {z.shape[0]} channels, "
                f"class_names {num_classes} names"
            )
        if y is not None and (not isinstance(y, np.ndarray | torch.Tensor) or y.ndim != 2):
            raise InputError(f"{SOURCE}: image {name!r}: the label must be an (H, W) array")
        yield str(name), z, y


def _scan(
    source: Callable[[], Iterable[Image]], num_classes: int, need_labels: bool
) -> dict[str, tuple[float, float]]:
    """First pass: each image's logit range, with the names and labels checked."""
    ranges: dict[str, tuple[float, float]] = {}
    for name, z, y in _images(source, num_classes):
        if name in ranges:
            raise InputError(f"{SOURCE}: image name {name!r} occurs twice")
        t = _tensor(z)
        if t.numel() == 0:
            raise InputError(f"{SOURCE}: image {name!r}: logits are empty")
        low, high = float(t.min()), float(t.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            raise InputError(f"{SOURCE}: image {name!r}: logits hold NaN or infinite values")
        ranges[name] = (low, high)
        if not need_labels:
            continue
        if y is None:
            raise InputError(f"{SOURCE}: labels='gt' needs a label map, image {name!r} has none")
        label = _tensor(y)
        if label.is_floating_point():
            raise InputError(f"{SOURCE}: image {name!r}: the label must hold integer ids")
        bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= num_classes))
        if bool(bad.any()):
            raise InputError(
                f"{SOURCE}: image {name!r}: label value {int(label[bad][0])} is outside "
                f"0..{num_classes - 1} and is not the ignore value {IGNORE_INDEX}"
            )
    if not ranges:
        raise InputError(f"{SOURCE}: no images")
    return ranges


DEFAULT_LOGIT_RANGE = (-50.0, 50.0)
"""The logit range of a :class:`StatsAccumulator` unless given: wide enough for the logits of
segmentation networks trained with cross-entropy; logits outside it fall in the edge bins."""


class StatsAccumulator:
    """Statistics gathered batch by batch, e.g. from a teacher's logits inside a training loop.

    The torchmetrics contract: :meth:`update` with each batch, :meth:`compute` the statistics
    (:class:`LogitStats`, for :func:`load`) whenever they are wanted, :meth:`merge` the
    accumulators of other processes (the counts add up exactly, as stats files of shards do)
    and :meth:`reset` to start again. :func:`fit_stats` reads its images twice because its
    histogram grid spans the smallest to the largest logit; here the images pass only once, so
    the grid is fixed up front by ``logit_range``: a logit outside it is counted in the first
    or last bin (clipped), which moves the tails of the fitted distributions onto the range's
    ends. :attr:`clipped` counts such logits; keep it near zero by choosing a range that covers
    the network's logits (``compute`` records it as ``settings["clipped_logits"]``).

    With the same images and a ``logit_range`` equal to the grid :func:`fit_stats` would
    choose (``floor(min) - 1`` to ``ceil(max) + 1``) the histograms are those of
    :func:`fit_stats` exactly. The statistics have no pixel sample and no calibrations, so the
    methods that need them (``--tau auto``, ``calibrated-blda``, the calibrations) and those
    estimated on the pixel sample (``em-map``, ``ot-prior``, ``occurrence-adjust``,
    ``self-calibrate``) are refused by :func:`load` on them (an :class:`InputError`): use
    :func:`fit_stats` (or ``blda fit-stats``) for those.

    Args:
        class_names: The ``C`` class names.
        labels: ``pseudo`` (each pixel's argmax: teacher pseudo-labels) or ``gt`` (every
            :meth:`update` gives its label maps).
        logit_range: ``(lo, hi)`` of the histogram grid.
        bins: Histogram bins over the range (16 to 65536).
        min_pixels: Cells with fewer pixels get no shift (recorded for :func:`load`).
        device: Where the counts accumulate (the logits are moved there batch by batch).

    Example:
        >>> acc = StatsAccumulator(class_names=["a", "b"], logit_range=(-10, 10), min_pixels=1)
        >>> acc.update(torch.randn(4, 2, 8, 8))
        >>> int(acc.compute().label_pixels.sum())
        256
    """

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        labels: str = "pseudo",
        logit_range: tuple[float, float] = DEFAULT_LOGIT_RANGE,
        bins: int = DEFAULT_BINS,
        min_pixels: int = 100,
        device: torch.device | str = "cpu",
    ) -> None:
        if labels not in LABEL_SOURCES:
            raise InputError(f"labels must be one of {LABEL_SOURCES}, got {labels!r}")
        _check_range("bins", bins, 16, 1 << 16)
        _check_range("min_pixels", min_pixels, 1, None)
        lo, hi = (float(v) for v in logit_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise InputError(f"logit_range must be two finite numbers lo < hi, got {logit_range}")
        self.class_names = list(class_names)
        c = len(self.class_names)
        check_memory(c, bins)
        self.labels = labels
        self.min_pixels = min_pixels
        self.device = torch.device(device)
        self.histogram = LogitHistogram(c, Grid(lo, hi, bins), self.device)
        self.confidence = ConfidenceHistogram(
            c, LogOddsGrid.for_classes(c, CONFIDENCE_BINS), self.device
        )
        self.predicted = torch.zeros(c, dtype=torch.int64, device=self.device)
        self.num_images = 0
        self.clipped = 0

    @property
    def num_classes(self) -> int:
        """``C``."""
        return len(self.class_names)

    @torch.no_grad()
    def update(self, logits: ArrayLike, labels: ArrayLike | None = None) -> None:
        """Add one image's or a batch's pixels.

        Args:
            logits: ``(C, h, w)`` or ``(B, C, h, w)`` logits (numpy or torch, any device);
                resized bilinearly to the labels' size when that differs.
            labels: With ``labels="gt"``: the ``(H, W)`` or ``(B, H, W)`` label maps (255 =
                ignore); with ``pseudo``: None (the argmax of the logits is each pixel's class).

        Raises:
            InputError: Shapes, channel count, labels or non-finite logits are wrong.
        """
        z = torch.as_tensor(logits)
        if z.ndim not in (3, 4) or z.shape[-3] != self.num_classes:
            raise InputError(
                f"logits must be (C, H, W) or (B, C, H, W) with C = {self.num_classes}, got "
                f"{tuple(z.shape)}"
            )
        batch = z if z.ndim == 4 else z[None]
        if (labels is None) != (self.labels == "pseudo"):
            need = "no labels (pseudo)" if self.labels == "pseudo" else "label maps (gt)"
            raise InputError(f"this accumulator takes {need}: labels={self.labels!r}")
        maps = None
        if labels is not None:
            y = _tensor(labels)
            maps = y if y.ndim == 3 else y[None]
            if maps.ndim != 3 or maps.shape[0] != batch.shape[0] or y.ndim != z.ndim - 1:
                raise InputError(
                    f"labels {tuple(y.shape)} do not match logits {tuple(z.shape)}: give one "
                    "(H, W) map per image"
                )
            if maps.is_floating_point():
                raise InputError("labels must hold integer class ids")
        for k, image in enumerate(batch):
            self._add(image, None if maps is None else maps[k])

    def _add(self, z: torch.Tensor, y: torch.Tensor | None) -> None:
        z = z.to(self.device, torch.float32)
        if not bool(torch.isfinite(z).all()):
            raise InputError("logits hold NaN or infinite values")
        if y is not None:
            y = y.to(self.device, torch.int64)
            z = resize_logits(z, (int(y.shape[0]), int(y.shape[1])))
        c = self.num_classes
        pred, logodds = confidence_logodds(z)
        labels = channel_argmax(z) if y is None else y
        grid = self.histogram.grid
        self.clipped += int(((z < grid.lo) | (z > grid.hi)).sum())
        self.histogram.update(z, labels)
        self.predicted += torch.bincount(pred.reshape(-1), minlength=c)
        self.confidence.update(pred, logodds)
        self.num_images += 1

    def merge(self, other: StatsAccumulator) -> None:
        """Add the counts of another accumulator (same classes, labels and grid)."""
        if (other.class_names, other.labels, other.histogram.grid) != (
            self.class_names,
            self.labels,
            self.histogram.grid,
        ):
            raise InputError("cannot merge accumulators of other classes, labels or grids")
        self.histogram.merge(other.histogram)
        self.confidence.merge(other.confidence)
        self.predicted += other.predicted.to(self.device)
        self.num_images += other.num_images
        self.clipped += other.clipped

    def reset(self) -> None:
        """Forget every count (the settings stay)."""
        self.histogram = LogitHistogram(self.num_classes, self.histogram.grid, self.device)
        self.confidence.reset()
        self.predicted.zero_()
        self.num_images = 0
        self.clipped = 0

    def compute(self) -> LogitStats:
        """The statistics of every pixel added since the last :meth:`reset`.

        Raises:
            InputError: Nothing was added yet.
        """
        if self.num_images == 0:
            raise InputError("StatsAccumulator: no images yet; call update first")
        c = self.num_classes
        grid = self.histogram.grid
        settings: dict[str, Any] = {
            "labels": self.labels,
            "min_pixels": self.min_pixels,
            "bins": grid.bins,
            "num_images": self.num_images,
            "num_pixels": self.histogram.num_pixels,
            "sources": [ACCUMULATOR],
            "resolution": "image",
            "sample_pixels": 0,
            "seed": 0,
            "logit_range": [grid.lo, grid.hi],
            "clipped_logits": self.clipped,
        }
        stats = make_stats(self.histogram, self.class_names, settings=settings)
        cgrid = self.confidence.grid
        stats.extras = StatsExtras(
            predicted=self.predicted.cpu().numpy(),
            confidence=self.confidence.counts(),
            confidence_grid=(cgrid.lo, cgrid.hi, cgrid.bins),
            sample=PixelSample(np.zeros((0, c), np.float32), np.zeros(0, np.uint8)),
        )
        return stats


ACCUMULATOR = "<accumulator>"
"""What statistics from a :class:`StatsAccumulator` record as their source."""


def load(
    method: str | None = None,
    *,
    stats: LogitStats | None = None,
    anchors: LogitStats | None = None,
    tau: float | str | None = None,
    clamp: float = DEFAULT_CLAMP,
    min_pixels: int | None = None,
    device: torch.device | str = "cpu",
) -> Correction:
    """Build a correction, as ``blda correct --method METHOD --stats ... --anchors ...`` does.

    Args:
        method: A method of ``blda correct --method`` (``blda``, ``calibrated-blda``, ...,
            ``none``), or None for the label-free default of ``blda correct`` without
            ``--method`` (``settings["default"]`` says which method and strength, and why).
        stats: Statistics of the data being corrected (usually pseudo-labels); not needed for
            ``none``.
        anchors: Labelled statistics (usually source ground truth); default ``stats``.
        tau: Strength: None (the method's default), a number ``>= 0`` or ``"auto"``.
        clamp: CDF clamp of the alignment methods, in ``[0, 0.5)``.
        min_pixels: Smallest usable cell; default the ``stats`` setting.
        device: Where the correction starts (:func:`correct` moves it to the logits' device).

    Returns:
        The correction: ``method``, ``tau`` (the strength used), ``corrector``, ``settings``
        and ``notes`` (what ``blda correct`` would print, e.g. cells without a shift).

    Raises:
        InputError: Unknown or removed method, bad strength, or statistics that cannot give it.
    """
    auto = isinstance(tau, str) and tau.strip().lower() == "auto"
    value: float | None = None
    if tau is not None and not auto:
        if not _is_number(tau) or not math.isfinite(float(tau)) or float(tau) < 0:
            raise InputError(f"tau must be 'auto' or a finite number >= 0, got {tau!r}")
        value = float(tau)
    reason = None if method is None else removed_reason(method)
    if reason is not None:
        raise InputError(f"method {reason}")
    if method is not None and method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not _is_number(clamp) or not 0.0 <= float(clamp) < 0.5:
        raise InputError(f"clamp must lie in [0, 0.5), got {clamp!r}")
    if min_pixels is not None:
        _check_range("min_pixels", min_pixels, 1, None)
    for name, given in (("stats", stats), ("anchors", anchors)):
        if given is not None and not isinstance(given, LogitStats):
            hint = (
                f"; read the file first: {name}=api.read_stats({str(given)!r})"
                if isinstance(given, str | Path)
                else ""
            )
            raise InputError(
                f"{name} must be statistics (a LogitStats from fit_stats or read_stats), got "
                f"{type(given).__name__} {str(given)[:60]!r}{hint}"
            )
    spec = CorrectionSpec(method, value, auto, None, None, float(clamp), min_pixels)
    if method == "none":
        return load_correction(spec, [], device)
    if stats is None and method in CALIBRATION_FOR:
        stats, anchors = anchors, None  # a calibration reads the labelled statistics only
    if stats is None:
        needs = "anchors" if method in CALIBRATION_FOR else "stats"
        raise InputError(f"method {method or 'default'} needs {needs}")
    if anchors is not None and anchors.class_names != stats.class_names:
        raise InputError(
            f"{ANCHORS_NAME}: class names {anchors.class_names} differ from the stats' "
            f"{stats.class_names}"
        )
    statistics = Statistics(
        stats,
        stats if anchors is None else anchors,
        STATS_NAME,
        STATS_NAME if anchors is None else ANCHORS_NAME,
        terms=API_TERMS,
    )
    return load_correction(spec, stats.class_names, device, statistics)


@torch.no_grad()
def correct(
    logits: ArrayLike, correction: Correction, *, size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a correction to one image's or a batch's logits, on the logits' device.

    Each image goes through :func:`blda_posthoc.core.correct.correct_image`, as in
    ``blda correct``: a batch gives exactly the results of its images one by one. No gradient
    is recorded. The correction's tensors move to the logits' device on first use and stay
    there (``correction.corrector`` is replaced).

    Args:
        logits: ``(C, h, w)`` or ``(B, C, h, w)`` logits (numpy or torch, any float dtype).
        correction: From :func:`load`.
        size: Output ``(H, W)``; the logits are resized bilinearly to it first. Default the
            logits' size.

    Returns:
        ``pred`` ``(H, W)`` or ``(B, H, W)`` int64 class ids and ``scores`` ``(C, H, W)`` or
        ``(B, C, H, W)`` float32 log-scores (their softmax gives probabilities).

    Raises:
        InputError: The logits are not 3- or 4-dimensional, empty, not finite, or have another
            class count than the correction; ``size`` is not two positive whole numbers;
            ``correction`` is not from :func:`load`.
    """
    if not isinstance(correction, Correction):
        raise InputError(f"correction must come from load(), got {type(correction).__name__}")
    try:
        z = torch.as_tensor(logits)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"logits must be a numeric array or tensor ({exc})") from None
    if z.ndim not in (3, 4) or min(z.shape) < 1:
        raise InputError(f"logits must be (C, H, W) or (B, C, H, W), got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise InputError(f"logits must be floating point, got {z.dtype}")
    expected = _num_classes(correction.corrector)
    if expected is not None and z.shape[-3] != expected:
        raise InputError(
            f"logits have {z.shape[-3]} classes (shape {tuple(z.shape)}), the correction {expected}"
        )
    if not bool(torch.isfinite(z).all()):
        raise InputError("logits hold NaN or infinite values")
    out = _output_size(z, size)
    correction.corrector = correction.corrector.to(z.device)
    batch = z if z.ndim == 4 else z[None]
    results = [correct_image(image, out, correction.corrector, correction.tau) for image in batch]
    pred = torch.stack([p for p, _ in results])
    scores = torch.stack([s for _, s in results])
    return (pred, scores) if z.ndim == 4 else (pred[0], scores[0])


def _num_classes(corrector: object) -> int | None:
    """The class count a corrector was built for (None for ``none``, which takes any)."""
    if isinstance(corrector, Aligned):
        return int(corrector.maps.valid.shape[0])
    if isinstance(corrector, (Affine, Blended)):
        return int(corrector.scale.shape[0])
    if isinstance(corrector, Shift):
        return int(corrector.shift.shape[0])
    return None


def _output_size(z: torch.Tensor, size: object) -> tuple[int, int]:
    """``size`` (default the logits' own) checked: two whole numbers in 1 .. 65536."""
    if size is None:
        return int(z.shape[-2]), int(z.shape[-1])
    if (
        not isinstance(size, tuple | list)
        or len(size) != 2
        or not all(_is_number(v) and float(v) == int(v) and 1 <= v <= MAX_SIDE for v in size)
    ):
        raise InputError(f"size must be (H, W), two whole numbers in 1..{MAX_SIDE}, got {size!r}")
    return int(size[0]), int(size[1])


def evaluate(
    preds: ArrayLike | Sequence[ArrayLike],
    labels: ArrayLike | Sequence[ArrayLike],
    num_classes: int,
    *,
    ignore_pred_ignore: bool = False,
) -> Summary:
    """Score predictions against labels, as ``blda evaluate`` does.

    Args:
        preds: Predicted class ids: one array or tensor of any shape (e.g. ``(H, W)`` or
            ``(B, H, W)``), or a sequence of them (images of different sizes).
        labels: True class ids, the same shapes (255 = ignore).
        num_classes: ``C``.
        ignore_pred_ignore: Skip pixels predicted as 255 instead of counting them wrong.

    Returns:
        The summary: ``miou``, ``macc``, ``pixel_acc``, ``iou_std`` and per-class ``iou``,
        ``acc``, ``bias``, ``pred_true_ratio``, ... in percent, None where undefined (see
        :class:`blda_posthoc.core.evaluate.Summary`).

    Raises:
        InputError: ``num_classes`` is not 2 to 255, shapes differ, or a label outside
            ``0 .. C-1`` is not 255.
    """
    _check_range("num_classes", num_classes, MIN_CLASSES, MAX_CLASSES)
    pairs: Iterable[tuple[Any, Any]]
    if isinstance(preds, np.ndarray | torch.Tensor):
        pairs = [(preds, labels)]
    else:
        if isinstance(labels, np.ndarray | torch.Tensor) or len(preds) != len(labels):
            raise InputError("preds and labels must be two arrays or two sequences of one length")
        pairs = zip(preds, labels, strict=True)
    cm = ConfusionMatrix(num_classes, ignore_pred_ignore=ignore_pred_ignore)
    try:
        for pred, label in pairs:
            cm.update(pred, label)
    except (ValueError, TypeError) as exc:
        raise InputError(str(exc)) from None
    return summarize(cm.compute())
