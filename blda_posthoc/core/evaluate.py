"""Segmentation metrics: a streaming confusion matrix, its summary and calibration error.

Everything here takes arrays or tensors and returns numbers; nothing sees paths or files.
Accumulators follow an ``update`` / ``merge`` / ``compute`` split, so a dataset can be streamed
image by image (or sharded and merged) and gives the same result as one pass over all pixels.

Shape legend: ``C`` classes, ``N`` pixels, ``B`` calibration bins, ``...`` any shape.

Confusion-matrix layout: ``(C, C + 1)`` int64 counts; row ``c`` is the true class, column ``l``
the predicted class, and the last column counts valid pixels whose prediction lies outside
``0 .. C-1`` (always wrong: a false negative of the row's class, a false positive of no class).
A prediction equal to the ignore value (255) is such a pixel by default; with
``ignore_pred_ignore=True`` it is skipped like an ignored label instead (the convention for
pseudo-labels, whose 255 means "no label here"). Definitions: docs/metrics.md.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch

from blda_posthoc.core.classes import IGNORE_INDEX

ArrayLike = np.ndarray | torch.Tensor


class Summary(TypedDict):
    """Metrics of one confusion matrix; percentages are in percent, undefined values are None.

    Per-class lists have one entry per class ``0 .. C-1``.
    """

    num_classes: int
    num_pixels: int
    miou: float | None
    macc: float | None
    pixel_acc: float | None
    iou_std: float | None
    iou: list[float | None]
    acc: list[float | None]
    bias: list[float | None]
    pred_true_ratio: list[float | None]
    labelled_pixels: list[int]
    predicted_pixels: list[int]
    out_of_range_pixels: int


def _flat_int64(values: ArrayLike, what: str) -> torch.Tensor:
    """Return ``values`` as a flat int64 tensor (on its own device for tensors)."""
    if isinstance(values, np.ndarray):
        if not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
            raise ValueError(f"{what} must hold integer class ids, got dtype {values.dtype}")
        return torch.from_numpy(np.ascontiguousarray(values).astype(np.int64, copy=False)).ravel()
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex():
            raise ValueError(f"{what} must hold integer class ids, got dtype {values.dtype}")
        return values.reshape(-1).to(torch.int64)
    raise TypeError(f"{what} must be a numpy array or a torch tensor, got {type(values).__name__}")


class ConfusionMatrix:
    """Streaming confusion matrix over images of any size.

    Args:
        num_classes: Number of classes ``C`` (ids ``0 .. C-1``).
        ignore_index: Label value that marks pixels to skip.
        ignore_pred_ignore: Also skip pixels whose *prediction* is ``ignore_index`` (counted in
            :attr:`ignored_pred_pixels`); by default such a prediction is wrong, like any id
            outside ``0 .. C-1``.

    Attributes:
        matrix: ``(C, C + 1)`` int64 counts (see the module docstring).
        ignored_pred_pixels: Labelled (non-ignored) pixels skipped because their prediction was
            ``ignore_index`` (always 0 unless ``ignore_pred_ignore``).

    Example:
        >>> cm = ConfusionMatrix(3)
        >>> cm.update(np.array([0, 1, 2]), np.array([0, 1, 1]))
        >>> summarize(cm.compute())["pixel_acc"]
        66.66666666666667
        >>> skip = ConfusionMatrix(3, ignore_pred_ignore=True)
        >>> skip.update(np.array([0, 255, 2]), np.array([0, 1, 1]))
        >>> summarize(skip.compute())["pixel_acc"], skip.ignored_pred_pixels
        (50.0, 1)
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        *,
        ignore_pred_ignore: bool = False,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id 0..C-1")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.ignore_pred_ignore = ignore_pred_ignore
        self.matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
        self.ignored_pred_pixels = 0

    def update(self, pred: ArrayLike, label: ArrayLike) -> None:
        """Add the pixels of one batch.

        Args:
            pred: ``(...)`` predicted class ids (numpy or torch, any integer dtype).
            label: ``(...)`` true class ids, same shape; ``ignore_index`` pixels are skipped
                (and, with ``ignore_pred_ignore``, pixels predicted as ``ignore_index``).

        Raises:
            ValueError: shapes differ, or a label outside ``0 .. C-1`` that is not ignored.
        """
        if tuple(pred.shape) != tuple(label.shape):
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} differs from label shape "
                f"{tuple(label.shape)}"
            )
        c = self.num_classes
        p = _flat_int64(pred, "prediction")
        y = _flat_int64(label, "label").to(p.device)
        keep = y != self.ignore_index
        p, y = p[keep], y[keep]
        if self.ignore_pred_ignore:
            predicted = p != self.ignore_index
            self.ignored_pred_pixels += int(p.numel() - int(predicted.sum()))
            p, y = p[predicted], y[predicted]
        if y.numel() == 0:
            return
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= c:
            bad = low if low < 0 else high
            raise ValueError(
                f"label value {bad} is outside 0..{c - 1} and is not the ignore value "
                f"{self.ignore_index}"
            )
        p = torch.where((p < 0) | (p >= c), torch.full_like(p, c), p)
        counts = torch.bincount(y * (c + 1) + p, minlength=c * (c + 1))
        self.matrix += counts.cpu().numpy().reshape(c, c + 1)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another accumulator's counts (e.g. from another shard); returns ``self``."""
        if (
            other.num_classes != self.num_classes
            or other.ignore_index != self.ignore_index
            or other.ignore_pred_ignore != self.ignore_pred_ignore
        ):
            raise ValueError(
                f"cannot merge a {other.num_classes}-class confusion matrix into a "
                f"{self.num_classes}-class one (or their ignore settings differ)"
            )
        self.matrix += other.matrix
        self.ignored_pred_pixels += other.ignored_pred_pixels
        return self

    def compute(self) -> np.ndarray:
        """Return the ``(C, C + 1)`` int64 counts (a copy)."""
        return self.matrix.copy()

    def largest_id(self) -> int:
        """Largest class id seen in labels or in-range predictions; -1 when none was seen."""
        seen = np.nonzero(self.matrix[:, : self.num_classes].sum(0) + self.matrix.sum(1))[0]
        return int(seen.max()) if seen.size else -1

    def resized(self, num_classes: int) -> ConfusionMatrix:
        """Return a copy with fewer classes; predictions beyond the new range become wrong.

        Args:
            num_classes: New ``C'`` <= ``C``.

        Raises:
            ValueError: ``C'`` is larger than ``C`` or some label lies at ``C'`` or above.
        """
        c = self.num_classes
        if not 1 <= num_classes <= c:
            raise ValueError(f"cannot resize a {c}-class confusion matrix to {num_classes}")
        if self.matrix[num_classes:].any():
            raise ValueError(
                f"labels hold class ids up to {self.largest_label()}, beyond 0..{num_classes - 1}"
            )
        out = ConfusionMatrix(
            num_classes, self.ignore_index, ignore_pred_ignore=self.ignore_pred_ignore
        )
        out.ignored_pred_pixels = self.ignored_pred_pixels
        out.matrix[:, :num_classes] = self.matrix[:num_classes, :num_classes]
        out.matrix[:, num_classes] = self.matrix[:num_classes, num_classes:].sum(1)
        return out

    def largest_label(self) -> int:
        """Largest class id seen in the labels; -1 when none was seen."""
        rows = np.nonzero(self.matrix.sum(1))[0]
        return int(rows.max()) if rows.size else -1


