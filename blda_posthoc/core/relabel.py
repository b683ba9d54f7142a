"""Pseudo-label selection from corrected scores: confidence, thresholds, class-balanced keep.

A pixel's corrected pseudo-label is ``argmax_i s_i`` of the corrected log-scores ``s``
(:func:`blda_posthoc.core.correct.predict`); its *confidence* is the top entry of
``softmax(s)``. Confidences near 1 saturate in float32, so every ranking here works on the
confidence's log-odds ``k = s_top - logsumexp_{j != top} s_j`` (``confidence = sigmoid(k)``),
which is monotone in the confidence and stays resolved where the confidence rounds to 1.

Class-balanced selection (``keep_portion = P``, in the manner of CBST): per class ``c``, keep the
``P`` most confident fraction of the pixels whose pseudo-label is ``c`` and mark the rest ignore
(255). The per-class thresholds need every pixel of the dataset, so they come from streaming
per-class histograms of ``k`` (:class:`ConfidenceHistogram`, pass 1) and are applied in a second
pass by comparing *bin indices*, which makes the number of kept pixels per class known exactly
from the histogram. The threshold bin is the one whose suffix count is closest to ``P * n_c``,
so the kept fraction of a class differs from ``P`` by at most half the pixels of one bin
(``LOGODDS_BINS`` bins of width ~0.001 in log-odds): well under 0.5 % unless many pixels share
(nearly) the same score; the achieved fraction is reported per class.

Shape legend: N pixels, C classes, B log-odds bins, H x W image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from blda_posthoc.core.classes import IGNORE_INDEX

LOGODDS_BINS = 1 << 16
"""Bins of the per-class log-odds histograms."""
LOGODDS_HIGH = 64.0
"""Upper end of the log-odds grid (confidence 1 - 1.6e-28); larger values share the top bin."""


@dataclass(frozen=True)
class LogOddsGrid:
    """Uniform grid of ``bins`` bins on ``[lo, hi)`` for confidence log-odds."""

    lo: float
    hi: float
    bins: int

    @property
    def step(self) -> float:
        """Bin width."""
        return (self.hi - self.lo) / self.bins

    @classmethod
    def for_classes(cls, num_classes: int, bins: int = LOGODDS_BINS) -> LogOddsGrid:
        """The grid for ``C`` classes: the top class's log-odds is at least ``-log(C - 1)``."""
        lowest = -math.log(max(num_classes - 1, 1))
        return cls(float(math.floor(lowest) - 1), LOGODDS_HIGH, bins)

    def index(self, logodds: torch.Tensor) -> torch.Tensor:
        """``(...)`` int64 bin of each log-odds value (clamped into the grid)."""
        pos = ((logodds.double() - self.lo) / self.step).floor()
        return pos.clamp_(0, self.bins - 1).long()

    def edge(self, k: int) -> float:
        """Lower edge of bin ``k`` (``k = bins`` gives ``hi``)."""
        return self.lo + k * self.step


