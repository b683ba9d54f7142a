"""Stream logits stores into fitted statistics (docs/method.md, "Estimating the distributions").

One pass over the store accumulates, per image at its recorded size: the logit-collection
histograms, the predicted-class counts, the per-class confidence histograms (for ``cbst``), a
seeded pixel sample and, when a calibration is known, the histograms of the calibrated logits
(for ``calibrated-blda``). With ground-truth labels the affine calibrations (temperature, vector
scaling, bias) are fitted first on labelled pixels of at most 32 images spread over the store;
the vector scaling is then the known calibration. ``--calibration`` gives one instead (target
statistics take the source's).
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from blda_posthoc.core import defaults
from blda_posthoc.core.align import Tables
from blda_posthoc.core.calibrate import CALIBRATIONS, fit_calibration, sample_pixels
from blda_posthoc.core.classes import IGNORE_INDEX
from blda_posthoc.core.fit import (
    Grid,
    LogitHistogram,
    LogitStats,
    PixelSample,
    StatsExtras,
    channel_argmax,
    make_stats,
)
from blda_posthoc.core.methods import Affine
from blda_posthoc.core.relabel import ConfidenceHistogram, LogOddsGrid, confidence_logodds
from blda_posthoc.errors import InputError
from blda_posthoc.io.stats import MAX_CALIBRATION_SCALE
from blda_posthoc.io.store import LogitStore, Progress
from blda_posthoc.pipelines.memory import check_correction_memory

# Defined where `blda CMD -h` reads them (no torch there); re-exported here.
DEFAULT_BINS = defaults.DEFAULT_BINS
DEFAULT_SAMPLE_PIXELS = defaults.DEFAULT_SAMPLE_PIXELS
LABEL_SOURCES = defaults.LABEL_SOURCES

CONFIDENCE_BINS = 4096
CALIBRATION_PIXELS = 50_000
"""Labelled pixels the calibrations are fitted on (2C parameters at most: plenty)."""
CALIBRATION_IMAGES = 32
"""Images those pixels are drawn from."""
CALIBRATED_WITH = "vector"
"""The calibration whose logits the calibrated statistics describe."""


def vector_calibration(
    stats: LogitStats, name: str, class_names: Sequence[str], fit_gt: str
) -> tuple[np.ndarray, np.ndarray]:
    """The vector scaling of labelled statistics, to fit calibrated statistics with.

    Args:
        stats: Statistics fitted with ground-truth labels and calibrations (usually source).
        name: How messages name ``stats`` (a path, or the API's argument).
        class_names: The class names of the images being fitted.
        fit_gt: How such statistics are fitted, for the message when they hold no calibration.

    Returns:
        ``(scale (C,), bias (C,))``.
    """
    if stats.class_names != list(class_names):
        raise InputError(
            f"{name}: class names {stats.class_names} differ from the images' {list(class_names)}"
        )
    if stats.extras is None or CALIBRATED_WITH not in stats.extras.calibrations:
        raise InputError(f"{name}: holds no vector-scaling calibration (fit it with {fit_gt})")
    return stats.extras.calibrations[CALIBRATED_WITH]


@dataclass(frozen=True)
class FitOptions:
    """How ``fit-stats`` fits.

    Attributes:
        labels: ``gt`` (the store's label maps) or ``pseudo`` (argmax of the logits).
        estimator: ``hist`` or ``gmm``.
        components: Mixture components for ``gmm``.
        min_pixels: Cells with fewer pixels are skipped by ``correct``.
        bins: Histogram bins over the store's logit range.
        sample_pixels: Size of the seeded pixel sample (calibration, EM, ``--tau auto``).
        seed: Seed of the sample.
        calibrate: With ``gt``: fit the calibrations and the calibrated statistics.
        calibration: A known vector calibration ``(scale, bias)`` whose calibrated statistics
            are fitted in the same pass, or None.
        calibration_source: Where ``calibration`` came from (recorded in the settings).
    """

    labels: str
    estimator: str = "hist"
    components: int = 5
    min_pixels: int = 100
    bins: int = DEFAULT_BINS
    sample_pixels: int = DEFAULT_SAMPLE_PIXELS
    seed: int = 0
    calibrate: bool = True
    calibration: tuple[np.ndarray, np.ndarray] | None = field(default=None, compare=False)
    calibration_source: str | None = None


MAX_CELL_VALUES = 1 << 28
"""Most ``C * C * bins`` histogram counts (2 GiB of int64), as stats readers accept."""
MAX_SPREAD = 256
"""The grid may span at most this many times a typical image's logit range (see below)."""


def check_memory(num_classes: int, bins: int, groups: int = 1) -> None:
    """Refuse ``--bins`` whose ``(C, C, bins)`` histograms exceed the format's limit or the budget.

    Args:
        num_classes: ``C``.
        bins: Histogram bins.
        groups: Histogram sets held at once (2 when calibrated statistics are fitted too).
    """
    values = num_classes * num_classes * bins
    if values > MAX_CELL_VALUES:
        raise InputError(
            f"--bins {bins} with {num_classes} classes needs {values * 8 / 2**30:.1f} GiB of "
            f"histograms (at most {MAX_CELL_VALUES * 8 / 2**30:.0f} GiB); use fewer --bins"
        )
    check_correction_memory(
        f"--bins {bins}", num_classes, bins, groups=groups, tables=Tables(), what="fitting",
        fit_bins="--bins {bins}",
    )  # fmt: skip


def check_spread(store: LogitStore, bins: int) -> None:
    """Refuse a store whose extreme logits would stretch the grid over everything else.

    See :func:`check_ranges`; the message names the image's file.
    """
    check_ranges(store.logit_ranges(), bins, lambda name: str(store.path_of(name)))


def check_ranges(
    ranges: dict[str, tuple[float, float]], bins: int, where: Callable[[str], str]
) -> None:
    """Refuse images whose extreme logits would stretch the grid over everything else.

    The grid covers the smallest to the largest logit of all images. When that is more than
    :data:`MAX_SPREAD` times the logit range of a typical (median) image, a typical image falls
    into a handful of bins and the fitted distributions mean nothing: the image with the most
    extreme logits is named instead.

    Args:
        ranges: ``(lowest, highest)`` logit of each image, by name.
        bins: Histogram bins.
        where: Where an image comes from, for the message.
    """
    if not ranges:
        return
    spans = np.array([high - low for low, high in ranges.values()])
    typical = float(np.median(spans))
    lo = min(low for low, _ in ranges.values())
    hi = max(high for _, high in ranges.values())
    if typical <= 0 or hi - lo <= MAX_SPREAD * typical:
        return
    mids = np.array([(low + high) / 2 for low, high in ranges.values()])
    center = float(np.median(mids))
    name = max(ranges, key=lambda n: max(center - ranges[n][0], ranges[n][1] - center))
    low, high = ranges[name]
    raise InputError(
        f"{where(name)}: image {name!r} has logits in [{low:.4g}, {high:.4g}], far "
        f"outside a typical image's range ({typical:.4g} wide); over [{lo:.4g}, {hi:.4g}] the "
        f"{bins} histogram bins would give a typical image about {bins * typical / (hi - lo):.1f}"
        " bins. Remove or fix that image"
    )


ImageSource = Callable[[Sequence[str] | None], Iterable[tuple[str, torch.Tensor, torch.Tensor]]]
"""``images(names)`` yields ``(name, z, y)`` for the named images (None: all of them):
``z`` the ``(C, H, W)`` float32 logits at the image's size and ``y`` the ``(H, W)`` int64
labels (ground truth, or the argmax for pseudo-labels), on the fitting device. The order does
not matter."""


def fit_store(
    store: LogitStore,
    options: FitOptions,
    *,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> LogitStats:
    """Fit statistics over a store, at each image's recorded size.

    Logits are resized bilinearly to the image size first, exactly as ``correct`` sees them.
    Memory is bounded by one image, the ``(C, C, bins)`` histograms and the pixel sample.

    Args:
        store: One or more stores read as one dataset.
        options: What to fit.
        device: Where to compute.
        progress: Wraps the iteration over image names.

    Returns:
        The fitted statistics, with their extras (version 2).
    """
    if options.labels not in LABEL_SOURCES:
        raise InputError(f"--labels must be one of {LABEL_SOURCES}, got {options.labels!r}")
    if options.labels == "gt" and not store.has_labels():
        raise InputError(f"{store.paths[0]}: --label-source gt needs label maps in every image")
    lo, hi = store.logit_range()
    calibrated = options.labels == "gt" or options.calibration is not None
    check_memory(store.num_classes, options.bins, groups=2 if calibrated else 1)
    check_spread(store, options.bins)
    with_label = options.labels == "gt"

    def images(names: Sequence[str] | None) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        shown = progress if names is None else None
        for record, z in store.iter_images(
            names, device=device, with_label=with_label, progress=shown
        ):
            yield record.name, z, _labels(record, z, options.labels, device)

    sources = [str(p) for p in store.paths]
    stats = fit_images(
        images, store.names, store.class_names, (lo, hi), options, device=device, sources=sources
    )
    stats.settings["source_fingerprints"] = list(store.fingerprints)
    return stats


def fit_images(
    images: ImageSource,
    names: Sequence[str],
    class_names: list[str],
    logit_range: tuple[float, float],
    options: FitOptions,
    *,
    device: torch.device | str = "cpu",
    sources: list[str],
) -> LogitStats:
    """Fit statistics over images from any source (the body of :func:`fit_store`).

    With ground-truth labels and ``options.calibrate`` the images of
    :func:`calibration_sample` are read first, then every image once.

    Args:
        images: The images (see :data:`ImageSource`).
        names: Every image's name (the calibration images and the sample quota depend on them).
        class_names: The ``C`` class names.
        logit_range: ``(lowest, highest)`` logit over all images (the histogram grid).
        options: What to fit (``labels`` decides only what the settings record here).
        device: Where to compute.
        sources: Where the images come from (recorded in the settings).

    Returns:
        The fitted statistics, with their extras (version 2).
    """
    lo, hi = logit_range
    c = len(class_names)
    calibrations: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    known, source = options.calibration, options.calibration_source
    if options.labels == "gt" and options.calibrate:
        labelled = calibration_sample(images, names, c, options.seed)
        calibrations = fit_calibrations(labelled)
        if known is None and CALIBRATED_WITH in calibrations:
            known, source = calibrations[CALIBRATED_WITH], "self"
    grid = Grid.covering(lo, hi, options.bins)
    first = Pass(c, grid, device, options, _affine(known, device), (lo, hi))
    quota = math.ceil(options.sample_pixels / max(len(names), 1))
    for name, z, y in images(None):
        first.add(name, z, y, quota)
    settings: dict[str, Any] = {
        "labels": options.labels,
        "min_pixels": options.min_pixels,
        "bins": options.bins,
        "num_images": len(names),
        "num_pixels": first.histogram.num_pixels,
        "sources": sources,
        "resolution": "image",
        "sample_pixels": options.sample_pixels,
        "seed": options.seed,
    }
    if calibrations:
        settings["calibration_pixels"] = int(labelled.labels.size)
    stats = make_stats(
        first.histogram, class_names, options.estimator, options.components, settings
    )
    calibrated = None
    if first.calibrated is not None and known is not None:
        calibrated = _calibrated_stats(first.calibrated, stats, options, known, source)
    stats.extras = StatsExtras(
        predicted=first.predicted.cpu().numpy(),
        confidence=first.confidence.counts(),
        confidence_grid=(
            first.confidence.grid.lo,
            first.confidence.grid.hi,
            first.confidence.grid.bins,
        ),
        sample=first.sample(),
        calibrations=calibrations,
        calibrated=calibrated,
    )
    return stats


def calibration_sample(
    images: ImageSource, names: Sequence[str], num_classes: int, seed: int
) -> PixelSample:
    """Labelled pixels for the calibration fit, from at most :data:`CALIBRATION_IMAGES` images.

    The images are spread evenly over the name-sorted images, so that the calibration is known
    before the main pass (which then histograms the calibrated logits too) at the cost of
    reading a small part of a large dataset twice. The sample is in name order whatever order
    ``images`` yields them in.
    """
    ordered = sorted(names)
    step = max(1, math.ceil(len(ordered) / CALIBRATION_IMAGES))
    chosen = ordered[::step]
    quota = math.ceil(CALIBRATION_PIXELS / max(len(chosen), 1))
    parts = {name: sample_image(name, z, y, quota, seed) for name, z, y in images(chosen)}
    return join_samples([parts[name] for name in sorted(parts)], num_classes)


def sample_image(
    name: str, z: torch.Tensor, y: torch.Tensor, quota: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of an image's labelled pixels.

    The draw depends on the seed and the image's name only, so shards and reruns draw the same
    pixels.

    Args:
        name: Image name.
        z: ``(C, H, W)`` logits.
        y: ``(H, W)`` labels (255 and ids ``>= C`` are not drawn).
        quota: Pixels to draw (all when the image has fewer).
        seed: Seed of the sample.

    Returns:
        ``(q, C)`` float32 logits and ``(q,)`` uint8 labels.
    """
    c = z.shape[0]
    flat_y = y.reshape(-1)
    usable = torch.nonzero((flat_y != IGNORE_INDEX) & (flat_y < c)).reshape(-1)
    image_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 32)
    pick = usable[torch.as_tensor(sample_pixels(int(usable.numel()), quota, image_seed))]
    logits = z.reshape(c, -1)[:, pick].T.float().cpu().numpy()
    return logits, flat_y[pick].cpu().numpy().astype(np.uint8)


def join_samples(parts: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> PixelSample:
    """One :class:`PixelSample` from per-image samples, in the given order."""
    if not parts:
        return PixelSample(np.zeros((0, num_classes), np.float32), np.zeros(0, np.uint8))
    return PixelSample(
        np.concatenate([p[0] for p in parts]).astype(np.float32),
        np.concatenate([p[1] for p in parts]),
        np.array([len(p[1]) for p in parts], dtype=np.int64),
    )


def _labels(record: Any, z: torch.Tensor, labels: str, device: torch.device | str) -> torch.Tensor:
    if labels == "pseudo":
        return channel_argmax(z)
    assert record.label is not None
    if record.label.shape != record.size:
        raise InputError(f"{record.name}: label size {record.label.shape} != {record.size}")
    return torch.from_numpy(record.label).to(device).long()


def _affine(cal: tuple[np.ndarray, np.ndarray] | None, device: torch.device | str) -> Affine | None:
    if cal is None:
        return None
    scale, bias = (torch.tensor(np.asarray(v), dtype=torch.float32, device=device) for v in cal)
    return Affine(scale, bias)


class Pass:
    """What one pass over the images accumulates.

    Args:
        num_classes: ``C``.
        grid: Grid of the raw-logit histograms.
        device: Where counts accumulate.
        options: The fit options (labels, seed).
        calibration: Calibration whose calibrated logits are histogrammed too, or None.
        logit_range: ``(lo, hi)`` of the raw logits (for the calibrated grid).
    """

    def __init__(
        self,
        num_classes: int,
        grid: Grid,
        device: torch.device | str,
        options: FitOptions,
        calibration: Affine | None,
        logit_range: tuple[float, float],
    ) -> None:
        self.options = options
        self.num_classes = num_classes
        self.histogram = LogitHistogram(num_classes, grid, device)
        self.predicted = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.confidence = ConfidenceHistogram(
            num_classes, LogOddsGrid.for_classes(num_classes, CONFIDENCE_BINS), device
        )
        self.samples: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.calibration = calibration
        self.calibrated: LogitHistogram | None = None
        if calibration is not None:
            lo, hi = _calibrated_range(calibration, logit_range)
            self.calibrated = LogitHistogram(
                num_classes, Grid.covering(lo, hi, options.bins), device
            )

    def add(self, name: str, z: torch.Tensor, y: torch.Tensor, quota: int) -> None:
        """Add one image: ``z`` ``(C, H, W)`` logits, ``y`` ``(H, W)`` labels."""
        c = self.num_classes
        self.histogram.update(z, y)
        pred, logodds = confidence_logodds(z)
        self.predicted += torch.bincount(pred.reshape(-1), minlength=c)
        self.confidence.update(pred, logodds)
        self.samples[name] = sample_image(name, z, y, quota, self.options.seed)
        if self.calibration is not None and self.calibrated is not None:
            affine = (self.calibration.scale, self.calibration.bias)
            labels = y if self.options.labels == "gt" else channel_argmax(z, affine)
            self.calibrated.update(z, labels, affine)

    def sample(self) -> PixelSample:
        """The pixel sample, in name order."""
        return join_samples([self.samples[n] for n in sorted(self.samples)], self.num_classes)


def _calibrated_range(calibration: Affine, logit_range: tuple[float, float]) -> tuple[float, float]:
    ends = (
        torch.stack([calibration.scale * logit_range[0], calibration.scale * logit_range[1]])
        + calibration.bias
    )
    return float(ends.min()), float(ends.max())


def fit_calibrations(sample: PixelSample) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Temperature, vector scaling and bias fitted on labelled pixels.

    A fit whose scale is 0 or below (logits that rank a class against its labels, e.g. a rare
    class on a small sample) or above the stats files' bound is fitted again with a growing pull
    towards the identity (:data:`CALIBRATION_PULLS`), which keeps every scale positive; if no
    pull gives a valid scale the calibration is left out, as stats files refuse it (the methods
    that need it then say the file holds none).
    """
    if sample.labels.size == 0:
        return {}
    labels = sample.labels.astype(np.int64)
    fits = {}
    for kind in CALIBRATIONS:
        for pull in CALIBRATION_PULLS:
            fit = fit_calibration(sample.logits, labels, kind, weight_decay=pull)
            scale = np.asarray(fit.scale, np.float64)
            if (scale > 0).all() and (scale <= MAX_CALIBRATION_SCALE).all():
                fits[kind] = (scale, np.asarray(fit.bias, np.float64))
                break
    return fits


# Weight decays tried in turn when a calibration fit has a scale of 0 or below (0: the plain fit).
CALIBRATION_PULLS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)


def calibration_fingerprint(cal: tuple[np.ndarray, np.ndarray]) -> str:
    """A short hash of a calibration's parameters."""
    digest = hashlib.sha256(np.asarray(cal[0], np.float64).tobytes())
    digest.update(np.asarray(cal[1], np.float64).tobytes())
    return digest.hexdigest()[:16]


def _calibrated_stats(
    histogram: LogitHistogram,
    raw: LogitStats,
    options: FitOptions,
    calibration: tuple[np.ndarray, np.ndarray] | None,
    source: str | None = None,
) -> LogitStats:
    assert calibration is not None
    settings = dict(raw.settings)
    settings["num_pixels"] = histogram.num_pixels
    settings["calibration"] = {
        "kind": CALIBRATED_WITH,
        "fingerprint": calibration_fingerprint(calibration),
        "source": source or options.calibration_source,
    }
    return make_stats(histogram, raw.class_names, options.estimator, options.components, settings)