def _check_confusion(confusion: np.ndarray) -> np.ndarray:
    """Accept ``(C, C)`` or ``(C, C + 1)`` counts; return ``(C, C + 1)`` float64."""
    m = np.asarray(confusion)
    if m.ndim != 2 or m.shape[1] not in (m.shape[0], m.shape[0] + 1) or m.shape[0] < 1:
        raise ValueError(f"expected a (C, C) or (C, C + 1) confusion matrix, got {m.shape}")
    if (m < 0).any():
        raise ValueError("confusion matrix has negative counts")
    if m.shape[1] == m.shape[0]:
        m = np.concatenate([m, np.zeros((m.shape[0], 1), dtype=m.dtype)], axis=1)
    return m.astype(np.float64)


def _percent_or_none(values: np.ndarray, defined: np.ndarray) -> list[float | None]:
    """``100 * values`` where ``defined``, else None."""
    return [float(100.0 * v) if d else None for v, d in zip(values, defined, strict=True)]


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def summarize(confusion: np.ndarray) -> Summary:
    """Per-class and mean metrics of a confusion matrix.

    - IoU(c) = TP / (TP + FP + FN); undefined when class c is neither labelled nor predicted
      (excluded from mIoU, not counted as 0); 0 when predicted but never labelled.
    - Acc(c) = TP / labelled pixels of c (recall); undefined when c is not labelled.
    - Bias(l) = (1/C') * sum_c P(pred = l | y = c) - 1/C', the sum running over the C' classes
      present in the labels (docs/metrics.md), in percentage points; undefined for a class
      not present in the labels. Positive: over-predicted.
    - pred/true ratio(c) = predicted pixels of c / labelled pixels of c (valid pixels only);
      undefined when c is not labelled.
    - IoU std: population standard deviation of the defined IoUs.

    Args:
        confusion: ``(C, C)`` or ``(C, C + 1)`` counts, rows true, columns predicted (the optional
            last column: valid pixels predicted outside ``0 .. C-1``).

    Returns:
        A :class:`Summary`; percentages in percent, undefined values None.
    """
    m = _check_confusion(confusion)
    c = m.shape[0]
    tp = np.diag(m[:, :c])
    labelled = m.sum(1)
    predicted = m[:, :c].sum(0)
    union = labelled + predicted - tp
    total = labelled.sum()
    has_union, has_label = union > 0, labelled > 0
    iou = np.divide(tp, union, out=np.zeros(c), where=has_union)
    acc = np.divide(tp, labelled, out=np.zeros(c), where=has_label)
    ratio = np.divide(predicted, labelled, out=np.zeros(c), where=has_label)
    present = int(has_label.sum())
    if present:
        rates = m[has_label, :c] / labelled[has_label, None]
        bias = rates.sum(0) / present - 1.0 / present
    else:
        bias = np.zeros(c)
    defined_iou = 100.0 * iou[has_union]
    return Summary(
        num_classes=c,
        num_pixels=int(total),
        miou=_mean_or_none(defined_iou),
        macc=_mean_or_none(100.0 * acc[has_label]),
        pixel_acc=float(100.0 * tp.sum() / total) if total > 0 else None,
        iou_std=float(defined_iou.std()) if defined_iou.size else None,
        iou=_percent_or_none(iou, has_union),
        acc=_percent_or_none(acc, has_label),
        bias=_percent_or_none(bias, has_label),
        pred_true_ratio=[float(r) if d else None for r, d in zip(ratio, has_label, strict=True)],
        labelled_pixels=[int(v) for v in labelled],
        predicted_pixels=[int(v) for v in predicted],
        out_of_range_pixels=int(m[:, c].sum()),
    )


