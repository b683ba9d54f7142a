"""Choosing a correction: the label-free strength (``--tau auto``) and selection with few labels.

``--tau auto`` (label-free). Under label shift, the EM re-estimate of the target class priors on
source-calibrated probabilities (Saerens et al., 2002) is a consistent estimate of how often each
class occurs on the target. A bias correction should move the predicted class shares towards
those priors, and stop there: ``auto_tau`` picks, on a seeded pixel sample of the target, the
strength whose predicted shares are closest to the estimate in total variation
``TV(p, q) = 0.5 * sum_c |p_c - q_c|``. ``tau = 0`` (no correction) is always a candidate, so
the choice never strays from the plain argmax unless the shares improve.

Selection with few labels (``compare --select-on N``): a seeded draw splits the labelled images
into a selection set and a held-out set; the row with the best selection-set mIoU is chosen
among the rows that beat the plain argmax there (else the plain argmax), and every figure that
is reported comes from the held-out set.

Shape legend: S sampled pixels, C classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from blda_posthoc.core.methods import Corrector

AUTO_GRID = tuple(round(0.05 * k, 2) for k in range(21))
"""Strengths ``--tau auto`` considers: 0, 0.05, ..., 1."""
CRITERION = "total variation between predicted class shares and EM target priors"
COLLAPSE_SHARE = 0.01
COLLAPSE_FACTOR = 20.0


def em_collapsed(shares: np.ndarray, priors: np.ndarray) -> bool:
    """Whether an EM prior estimate has collapsed.

    Collapsed: a class the model predicts on at least :data:`COLLAPSE_SHARE` of the pixels gets
    an estimated prior :data:`COLLAPSE_FACTOR` times smaller (measured: a narrow model's
    estimate put 0 on a class predicted on 36 % of the pixels; working estimates stayed within
    a factor 3 of the shares of such classes).

    Args:
        shares: ``(C,)`` predicted class shares.
        priors: ``(C,)`` EM estimate.
    """
    shares, priors = np.asarray(shares, float), np.asarray(priors, float)
    frequent = shares >= COLLAPSE_SHARE
    return bool((priors[frequent] * COLLAPSE_FACTOR < shares[frequent]).any())


def predicted_shares(corrector: Corrector, z: torch.Tensor, tau: float) -> np.ndarray:
    """``(C,)`` share of the pixels ``z`` ``(S, C)`` predicted as each class after correction."""
    pred = z.argmax(-1) if corrector.is_identity(tau) else corrector.log_scores(z, tau).argmax(-1)
    counts = torch.bincount(pred, minlength=z.shape[1]).double()
    return (counts / max(int(pred.numel()), 1)).numpy()


def grid_shares(corrector: Corrector, z: torch.Tensor, grid: Sequence[float]) -> list[np.ndarray]:
    """:func:`predicted_shares` at every strength of ``grid``, the strengths evaluated together.

    A :class:`~blda_posthoc.core.rows.RowPredictor` shares the work of the strengths (for BLDA:
    one table lookup for all of them); its predictions are each strength's own, bit for bit.
    BLDA strengths go in batches whose side-by-side tables stay within the lookup-table cache
    (:data:`~blda_posthoc.core.align.CACHE_BYTES`), which holds as much already.
    """
    from blda_posthoc.core.align import CACHE_BYTES
    from blda_posthoc.core.methods import Aligned
    from blda_posthoc.core.rows import RowPredictor

    batch = len(grid)
    if isinstance(corrector, Aligned):
        batch = max(1, min(batch, CACHE_BYTES // max(1, 4 * corrector.maps.table.numel())))
    c = z.shape[1]
    shares = []
    for start in range(0, len(grid), batch):
        strengths = grid[start : start + batch]
        preds = RowPredictor([(corrector, float(t)) for t in strengths]).predict(z)
        for pred in preds:
            counts = torch.bincount(pred, minlength=c).double()
            shares.append((counts / max(int(pred.numel()), 1)).numpy())
    return shares


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """``0.5 * sum |p - q|`` of two ``(C,)`` distributions."""
    return 0.5 * float(np.abs(np.asarray(p, float) - np.asarray(q, float)).sum())


def auto_tau(
    corrector: Corrector,
    z: torch.Tensor,
    target_priors: np.ndarray,
    fallback: float,
    grid: Sequence[float] = AUTO_GRID,
) -> dict[str, Any]:
    """The strength in ``grid`` whose predicted shares are closest to ``target_priors``.

    When the estimate has collapsed (:func:`em_collapsed`: an under-confident model, a poor
    calibration), it is not trusted and ``fallback`` is kept.

    Args:
        corrector: The correction.
        z: ``(S, C)`` float32 logits of a pixel sample of the data to correct.
        target_priors: ``(C,)`` estimated class priors of that data.
        fallback: The strength kept when the estimate is not trusted.
        grid: Candidate strengths, starting at 0; ties go to the smallest.

    Returns:
        ``{"tau", "criterion", "grid", "distance", "trusted"}`` with the distance per candidate.
    """
    shares = grid_shares(corrector, z, grid)
    distances = [total_variation(p, target_priors) for p in shares]
    trusted = not em_collapsed(shares[0], target_priors)
    best = int(np.argmin(distances))
    return {
        "tau": float(grid[best]) if trusted else float(fallback),
        "criterion": CRITERION
        if trusted
        else "default kept: the EM estimate of the target priors has collapsed (a frequently "
        "predicted class got a prior 20 times smaller)",
        "grid": [float(t) for t in grid],
        "distance": [round(d, 6) for d in distances],
        "trusted": trusted,
    }


def split_names(names: Sequence[str], select_on: float, seed: int) -> tuple[list[str], list[str]]:
    """Split image names by a seeded draw into (selection, held-out), both sorted.

    Args:
        names: All labelled image names.
        select_on: A count of images (``>= 1``) or a fraction in ``(0, 1)``.
        seed: Seed of the draw.

    Returns:
        The selection set and the held-out set (neither empty).
    """
    ordered = sorted(names)
    count = int(select_on) if select_on >= 1 else math.ceil(select_on * len(ordered))
    if not 1 <= count < len(ordered):
        raise ValueError(
            f"--select-on {select_on:g} leaves no held-out image (there are {len(ordered)})"
        )
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(len(ordered), size=count, replace=False).tolist())
    select = [n for i, n in enumerate(ordered) if i in chosen]
    held = [n for i, n in enumerate(ordered) if i not in chosen]
    return select, held


def pick_best(scores: Sequence[float | None], baseline: int) -> int:
    """Index of the best score among those above ``scores[baseline]``, else ``baseline``.

    Args:
        scores: One score per row (None: undefined, never chosen).
        baseline: The row of the uncorrected prediction.
    """
    floor = scores[baseline]
    best = baseline
    for i, score in enumerate(scores):
        if score is None or floor is None:
            continue
        best_score = scores[best]
        if score > floor and (best == baseline or best_score is None or score > best_score):
            best = i
    return best
