"""Fitting class-conditional logit distributions (docs/method.md §2, §3, §5).

The sufficient statistic is a logit-collection matrix of histograms on one shared, uniform logit
grid: ``counts[c, l, b]`` is the number of pixels labelled ``c`` whose logit of channel ``l``
falls in bin ``b``. Diagonal cells are the classes' positive distributions, off-diagonal cells
their negatives; the anchors pool all diagonal (``P+``) and all off-diagonal (``P-``) cells.
Histograms stream (``update``) and merge (sum), so shards and chunks give the same result as one
pass. From the counts a distribution is read either exactly (``hist``: the empirical CDF, linear
within a bin) or as a K-component Gaussian mixture (``gmm``: weighted EM on bin centres).

Shape legend: N pixels, C classes, B bins, G = B + 1 grid edges, K mixture components.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from blda_posthoc.core import defaults
from blda_posthoc.core.classes import IGNORE_INDEX

# Defined where `blda CMD -h` reads them (no torch there); re-exported here.
ESTIMATORS = defaults.ESTIMATORS

VARIANCE_FLOOR = 1e-4
"""Smallest mixture variance, as in the paper."""


@dataclass(frozen=True)
class Grid:
    """A uniform logit grid of ``bins`` bins from ``lo`` to ``hi``."""

    lo: float
    hi: float
    bins: int

    def __post_init__(self) -> None:
        if not (self.hi > self.lo) or self.bins < 2:
            raise ValueError(f"bad grid: lo={self.lo}, hi={self.hi}, bins={self.bins}")

    @property
    def step(self) -> float:
        """Bin width."""
        return (self.hi - self.lo) / self.bins

    @property
    def edges(self) -> np.ndarray:
        """``(G,)`` float64 bin edges."""
        return np.linspace(self.lo, self.hi, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        """``(B,)`` float64 bin centres."""
        e = self.edges
        return (e[:-1] + e[1:]) / 2

    @classmethod
    def covering(cls, low: float, high: float, bins: int) -> Grid:
        """A grid whose bounds are whole numbers strictly enclosing ``[low, high]``."""
        lo = math.floor(low) - 1.0
        hi = math.ceil(high) + 1.0
        return cls(lo, hi, bins)


STEP_VALUES = 1 << 18
"""Logits binned per step of :meth:`LogitHistogram.update` (its buffers stay in cache)."""


class LogitHistogram:
    """Streaming histograms of the logit-collection matrix (update / merge / counts).

    Args:
        num_classes: Number of classes ``C``.
        grid: The shared logit grid; logits outside it are counted in the edge bins.
        device: Where the counts accumulate.
        chunk_pixels: Most pixels binned per step (steps are smaller still, about
            :data:`STEP_VALUES` logits, so that they stay in the CPU cache); does not change
            the result.
    """

    def __init__(
        self,
        num_classes: int,
        grid: Grid,
        device: torch.device | str = "cpu",
        chunk_pixels: int = 1 << 18,
    ) -> None:
        self.num_classes = num_classes
        self.grid = grid
        self.device = torch.device(device)
        self.chunk_pixels = max(1, int(chunk_pixels))
        # [channel, label row, bin]; row C collects skipped pixels and is never reported.
        self._counts = torch.zeros(
            num_classes * (num_classes + 1) * grid.bins, dtype=torch.int64, device=self.device
        )
        self.num_pixels = 0

    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        affine: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Add pixels.

        A logit ``z`` (as float32) falls in bin ``floor((z - lo) / step)`` clamped to
        ``0 .. B-1``. Each step bins a cache-sized block of pixels, all channel rows at once:
        no ``(N, C)`` copy, no masked gather (skipped pixels are counted in a row that is
        dropped), and the counts grow in place by one ``index_add_`` over a fused
        ``(channel, label, bin)`` index.

        Args:
            logits: ``(C, H, W)`` or ``(N, C)`` logits, any float dtype.
            labels: ``(H, W)`` or ``(N,)`` class per pixel; 255 and values ``>= C`` are skipped.
            affine: ``(scale, bias)``, each ``(C,)`` float32: bin ``scale * z + bias`` per
                channel instead of ``z``, computed block by block in float32 exactly as
                ``logits.float() * scale + bias`` would be (no calibrated copy of the image).
        """
        c, bins = self.num_classes, self.grid.bins
        if logits.dim() == 3:
            if logits.shape[0] != c:
                raise ValueError(f"logits {tuple(logits.shape)} do not have {c} channels")
            rows_view = logits.reshape(c, -1)  # (C, N)
        elif logits.dim() == 2:
            rows_view = logits.T  # (C, N), strided
        else:
            raise ValueError(f"logits must be (C, H, W) or (N, C), got {tuple(logits.shape)}")
        labels = labels.reshape(-1).to(self.device).long()  # uint8 < C wraps C for C > 255
        if rows_view.shape != (c, labels.numel()):
            raise ValueError(f"logits {tuple(logits.shape)} do not match labels {labels.numel()}")
        rows_view = rows_view.to(self.device)
        keep = (labels != IGNORE_INDEX) & (labels < c)
        index_dtype = torch.int32 if self._counts.numel() < 2**31 else torch.int64
        # Per pixel: label row * B, skipped pixels in row C.
        row_offset = torch.where(keep, labels, c).to(index_dtype).mul_(bins)
        channel_offset = torch.arange(c, device=self.device, dtype=index_dtype)[:, None]
        channel_offset *= (c + 1) * bins
        n = labels.numel()
        step = min(self.chunk_pixels, n, max(1, STEP_VALUES // c))
        if step == 0:
            return
        zbuf = torch.empty(c * step, dtype=torch.float32, device=self.device)
        ibuf = torch.empty(c * step, dtype=index_dtype, device=self.device)
        ones = torch.ones(1, dtype=torch.int64, device=self.device).expand(c * step)
        lo, width = self.grid.lo, self.grid.step
        if affine is not None:
            scale, bias = (v.to(self.device, torch.float32).reshape(c, 1) for v in affine)
        for start in range(0, n, step):
            m = min(step, n - start)
            z = zbuf[: c * m].view(c, m)
            block = rows_view[:, start : start + m]
            if affine is not None:
                z.copy_(block).mul_(scale).add_(bias).sub_(lo)
            elif block.dtype == torch.float32:
                torch.sub(block, lo, out=z)
            else:
                z.copy_(block).sub_(lo)
            z.div_(width).floor_().clamp_(0, bins - 1)
            index = ibuf[: c * m].view(c, m)
            index.copy_(z)
            index += row_offset[None, start : start + m]
            index += channel_offset
            self._counts.index_add_(0, index.reshape(-1), ones[: c * m])
        self.num_pixels += int(keep.sum())

    def merge(self, other: LogitHistogram) -> None:
        """Add another histogram's counts (same classes and grid)."""
        if other.grid != self.grid or other.num_classes != self.num_classes:
            raise ValueError("cannot merge histograms with different grids or class counts")
        self._counts += other._counts.to(self.device)
        self.num_pixels += other.num_pixels

    def counts(self) -> np.ndarray:
        """``(C, C, B)`` int64 counts, ``[label c, channel l, bin]``."""
        c = self.num_classes
        cells = self._counts.reshape(c, c + 1, self.grid.bins)[:, :c]  # [channel, label, bin]
        return cells.transpose(0, 1).contiguous().cpu().numpy()


def channel_argmax(
    logits: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """``logits.argmax(0)`` of ``(C, ...)`` logits, equal to it and faster on CPU.

    A reduction over the leading, strided channel axis is slow on CPU; a running maximum over
    the contiguous channel planes is several times faster. Ties go to the first channel and a NaN
    counts as the largest value, as with :func:`torch.argmax`.

    Args:
        logits: ``(C, ...)`` logits.
        affine: ``(scale, bias)``, each ``(C,)`` float32: the argmax of ``scale * z + bias``
            per channel instead, computed plane by plane in float32 exactly as a calibrated copy
            of ``logits`` would hold it (no copy is made).

    Returns:
        ``(...)`` int64 channel of the largest logit.
    """

    def calibrated() -> torch.Tensor:
        assert affine is not None
        shape = (-1,) + (1,) * (logits.dim() - 1)
        scale, bias = (v.to(logits.device, torch.float32).reshape(shape) for v in affine)
        return logits.float() * scale + bias

    if logits.device.type != "cpu" or logits.dim() < 2 or logits.shape[0] < 2:
        return (logits if affine is None else calibrated()).argmax(0)

    work = None if affine is None else torch.empty(logits.shape[1:], dtype=torch.float32)

    def plane(channel: int) -> torch.Tensor:
        if affine is None or work is None:
            return logits[channel]
        work.copy_(logits[channel]).mul_(affine[0][channel].float())
        return work.add_(affine[1][channel].float())

    best = plane(0).clone()
    index = torch.zeros(best.shape, dtype=torch.int64)
    larger = torch.empty(best.shape, dtype=torch.bool)
    for channel in range(1, logits.shape[0]):
        values = plane(channel)
        torch.gt(values, best, out=larger)
        index.masked_fill_(larger, channel)
        torch.maximum(best, values, out=best)
    if bool(torch.isnan(best).any()):  # maximum propagates NaN; let argmax place it
        return (logits if affine is None else calibrated()).argmax(0)
    return index


def last_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)``, computed by ``x.max(-1)``.

    The same indices (the first maximal value, and a NaN counts as the largest, as PyTorch
    documents for both; tested), about a third faster on CPU over a short last axis such as
    the classes of ``(N, C)`` scores.
    """
    return x.max(-1).indices


def pool_anchors(counts: np.ndarray) -> np.ndarray:
    """Pool cells into the two anchors.

    Args:
        counts: ``(C, C, B)`` cell histograms.

    Returns:
        ``(2, B)``: row 0 the positive anchor (all diagonal cells), row 1 the negative anchor
        (all off-diagonal cells).
    """
    diag = np.einsum("ccb->b", counts)
    return np.stack([diag, counts.sum(axis=(0, 1)) - diag])


@dataclass
class Mixture:
    """Gaussian mixtures, one per row: ``weights``, ``means``, ``sigmas`` each ``(..., K)``."""

    weights: np.ndarray
    means: np.ndarray
    sigmas: np.ndarray


def fit_mixture(
    centers: np.ndarray, counts: np.ndarray, components: int = 5, iterations: int = 200
) -> Mixture:
    """Fit a K-component Gaussian mixture to each histogram by weighted EM on bin centres.

    Deterministic: components start at the histogram's quantiles ``(k + 0.5) / K``. Rows with no
    counts get zero weights.

    Args:
        centers: ``(B,)`` bin centres.
        counts: ``(M, B)`` histograms.
        components: ``K``.
        iterations: EM steps.

    Returns:
        The mixtures, arrays ``(M, K)``.
    """
    x = torch.as_tensor(centers, dtype=torch.float64)
    h = torch.as_tensor(counts, dtype=torch.float64)
    total = h.sum(-1, keepdim=True)
    p = h / total.clamp_min(1)
    cdf = p.cumsum(-1)
    targets = (torch.arange(components, dtype=torch.float64) + 0.5) / components
    idx = torch.searchsorted(cdf.contiguous(), targets.expand(h.shape[0], -1).contiguous())
    mu = x[idx.clamp(max=x.numel() - 1)]
    mean = (p * x).sum(-1, keepdim=True)
    var = (p * (x - mean) ** 2).sum(-1, keepdim=True).clamp_min(VARIANCE_FLOOR)
    var = var.expand(-1, components).clone()
    w = torch.full_like(mu, 1.0 / components)
    for _ in range(iterations):
        log_pdf = (
            -0.5 * (x[None, None, :] - mu[..., None]) ** 2 / var[..., None]
            - 0.5 * torch.log(2 * math.pi * var[..., None])
            + torch.log(w.clamp_min(1e-300))[..., None]
        )  # (M, K, B)
        resp = torch.softmax(log_pdf, dim=1) * p[:, None, :]
        mass = resp.sum(-1)  # (M, K)
        w = mass
        safe = mass.clamp_min(1e-12)
        mu = torch.where(mass > 1e-12, (resp * x).sum(-1) / safe, mu)
        var = torch.where(
            mass > 1e-12, (resp * (x[None, None, :] - mu[..., None]) ** 2).sum(-1) / safe, var
        ).clamp_min(VARIANCE_FLOOR)
    w = torch.where(total > 0, w / w.sum(-1, keepdim=True).clamp_min(1e-300), torch.zeros_like(w))
    return Mixture(w.numpy(), mu.numpy(), var.sqrt().numpy())


@dataclass
class PixelSample:
    """A seeded sample of pixels: ``logits`` ``(S, C)`` float32, ``labels`` ``(S,)`` uint8.

    ``image_counts`` ``(M,)`` int64: pixels drawn from each image, in the sample's (name) order,
    so that ``logits[:image_counts[0]]`` are the first image's; None in files written before it
    was recorded.
    """

    logits: np.ndarray
    labels: np.ndarray
    image_counts: np.ndarray | None = None


@dataclass
class StatsExtras:
    """Statistics beyond the logit histograms, for corrections other than plain BLDA.

    Attributes:
        predicted: ``(C,)`` int64 pixels per predicted (argmax) class, over every pixel.
        confidence: ``(C, B')`` int64 histograms of the top-1 confidence log-odds of the pixels
            predicted as each class, on ``confidence_grid`` (``lo``, ``hi``, ``bins``).
        confidence_grid: ``(lo, hi, bins)`` of those histograms.
        sample: A seeded sample of labelled pixels (labels as fitted: gt or pseudo).
        calibrations: Affine calibrations ``{kind: (scale (C,), bias (C,))}`` fitted on the
            sample (ground-truth labels only).
        calibrated: Statistics of the calibrated logits (``settings["calibration"]`` says
            which calibration), or None.
    """

    predicted: np.ndarray
    confidence: np.ndarray
    confidence_grid: tuple[float, float, int]
    sample: PixelSample
    calibrations: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    calibrated: LogitStats | None = None


@dataclass
class LogitStats:
    """Fitted logit statistics of one dataset: what ``fit-stats`` writes and ``correct`` reads.

    Attributes:
        class_names: ``C`` names.
        grid: The logit grid of the histograms.
        counts: ``(C, C, B)`` int64 cell histograms ``[label, channel, bin]``.
        anchor_counts: ``(2, B)`` int64 positive and negative anchor histograms.
        estimator: ``hist`` (empirical CDF) or ``gmm``.
        mixtures: With ``gmm``: the cells' mixtures, arrays ``(C, C, K)``; else None.
        anchor_mixtures: With ``gmm``: the anchors' mixtures, arrays ``(2, K)``; else None.
        settings: How the statistics were made (labels, min_pixels, sources, ...).
        extras: What the other corrections need (predicted shares, confidence histograms, a
            pixel sample, calibrations, statistics of calibrated logits); None in files written
            before version 2.
    """

    class_names: list[str]
    grid: Grid
    counts: np.ndarray
    anchor_counts: np.ndarray
    estimator: str = "hist"
    mixtures: Mixture | None = None
    anchor_mixtures: Mixture | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    extras: StatsExtras | None = None

    @property
    def num_classes(self) -> int:
        """``C``."""
        return len(self.class_names)

    @property
    def cell_pixels(self) -> np.ndarray:
        """``(C, C)`` pixels per cell."""
        return self.counts.sum(-1)

    @property
    def label_pixels(self) -> np.ndarray:
        """``(C,)`` labelled pixels per class (every pixel adds to each cell of its row)."""
        return self.counts[:, 0, :].sum(-1)

    @property
    def fingerprint(self) -> str:
        """A short content hash identifying these statistics."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.counts).data)  # the buffer itself: no copy
        digest.update(repr((self.grid, self.estimator, self.class_names)).encode())
        if self.mixtures is not None:
            for arr in (self.mixtures.weights, self.mixtures.means, self.mixtures.sigmas):
                digest.update(np.ascontiguousarray(arr).tobytes())
        if self.extras is not None:
            for name in sorted(self.extras.calibrations):
                scale, bias = self.extras.calibrations[name]
                digest.update(name.encode() + scale.tobytes() + bias.tobytes())
            digest.update(np.ascontiguousarray(self.extras.predicted).tobytes())
            digest.update(np.ascontiguousarray(self.extras.sample.logits).tobytes())
            if self.extras.calibrated is not None:
                digest.update(self.extras.calibrated.fingerprint.encode())
        return digest.hexdigest()[:16]


def make_stats(
    histogram: LogitHistogram,
    class_names: list[str],
    estimator: str = "hist",
    components: int = 5,
    settings: dict[str, Any] | None = None,
) -> LogitStats:
    """Turn accumulated histograms into :class:`LogitStats`, fitting mixtures for ``gmm``."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    counts = histogram.counts()
    anchors = pool_anchors(counts)
    stats = LogitStats(
        class_names=list(class_names),
        grid=histogram.grid,
        counts=counts,
        anchor_counts=anchors,
        estimator=estimator,
        settings=dict(settings or {}),
    )
    if estimator == "gmm":
        c, b = histogram.num_classes, histogram.grid.bins
        cells = fit_mixture(histogram.grid.centers, counts.reshape(c * c, b), components)
        stats.mixtures = Mixture(
            cells.weights.reshape(c, c, components),
            cells.means.reshape(c, c, components),
            cells.sigmas.reshape(c, c, components),
        )
        stats.anchor_mixtures = fit_mixture(histogram.grid.centers, anchors, components)
    stats.settings.setdefault("components", components if estimator == "gmm" else None)
    return stats