def confidence_logodds(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-label and confidence log-odds of ``(C, ...)`` log-scores.

    Args:
        scores: ``(C, ...)`` logits or corrected log-scores (need not be normalised).

    Returns:
        ``pred`` ``(...)`` int64 argmax and ``logodds`` ``(...)`` float32, with
        ``sigmoid(logodds)`` the top entry of ``softmax(scores, 0)``.
    """
    if scores.dim() < 1 or scores.shape[0] < 2:
        raise ValueError(f"expected (C, ...) scores with C >= 2, got {tuple(scores.shape)}")
    top, pred = scores.max(dim=0)
    others = scores.scatter(0, pred.unsqueeze(0), float("-inf"))
    return pred, (top - torch.logsumexp(others, dim=0)).float()


def confidence(logodds: torch.Tensor) -> torch.Tensor:
    """Top-class softmax confidence ``sigmoid(logodds)``."""
    return torch.sigmoid(logodds)


def kept_confidence(labels: torch.Tensor, logodds: torch.Tensor) -> torch.Tensor:
    """Per-pixel quality weights of a pseudo-label map: the confidence of the kept class.

    Args:
        labels: ``(...)`` pseudo-labels from :func:`select` (255 = ignore).
        logodds: ``(...)`` confidence log-odds of the scores the labels were chosen from.

    Returns:
        ``(...)`` float32 ``sigmoid(logodds)`` (the top entry of the softmax of the scores), and
        0 where the label is ignore.
    """
    weights = confidence(logodds.float())
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(weights), weights)


def logodds_of(probability: float) -> float:
    """``log(p / (1 - p))`` with ``-inf`` at 0 and ``inf`` at 1."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"a confidence must lie in [0, 1], got {probability}")
    if probability == 0.0:
        return float("-inf")
    if probability == 1.0:
        return float("inf")
    return math.log(probability / (1.0 - probability))


class ConfidenceHistogram:
    """Streaming per-class histograms of confidence log-odds (pass 1 of ``keep_portion``).

    Args:
        num_classes: ``C``.
        grid: The log-odds grid (default :meth:`LogOddsGrid.for_classes`).
        device: Where counts accumulate.
    """

    def __init__(
        self,
        num_classes: int,
        grid: LogOddsGrid | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_classes = num_classes
        self.grid = grid or LogOddsGrid.for_classes(num_classes)
        self._counts = torch.zeros(
            num_classes * self.grid.bins, dtype=torch.int64, device=torch.device(device)
        )

    def update(self, pred: torch.Tensor, logodds: torch.Tensor) -> None:
        """Add pixels.

        Args:
            pred: ``(...)`` int64 pseudo-labels in ``0 .. C-1``.
            logodds: ``(...)`` their confidence log-odds.
        """
        if pred.shape != logodds.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and logodds {tuple(logodds.shape)} differ")
        index = pred.reshape(-1).long() * self.grid.bins + self.grid.index(logodds.reshape(-1))
        self._counts += torch.bincount(
            index.to(self._counts.device), minlength=self._counts.numel()
        )

    def merge(self, other: ConfidenceHistogram) -> None:
        """Add another histogram's counts (same classes and grid)."""
        if other.grid != self.grid or other.num_classes != self.num_classes:
            raise ValueError("cannot merge confidence histograms of other grids or class counts")
        self._counts += other._counts.to(self._counts.device)

    def reset(self) -> None:
        """Set every count to zero."""
        self._counts.zero_()

    def counts(self) -> np.ndarray:
        """``(C, B)`` int64 counts ``[class, log-odds bin]``."""
        return self._counts.reshape(self.num_classes, self.grid.bins).cpu().numpy()


@dataclass
class KeepThresholds:
    """Per-class thresholds of a class-balanced selection.

    Attributes:
        portion: The requested ``P``.
        bins: ``(C,)`` int64: keep a pixel of class ``c`` iff its log-odds bin is ``>= bins[c]``.
        logodds: ``(C,)`` float64 lower edge of the threshold bin (``-inf`` when all are kept).
        kept: ``(C,)`` int64 pixels kept per class (exact, from the histograms).
        pixels: ``(C,)`` int64 pixels per class.
    """

    portion: float
    bins: np.ndarray
    logodds: np.ndarray
    kept: np.ndarray
    pixels: np.ndarray

    @property
    def confidence(self) -> np.ndarray:
        """``(C,)`` float64 confidence thresholds ``sigmoid(logodds)``."""
        return 1.0 / (1.0 + np.exp(-self.logodds))

    @property
    def kept_fraction(self) -> np.ndarray:
        """``(C,)`` float64 achieved kept fraction (NaN for classes without pixels)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.pixels > 0, self.kept / np.maximum(self.pixels, 1), np.nan)


def keep_thresholds(counts: np.ndarray, grid: LogOddsGrid, portion: float) -> KeepThresholds:
    """Per-class bins keeping the ``portion`` most confident pixels of every class.

    For class ``c`` with histogram ``h`` and ``n`` pixels, the threshold bin ``k`` minimises
    ``|sum_{b >= k} h[b] - portion * n|`` (the smallest such ``k`` on ties, i.e. keep more).

    Args:
        counts: ``(C, B)`` histograms from :class:`ConfidenceHistogram`.
        grid: Their grid.
        portion: ``P`` in ``[0, 1]``.

    Returns:
        The thresholds.
    """
    if not 0.0 <= portion <= 1.0:
        raise ValueError(f"keep portion must lie in [0, 1], got {portion}")
    if counts.ndim != 2 or counts.shape[1] != grid.bins:
        raise ValueError(f"expected (C, {grid.bins}) counts, got {counts.shape}")
    suffix = np.concatenate(
        [np.cumsum(counts[:, ::-1], axis=1)[:, ::-1], np.zeros((counts.shape[0], 1), np.int64)],
        axis=1,
    )  # (C, B + 1): pixels in bins >= k
    pixels = suffix[:, 0]
    bins = np.abs(suffix - portion * pixels[:, None]).argmin(axis=1)
    edges = np.array([grid.edge(int(k)) if k > 0 else -np.inf for k in bins])
    kept = suffix[np.arange(counts.shape[0]), bins]
    return KeepThresholds(portion, bins.astype(np.int64), edges, kept.astype(np.int64), pixels)


def select(
    pred: torch.Tensor,
    logodds: torch.Tensor,
    *,
    min_confidence: float | None = None,
    thresholds: KeepThresholds | None = None,
    grid: LogOddsGrid | None = None,
) -> torch.Tensor:
    """Pseudo-labels with ignore (255) where a pixel is not selected.

    A pixel is kept when its confidence is at least ``min_confidence`` *and*, with
    ``thresholds``, its log-odds bin reaches its class's threshold bin.

    Args:
        pred: ``(...)`` int64 pseudo-labels.
        logodds: ``(...)`` confidence log-odds.
        min_confidence: Smallest confidence kept, or None.
        thresholds: Class-balanced thresholds, or None.
        grid: The grid of ``thresholds`` (required with them).

    Returns:
        ``(...)`` uint8 labels, 255 = ignore.
    """
    keep = torch.ones_like(pred, dtype=torch.bool)
    if min_confidence is not None:
        keep &= logodds >= logodds_of(min_confidence)
    if thresholds is not None:
        if grid is None:
            raise ValueError("select: thresholds need their grid")
        need = torch.as_tensor(thresholds.bins, device=pred.device)[pred]
        keep &= grid.index(logodds) >= need
    out = pred.to(torch.uint8)
    return torch.where(keep, out, torch.full_like(out, IGNORE_INDEX))


def transitions(before: torch.Tensor, after: torch.Tensor, num_classes: int) -> np.ndarray:
    """Class-to-class pixel flow between two label maps, ignore (255) as an extra class.

    Args:
        before: ``(...)`` labels in ``0 .. C-1`` or 255.
        after: ``(...)`` labels in ``0 .. C-1`` or 255, same shape.
        num_classes: ``C``.

    Returns:
        ``(C + 1, C + 1)`` int64 counts ``[before, after]``; index ``C`` is ignore. The diagonal
        holds unchanged pixels, the rest the flow of changed ones.
    """
    if before.shape != after.shape:
        raise ValueError(
            f"label maps differ in shape: {tuple(before.shape)} vs {tuple(after.shape)}"
        )
    c = num_classes
    a, b = _with_ignore_as(before, c), _with_ignore_as(after, c).to(before.device)
    flat = (a * (c + 1) + b).reshape(-1)
    return torch.bincount(flat, minlength=(c + 1) ** 2).reshape(c + 1, c + 1).cpu().numpy()


def _with_ignore_as(labels: torch.Tensor, c: int) -> torch.Tensor:
    """int64 labels with 255 replaced by ``c``; other values outside ``0 .. C-1`` raise."""
    x = labels.long()
    x = torch.where(x == IGNORE_INDEX, torch.full_like(x, c), x)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) > c):
        raise ValueError(f"label values outside 0..{c - 1} and {IGNORE_INDEX}")
    return x
