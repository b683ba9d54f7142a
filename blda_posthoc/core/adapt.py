"""Adapt a correction to the target without labels: self-calibration and predicted-share checks.

Target self-calibration (one round): a corrected prediction of a target pixel sample gives
pseudo-labels; the confident ones are kept class by class (the same portion of each predicted
class, so frequent classes do not crowd out rare ones); a per-class affine map ``a * z + b``
(vector scaling) is fitted on the *raw* target logits against them by cross-entropy. Fitting
on one's own predictions can confirm their errors, so the fit is guarded: an L2 pull towards
the identity, and a shrink of the map towards the identity until no class's predicted share on
the sample changes by more than :data:`MAX_SHARE_FACTOR` (:func:`guard_shrink`).

Shape legend: N pixels, C classes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from blda_posthoc.core.calibrate import fit_calibration

MAX_SHARE_FACTOR = 10.0
"""A correction that multiplies or divides a class's predicted share by more than this is
treated as a collapse (warned about by ``correct`` / ``relabel``; refused by the guard)."""
SHARE_FLOOR = 1e-3
"""The guard's floor: shares below this count as this much when the guard compares shares (a
class predicted on no pixel of the sample is not infinitely far from one predicted on a few).
The self-calibrate figures of docs/methods.md were measured with it."""
WARN_SHARE_FLOOR = 1e-5
"""The collapse warning's floor for a share that falls, at its lowest: the warning counts a share
below one pixel of the sample it checks (or below this, on a sample of more than 100 000 pixels)
as that much when a class loses pixels, so a class predicted on 0.24 % of the pixels that a
correction removes entirely is named (with the guard's 0.1 % it changed "2.4 times" and went
unnoticed). A share that rises is still counted from 0.1 % (:data:`SHARE_FLOOR`): a class the
model predicts on one pixel of the sample that a correction brings to 85 pixels has not
collapsed, and naming it would bury the warnings that matter."""
SHRINK_STEPS = 8
"""The guard halves the map's distance to the identity at most this many times."""


def predicted_counts(scores: torch.Tensor) -> np.ndarray:
    """``(C,)`` int64 pixels per argmax class of ``(N, C)`` scores."""
    pred = scores.argmax(-1)
    return torch.bincount(pred.reshape(-1), minlength=scores.shape[-1]).cpu().numpy()


def share_factors(
    before: np.ndarray,
    after: np.ndarray,
    floor: float = SHARE_FLOOR,
    *,
    loss_floor: float | None = None,
) -> np.ndarray:
    """How many times each class's predicted share changed (>= 1, up or down).

    Args:
        before: ``(C,)`` pixel counts (or shares) per predicted class before a correction.
        after: ``(C,)`` the same after it.
        floor: Shares below ``floor`` count as ``floor``.
        loss_floor: The floor for a class whose share falls (default ``floor``): lower, it names
            a rare class that a correction removes without naming a rare class that gains.

    Returns:
        ``(C,)`` float64 ``max(q / p, p / q)`` of the shares ``p`` (before) and ``q`` (after),
        floored at ``floor`` for the rise ``q / p`` and at ``loss_floor`` for the fall ``p / q``.

    Example:
        A class of 0.24 % removed, and one going from 1 pixel in 40 000 to 85:

        >>> before, after = np.array([24.0, 0.25, 9975.75]), np.array([0.0, 21.25, 9978.75])
        >>> share_factors(before, after, loss_floor=2.5e-5).round(1)
        array([96. ,  2.1,  1. ])
    """
    p = np.asarray(before, np.float64)
    q = np.asarray(after, np.float64)
    p = p / max(p.sum(), 1e-300)
    q = q / max(q.sum(), 1e-300)
    low = floor if loss_floor is None else loss_floor
    rise = np.maximum(q, floor) / np.maximum(p, floor)
    fall = np.maximum(p, low) / np.maximum(q, low)
    return np.maximum(rise, fall)


