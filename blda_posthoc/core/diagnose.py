"""Which classes does a model over- or under-predict? (docs/method.md §2, §7; docs/metrics.md).

Label-free score (the paper's observation: over-predicted classes have larger positive logits,
under-predicted ones smaller). For class ``l`` let ``X ~ M[l][l]`` be its positive logit
distribution and ``Y ~ P+`` the positive anchor, here pooled with every class weighted equally
(the mean of the normalised positive cells), so that frequent classes do not define the
reference. The score is Cliff's delta

    score(l) = P(X > Y) - P(X < Y)   in [-1, 1]

computed exactly from the histograms on the statistics' shared grid (two logits in the same bin
count as a tie). Since ``P+`` is an equal mixture, ``score(l)`` is the mean over classes ``k`` of
the pairwise delta of ``l`` against ``k``; pairwise deltas are antisymmetric, so the scores of
all classes sum to about 0: a class scores above 0 when its positive logits beat those of a
random class more often than not. The score depends only on the ranks of the logits (unchanged
by any increasing transform, no scale estimate needed). Verdict without labels:
``score >= SCORE_THRESHOLD`` over-predicted, ``<= -SCORE_THRESHOLD`` under-predicted, otherwise
balanced; ``SCORE_THRESHOLD = 0.1`` means the class's positive logit beats a random class's at
least 55 % of the time (or at most 45 %). That cut is a convention, not calibrated: on
pseudo-label statistics (cells selected by the argmax itself) the scores are compressed, so
compare classes by rank and prefer labels where any exist. A class whose positive cell holds
fewer than ``min_pixels`` pixels gets no score (``None``) and, without labels, the verdict
``unknown``.

With labels the verdict follows the exact predicted/true pixel ratio instead: below
``UNDER_RATIO = 0.7`` under-predicted, above ``OVER_RATIO = 1.3`` over-predicted, otherwise
balanced; a class predicted but never labelled is over-predicted. Bias(l) (docs/metrics.md, in
percentage points) is reported beside it, and the Spearman rank correlation between the
label-free score and Bias over the classes where both exist says how far the label-free
estimate can be trusted on this data.

Shape legend: C classes, B histogram bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blda_posthoc.core.distributions import hist_quantile
from blda_posthoc.core.evaluate import summarize
from blda_posthoc.core.fit import LogitStats

SCORE_THRESHOLD = 0.1
UNDER_RATIO = 0.7
OVER_RATIO = 1.3
OVER, UNDER, BALANCED, UNKNOWN = "over-predicted", "under-predicted", "balanced", "unknown"
UNCERTAIN = "uncertain"
NEAR_CUT = 0.1
"""An estimated ratio within 10 % of a cut (0.7 or 1.3) is too close to call without labels."""
COLLAPSED_RATIO = 20.0
"""An estimated ratio above this means EM's prior for the class has collapsed towards 0 (a model
over-predicting a class 20-fold is not what the estimate can tell apart from a collapse); the
ratio is then not reported (``n/a (EM collapsed)``, JSON null with ``em_collapsed``)."""


@dataclass
class ClassDiagnosis:
    """The diagnosis of one class.

    Attributes:
        name: Class name.
        predicted_pixels: Pixels whose plain argmax is this class.
        pred_share: ``predicted_pixels`` over all pixels.
        never_predicted: No pixel is predicted as this class.
        score: Label-free Cliff's delta of its positive logits against ``P+``, or None.
        positive_median: Median of its positive cell, or None.
        bias: Exact Bias(l) in percentage points (labels only), or None.
        pred_true_ratio: Predicted / labelled pixels (labels only), or None.
        verdict: ``over-predicted``, ``under-predicted``, ``balanced``, ``uncertain`` or
            ``unknown``.
        decided_by: ``labels``, ``label-free`` or None (unknown).
        estimated_ratio: Label-free predicted / estimated-true ratio (predicted share over the
            EM estimate of the class prior), or None without an estimate or when EM's prior
            for the class has collapsed.
        em_collapsed: EM's prior for the class has collapsed (a predicted class got a prior
            :data:`COLLAPSED_RATIO` times smaller than its share, or 0): no estimated ratio.
        label_free_verdict: The verdict without labels (also when labels decide ``verdict``,
            so that the two can be compared).
    """

    name: str
    predicted_pixels: int
    pred_share: float
    never_predicted: bool
    score: float | None
    positive_median: float | None
    bias: float | None
    pred_true_ratio: float | None
    verdict: str
    decided_by: str | None
    estimated_ratio: float | None = None
    label_free_verdict: str = UNKNOWN
    em_collapsed: bool = False


@dataclass
class Diagnosis:
    """A whole report.

    Attributes:
        classes: One entry per class.
        anchor_median: Median of the class-balanced positive anchor.
        rank_correlation: Spearman correlation of score and Bias, or None (no labels or fewer
            than 3 classes with both).
        has_labels: Whether exact Bias and ratios were available.
    """

    classes: list[ClassDiagnosis]
    anchor_median: float
    rank_correlation: float | None
    has_labels: bool


def positive_dominance(cells: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """Cliff's delta ``P(X > Y) - P(X < Y)`` of histograms against one reference histogram.

    Args:
        cells: ``(M, B)`` histograms of ``X`` (one per row).
        anchor: ``(B,)`` histogram of ``Y`` on the same grid.

    Returns:
        ``(M,)`` float64 in ``[-1, 1]``; NaN for empty rows (or an empty anchor).
    """
    q = anchor / max(anchor.sum(), 1)
    below = np.concatenate([[0.0], np.cumsum(q)[:-1]])  # P(Y in a lower bin)
    above = q.sum() - below - q  # P(Y in a higher bin)
    n = cells.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = (cells * (below - above)).sum(-1) / n
    return np.where((n > 0) & (anchor.sum() > 0), delta, np.nan)


def balanced_anchor(positive: np.ndarray) -> np.ndarray:
    """The positive anchor with every class weighted equally: ``(B,)`` mean of normalised rows.

    Args:
        positive: ``(M, B)`` non-empty positive-cell histograms.
    """
    return (positive / positive.sum(-1, keepdims=True)).mean(0)


def ratio_verdict(ratio: float | None, predicted: int) -> str | None:
    """Verdict from the predicted/true ratio; None when the class is neither labelled nor seen."""
    if ratio is None:
        return OVER if predicted > 0 else None
    if ratio < UNDER_RATIO:
        return UNDER
    if ratio > OVER_RATIO:
        return OVER
    return BALANCED


def score_verdict(score: float | None, threshold: float = SCORE_THRESHOLD) -> str:
    """Verdict from the label-free score."""
    if score is None:
        return UNKNOWN
    if score >= threshold:
        return OVER
    if score <= -threshold:
        return UNDER
    return BALANCED


def estimate_verdict(ratio: float | None, score: float | None) -> str:
    """Label-free verdict: the estimated ratio and the logit score must agree.

    Neither signal is reliable alone (measured: the score's verdict matched the labelled one for
    4 of 10 demo classes, and the EM prior estimate inherits the model's own bias under domain
    shift), so a verdict is given only where both point the same way; elsewhere ``uncertain``.
    The estimated ratio uses the exact ratio's cuts and is ``uncertain`` within
    :data:`NEAR_CUT` of a cut. Without a ratio the score decides alone.
    """
    by_score = score_verdict(score)
    if ratio is None:
        return by_score
    if any(abs(ratio - cut) <= NEAR_CUT * cut for cut in (UNDER_RATIO, OVER_RATIO)):
        return UNCERTAIN
    by_ratio = ratio_verdict(ratio, 1)
    return by_ratio if by_ratio == by_score else UNCERTAIN


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with < 3 points or no spread."""
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"expected two equal 1-D arrays, got {x.shape} and {y.shape}")
    if x.size < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(1, values.size + 1)
    for v in np.unique(values):
        tied = values == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def diagnose(
    stats: LogitStats,
    predicted: np.ndarray,
    confusion: np.ndarray | None = None,
    *,
    threshold: float = SCORE_THRESHOLD,
    min_pixels: int | None = None,
    target_priors: np.ndarray | None = None,
) -> Diagnosis:
    """Diagnose every class.

    Args:
        stats: Logit statistics whose positive cells and anchor give the label-free score.
        predicted: ``(C,)`` pixels per predicted (plain argmax) class.
        confusion: ``(C, C)`` or ``(C, C + 1)`` counts, rows true, columns predicted, or None
            without labels.
        threshold: ``|score|`` from which a class is called over- or under-predicted.
        min_pixels: Positive cells with fewer pixels get no score (default: the statistics'
            own ``min_pixels``, else 100).
        target_priors: ``(C,)`` label-free estimate of the class priors of the data (EM on
            calibrated probabilities); with it, the label-free verdict follows the estimated
            ratio (see :func:`estimate_verdict`).

    Returns:
        The diagnosis.
    """
    c = stats.num_classes
    predicted = np.asarray(predicted, dtype=np.int64)
    if predicted.shape != (c,):
        raise ValueError(f"expected ({c},) predicted counts, got {predicted.shape}")
    if min_pixels is None:
        min_pixels = int(stats.settings.get("min_pixels", 100))
    positive = stats.counts[np.arange(c), np.arange(c)]  # (C, B)
    usable = positive.sum(-1) >= max(min_pixels, 1)
    anchor = balanced_anchor(positive[usable]) if usable.any() else stats.anchor_counts[0]
    scores = positive_dominance(positive, anchor)
    medians = _medians(stats, positive, usable)
    anchor_median = float(hist_quantile(stats.grid.edges, anchor[None], np.array([[0.5]]))[0, 0])
    summary = summarize(confusion) if confusion is not None else None
    total = max(int(predicted.sum()), 1)
    classes = []
    for k, name in enumerate(stats.class_names):
        score = float(scores[k]) if usable[k] else None
        ratio = summary["pred_true_ratio"][k] if summary else None
        estimated, collapsed = None, False
        if target_priors is not None and predicted[k] > 0:
            share = predicted[k] / total
            collapsed = bool(target_priors[k] * COLLAPSED_RATIO < share)
            estimated = None if collapsed else float(share / target_priors[k])
        elif target_priors is not None and target_priors[k] > 0:
            estimated = 0.0
        label_free = (
            estimate_verdict(estimated, score)
            if target_priors is not None
            else score_verdict(score, threshold)
        )
        verdict, decided_by = label_free, "label-free"
        by_ratio = ratio_verdict(ratio, int(predicted[k])) if summary else None
        if by_ratio is not None:
            verdict, decided_by = by_ratio, "labels"
        classes.append(
            ClassDiagnosis(
                name=name,
                predicted_pixels=int(predicted[k]),
                pred_share=float(predicted[k] / total),
                never_predicted=bool(predicted[k] == 0),
                score=score,
                positive_median=medians[k],
                bias=summary["bias"][k] if summary else None,
                pred_true_ratio=ratio,
                verdict=verdict,
                decided_by=None if verdict == UNKNOWN else decided_by,
                estimated_ratio=estimated,
                label_free_verdict=label_free,
                em_collapsed=collapsed,
            )
        )
    return Diagnosis(classes, anchor_median, _score_bias_correlation(classes), summary is not None)


def _medians(stats: LogitStats, positive: np.ndarray, usable: np.ndarray) -> list[float | None]:
    out: list[float | None] = [None] * stats.num_classes
    rows = np.flatnonzero(usable)
    if rows.size:
        u = np.full((rows.size, 1), 0.5)
        values = hist_quantile(stats.grid.edges, positive[rows], u)[:, 0]
        for row, value in zip(rows, values, strict=True):
            out[int(row)] = float(value)
    return out


def _score_bias_correlation(classes: list[ClassDiagnosis]) -> float | None:
    pairs = [(d.score, d.bias) for d in classes if d.score is not None and d.bias is not None]
    if not pairs:
        return None
    x, y = (np.array(v, dtype=np.float64) for v in zip(*pairs, strict=True))
    return spearman(x, y)
