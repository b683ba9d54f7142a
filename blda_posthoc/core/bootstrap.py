"""How much to trust a gain: paired bootstrap intervals over images.

A gain in mIoU (or mAcc) of a correction over the plain argmax is measured on a sample of
images; another sample would give another gain. The paired bootstrap resamples the images with
replacement, ``n`` times, and recomputes the gain on each resample, using the SAME resample for
the corrected row and for the baseline (paired: the image-to-image variation they share
cancels). The 95 % interval is the 2.5th and 97.5th percentile of the resampled gains
(``numpy.percentile``, linear interpolation), widened to include the observed gain when it falls
outside (possible on a handful of images, where mIoU's class set changes between resamples).

The metrics are functions of three per-class sums of the confusion matrix: true positives,
labelled pixels and predicted pixels. A resample's confusion matrix is a weighted sum of
per-image matrices, so a weighted sum of per-image ``(3, C)`` *image counts* gives exactly the
same metric: that is what is kept per image (``3 C`` integers instead of ``C (C + 1)``).

Resampling: ``numpy.random.default_rng(seed).integers(0, I, size=(B, I))`` draws the image
indices of ``B`` resamples at a time (blocks of :data:`BLOCK`), turned into ``(B, I)`` counts of
how often each image is drawn; a resample's counts are ``weights @ image_counts``.

Shape legend: I images, C classes, R rows (corrections), B resamples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from blda_posthoc.core import defaults

# Defined where `blda CMD -h` reads them (no torch there); re-exported here.
METRICS = defaults.METRICS
DEFAULT_BOOTSTRAP = defaults.DEFAULT_BOOTSTRAP

LEVEL = 0.95
"""Coverage of the interval."""
BLOCK = 1000
"""Resamples drawn (and evaluated) at a time: memory stays at ``BLOCK × I`` draws."""


def image_counts(confusion: np.ndarray) -> np.ndarray:
    """The per-class sums the metrics need, of one or many confusion matrices.

    Args:
        confusion: ``(..., C, C)`` or ``(..., C, C + 1)`` counts, rows true, columns predicted
            (the optional last column: valid pixels predicted outside ``0 .. C-1``).

    Returns:
        ``(..., 3, C)`` int64: true positives, labelled pixels (row sums, the last column
        included) and predicted pixels (column sums of ``0 .. C-1``).
    """
    m = np.asarray(confusion)
    c = m.shape[-2]
    if m.ndim < 2 or m.shape[-1] not in (c, c + 1):
        raise ValueError(f"expected (..., C, C) or (..., C, C + 1) counts, got {m.shape}")
    square = m[..., :, :c]
    tp = np.diagonal(square, axis1=-2, axis2=-1)
    return np.stack([tp, m.sum(-1), square.sum(-2)], axis=-2).astype(np.int64)


def metric_from_counts(counts: np.ndarray, metric: str) -> np.ndarray:
    """MIoU or mAcc in percent of ``(..., 3, C)`` counts (see :func:`image_counts`).

    As :func:`blda_posthoc.core.evaluate.summarize`: a class's IoU is undefined (left out of the
    mean) when it is neither labelled nor predicted, its accuracy when it is not labelled.

    Returns:
        ``(...)`` float64; NaN where no class is defined.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    counts = np.asarray(counts, dtype=np.float64)
    tp, labelled, predicted = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    denominator = labelled + predicted - tp if metric == "miou" else labelled
    defined = denominator > 0
    ratio = np.divide(tp, denominator, out=np.zeros_like(tp), where=defined)
    number = defined.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(number > 0, 100.0 * ratio.sum(-1) / number, np.nan)


def resample_weights(num_images: int, n: int, seed: int) -> np.ndarray:
    """``(n, I)`` int64: how often each image is drawn in each of ``n`` resamples.

    Drawn in blocks of :data:`BLOCK` resamples from one ``default_rng(seed)`` (the module
    docstring gives the rule), so the same seed gives the same resamples.
    """
    if num_images < 1 or n < 1:
        raise ValueError(f"need at least one image and one resample, got {num_images} and {n}")
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, n, BLOCK):
        size = min(BLOCK, n - start)
        drawn = rng.integers(0, num_images, size=(size, num_images))
        offset = np.arange(size)[:, None] * num_images
        flat = np.bincount((drawn + offset).ravel(), minlength=size * num_images)
        blocks.append(flat.reshape(size, num_images))
    return np.concatenate(blocks).astype(np.int64)