def balanced_confident(scores: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The most confident ``keep`` portion of the pixels predicted as each class.

    Args:
        scores: ``(N, C)`` log-scores of a corrected prediction.
        keep: Portion in ``(0, 1]`` kept per predicted class (ties at the threshold are kept).

    Returns:
        ``(K,)`` indices of the kept pixels (ascending) and their ``(K,)`` predicted classes.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    probs = torch.softmax(scores.double(), dim=-1)
    conf, pred = probs.max(-1)
    kept = torch.zeros(pred.shape, dtype=torch.bool, device=pred.device)
    for c in torch.unique(pred).tolist():
        mine = pred == c
        values = conf[mine]
        # The k-th largest confidence, k = ceil(keep * n): the smallest value kept.
        k = max(1, int(np.ceil(keep * values.numel())))
        threshold = torch.topk(values, k).values[-1]
        kept |= mine & (conf >= threshold)
    index = torch.nonzero(kept).reshape(-1)
    return index, pred[index]


def self_calibration(
    z: torch.Tensor,
    scores: torch.Tensor,
    *,
    keep: float = 0.5,
    weight_decay: float = 1e-3,
    max_factor: float = MAX_SHARE_FACTOR,
) -> tuple[np.ndarray, np.ndarray, float]:
    """One round of target self-calibration, guarded (see the module docstring).

    Args:
        z: ``(N, C)`` raw target logits (a pixel sample).
        scores: ``(N, C)`` log-scores of a corrected prediction of the same pixels (the
            pseudo-labels' source).
        keep: Portion of each predicted class kept as pseudo-labels.
        weight_decay: L2 pull of the fitted scales and biases towards the identity.
        max_factor: The guard's limit on the change of any class's predicted share.

    Returns:
        ``(scale (C,), bias (C,), shrink)``: the map ``z' = scale * z + bias`` after the guard
        and the guard's factor (1: the fit as is; 0.5: half-way to the identity; 0: the
        identity).
    """
    if z.shape != scores.shape or z.ndim != 2:
        raise ValueError(f"z and scores must share one (N, C) shape, got {z.shape}, {scores.shape}")
    index, labels = balanced_confident(scores, keep)
    if index.numel() == 0:
        c = z.shape[1]
        return np.ones(c), np.zeros(c), 0.0
    fit = fit_calibration(z[index], labels, "vector", weight_decay=weight_decay)
    zd = z.double()

    def mapped(shrink: float) -> torch.Tensor:
        scale, bias = blend(fit.scale, fit.bias, shrink)
        return zd * torch.from_numpy(scale) + torch.from_numpy(bias)

    shrink = guard_shrink(predicted_counts(zd), mapped, max_factor)
    scale, bias = blend(fit.scale, fit.bias, shrink)
    return scale, bias, shrink


def guard_shrink(
    before: np.ndarray,
    mapped: Callable[[float], torch.Tensor],
    max_factor: float = MAX_SHARE_FACTOR,
) -> float:
    """How far a correction may go before it changes a class's predicted share too much.

    Tries ``shrink`` = 1, 1/2, 1/4, ... (:data:`SHRINK_STEPS` values) and keeps the first whose
    corrected scores change no class's predicted share by more than ``max_factor``
    (:func:`share_factors`).

    Args:
        before: ``(C,)`` pixel counts per class of the uncorrected (plain argmax) prediction.
        mapped: ``shrink -> (N, C)`` scores of the correction taken ``shrink`` of the way.
        max_factor: The limit on any class's change of share.

    Returns:
        The largest ``shrink`` tried that passes, or ``0.0`` (no correction) if none does.
    """
    shrink = 1.0
    for _ in range(SHRINK_STEPS):
        if share_factors(before, predicted_counts(mapped(shrink))).max() <= max_factor:
            return shrink
        shrink /= 2
    return 0.0


def blend(scale: np.ndarray, bias: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """The affine map ``tau`` of the way from the identity to ``(scale, bias)``.

    Returns:
        ``(1 + tau * (scale - 1), tau * bias)`` as float64 ``(C,)`` arrays.
    """
    s = np.asarray(scale, np.float64)
    b = np.asarray(bias, np.float64)
    return 1.0 + tau * (s - 1.0), tau * b