class CalibrationError:
    """Streaming top-1 expected calibration error with equal-width confidence bins.

    ``ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b|`` over bins ``((b-1)/B, b/B]``
    (confidence 0 falls in the first bin).

    Args:
        num_bins: Number of bins ``B``.
        ignore_index: Label value of pixels to skip in :meth:`update`.
    """

    def __init__(self, num_bins: int = 15, ignore_index: int = IGNORE_INDEX) -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be at least 1, got {num_bins}")
        self.num_bins = num_bins
        self.ignore_index = ignore_index
        self.count = np.zeros(num_bins, dtype=np.int64)
        self.confidence_sum = np.zeros(num_bins, dtype=np.float64)
        self.correct_sum = np.zeros(num_bins, dtype=np.int64)

    def update(self, probs: torch.Tensor | np.ndarray, label: ArrayLike) -> None:
        """Add pixels given class probabilities.

        Args:
            probs: ``(N, C)`` probabilities (rows sum to 1).
            label: ``(N,)`` true class ids; ``ignore_index`` pixels are skipped.
        """
        p = torch.as_tensor(probs)
        if p.ndim != 2 or p.shape[0] != label.shape[0] or label.ndim != 1:
            raise ValueError(
                f"expected (N, C) probabilities and (N,) labels, got {tuple(p.shape)} and "
                f"{tuple(label.shape)}"
            )
        y = _flat_int64(label, "label").to(p.device)
        keep = y != self.ignore_index
        confidence, pred = p[keep].max(dim=1)
        self.update_confidence(confidence, pred == y[keep])

    def update_confidence(self, confidence: ArrayLike, correct: ArrayLike) -> None:
        """Add pixels given their top-1 confidence and whether the top-1 class is right.

        Args:
            confidence: ``(N,)`` top-1 probabilities in ``[0, 1]``.
            correct: ``(N,)`` booleans (or 0/1).
        """
        conf = torch.as_tensor(confidence).reshape(-1).to(torch.float64)
        right = torch.as_tensor(correct).reshape(-1).to(conf.device, torch.bool)
        if conf.shape != right.shape:
            raise ValueError(
                f"confidence has {conf.numel()} entries but correctness has {right.numel()}"
            )
        if conf.numel() and (conf.min() < 0 or conf.max() > 1 or conf.isnan().any()):
            raise ValueError("confidences must lie in [0, 1]")
        b = self.num_bins
        index = (torch.ceil(conf * b).to(torch.int64) - 1).clamp(0, b - 1)
        self.count += torch.bincount(index, minlength=b).cpu().numpy()
        self.confidence_sum += torch.bincount(index, conf, minlength=b).cpu().numpy()
        self.correct_sum += torch.bincount(index[right], minlength=b).cpu().numpy()

    def merge(self, other: CalibrationError) -> CalibrationError:
        """Add another accumulator's bins; returns ``self``."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"cannot merge {other.num_bins} bins into {self.num_bins}")
        self.count += other.count
        self.confidence_sum += other.confidence_sum
        self.correct_sum += other.correct_sum
        return self

    def compute(self) -> float | None:
        """Return the ECE in percent, or None when no pixel was added."""
        total = int(self.count.sum())
        if total == 0:
            return None
        filled = self.count > 0
        n = self.count[filled].astype(np.float64)
        gap = np.abs(self.correct_sum[filled] / n - self.confidence_sum[filled] / n)
        return float(100.0 * (n * gap).sum() / total)


def softmax_confidence(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 softmax probability and class of ``(C, ...)`` scores along the class axis.

    Args:
        scores: ``(C, ...)`` logits or log-scores.

    Returns:
        ``(...)`` float confidence and ``(...)`` int64 class.
    """
    top, pred = scores.max(dim=0)
    confidence = 1.0 / torch.exp(scores - top.unsqueeze(0)).sum(dim=0)
    return confidence, pred