def gain_intervals(
    rows: Sequence[np.ndarray] | np.ndarray,
    baseline: np.ndarray,
    *,
    metric: str = "miou",
    n: int = 1000,
    seed: int = 0,
) -> list[tuple[float, float] | None]:
    """95 % paired bootstrap intervals of the gain of each row over the baseline.

    Every row is resampled with the same ``n`` resamples as the baseline (and as each other).

    Args:
        rows: ``R`` arrays ``(I, 3, C)`` of per-image counts (:func:`image_counts`), images in
            the same order as ``baseline``.
        baseline: ``(I, 3, C)`` per-image counts of the uncorrected prediction.
        metric: ``"miou"`` or ``"macc"``.
        n: Resamples; 0 turns the bootstrap off (every interval None).
        seed: Seed of the resampling.

    Returns:
        Per row ``(lo, hi)`` in percentage points, or None when ``n`` is 0, there is no image,
        or the gain is undefined.

    Example:
        >>> base = np.array([[[5, 10, 5]], [[0, 10, 10]]])  # 2 images, 1 class
        >>> gain_intervals([base], base, n=50)
        [(0.0, 0.0)]
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    if n < 0:
        raise ValueError(f"the number of resamples must be >= 0, got {n}")
    base = np.asarray(baseline, dtype=np.int64)
    if base.ndim != 3 or base.shape[1] != 3:
        raise ValueError(f"expected (I, 3, C) baseline counts, got {base.shape}")
    stacked = [np.asarray(r, dtype=np.int64) for r in rows]
    for r in stacked:
        if r.shape != base.shape:
            raise ValueError(f"row counts {r.shape} differ from baseline counts {base.shape}")
    if n == 0 or base.shape[0] == 0:
        return [None] * len(stacked)
    weights = resample_weights(base.shape[0], n, seed).astype(np.float64)
    base_seen = metric_from_counts(base.sum(0), metric)
    base_resampled = _resampled_metric(weights, base, metric)
    out: list[tuple[float, float] | None] = []
    for r in stacked:
        seen = float(metric_from_counts(r.sum(0), metric) - base_seen)
        gains = _resampled_metric(weights, r, metric) - base_resampled
        gains = gains[np.isfinite(gains)]
        if not np.isfinite(seen) or gains.size == 0:
            out.append(None)
            continue
        tail = 100.0 * (1.0 - LEVEL) / 2.0
        lo, hi = np.percentile(gains, [tail, 100.0 - tail])
        out.append((min(float(lo), seen), max(float(hi), seen)))
    return out


def paired_bootstrap(
    row: np.ndarray,
    baseline: np.ndarray,
    *,
    metric: str = "miou",
    n: int = 1000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """The 95 % paired bootstrap interval of one row's gain (see :func:`gain_intervals`).

    Args:
        row: ``(I, 3, C)`` per-image counts of the corrected prediction.
        baseline: ``(I, 3, C)`` per-image counts of the uncorrected prediction.
        metric: ``"miou"`` or ``"macc"``.
        n: Resamples (0: None).
        seed: Seed of the resampling.
    """
    return gain_intervals([row], baseline, metric=metric, n=n, seed=seed)[0]


def _resampled_metric(weights: np.ndarray, counts: np.ndarray, metric: str) -> np.ndarray:
    """``(B,)`` metric of each resample: ``(B, I)`` weights times ``(I, 3, C)`` counts."""
    i, _, c = counts.shape
    summed = weights @ counts.reshape(i, 3 * c).astype(np.float64)
    return metric_from_counts(summed.reshape(-1, 3, c), metric)


def includes_zero(interval: Sequence[float | None] | None) -> bool:
    """Whether an interval ``[lo, hi]`` holds 0 (the gain is not told apart from no gain)."""
    if interval is None or interval[0] is None or interval[1] is None:
        return False
    return interval[0] <= 0.0 <= interval[1]
