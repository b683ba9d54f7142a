"""CDFs and quantiles of the fitted 1-D logit distributions (histograms and mixtures).

Shape legend: C classes, B bins, G grid points, K mixture components, M rows, Q queries per row.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from blda_posthoc.core.fit import LogitStats, Mixture


def hist_cdf(counts: np.ndarray) -> np.ndarray:
    """Empirical CDF at the bin edges, linear within a bin.

    Args:
        counts: ``(..., B)`` histograms.

    Returns:
        ``(..., B + 1)`` float64, 0 at the first edge and 1 at the last (all 0 for empty rows).
    """
    total = counts.sum(-1, keepdims=True)
    cum = np.concatenate([np.zeros_like(total), np.cumsum(counts, -1)], axis=-1)
    return np.where(total > 0, cum / np.maximum(total, 1), 0.0)


def mixture_cdf(mix: Mixture, x: np.ndarray) -> np.ndarray:
    """CDF of mixtures ``sum_k w_k Phi((x - mu_k) / sigma_k)``.

    Args:
        mix: Mixtures with arrays ``(..., K)``.
        x: ``(G,)`` points.

    Returns:
        ``(..., G)`` float64.
    """
    z = (x - mix.means[..., None]) / (mix.sigmas[..., None] * math.sqrt(2.0))
    phi = 0.5 * (1.0 + torch.special.erf(torch.as_tensor(z, dtype=torch.float64)).numpy())
    return (mix.weights[..., None] * phi).sum(-2)


def hist_quantile(edges: np.ndarray, counts: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hist_cdf`: the smallest ``z`` with ``F(z) >= u``, linear within a bin.

    Args:
        edges: ``(B + 1,)`` bin edges.
        counts: ``(M, B)`` non-empty histograms.
        u: ``(M, Q)`` levels in ``(0, 1)``.

    Returns:
        ``(M, Q)`` float64 logits.
    """
    cdf = torch.as_tensor(hist_cdf(counts))
    uu = torch.as_tensor(u, dtype=torch.float64)
    k = torch.searchsorted(cdf.contiguous(), uu.contiguous(), side="left")
    k = k.clamp(1, cdf.shape[-1] - 1)
    c0, c1 = cdf.gather(-1, k - 1), cdf.gather(-1, k)
    frac = ((uu - c0) / (c1 - c0).clamp_min(1e-300)).clamp(0, 1)
    e = torch.as_tensor(edges, dtype=torch.float64)
    return (e[k - 1] + frac * (e[k] - e[k - 1])).numpy()


def mixture_quantile(mix: Mixture, u: np.ndarray, iterations: int = 80) -> np.ndarray:
    """Inverse mixture CDF by bisection.

    Args:
        mix: Mixtures with arrays ``(M, K)``.
        u: ``(M, Q)`` levels in ``(0, 1)``.
        iterations: Bisection steps (80 halve any bracket below float64 precision).

    Returns:
        ``(M, Q)`` float64 logits.
    """
    spread = 12.0 * mix.sigmas.max(-1, keepdims=True)
    lo = np.broadcast_to(mix.means.min(-1, keepdims=True) - spread, u.shape).copy()
    hi = np.broadcast_to(mix.means.max(-1, keepdims=True) + spread, u.shape).copy()
    for _ in range(iterations):
        mid = (lo + hi) / 2
        below = _mixture_cdf_rows(mix, mid) < u
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return (lo + hi) / 2


def _mixture_cdf_rows(mix: Mixture, x: np.ndarray) -> np.ndarray:
    """Mixture CDF at row-specific points: mixtures ``(M, K)``, ``x`` ``(M, Q)`` -> ``(M, Q)``."""
    z = (x[:, :, None] - mix.means[:, None, :]) / (mix.sigmas[:, None, :] * math.sqrt(2.0))
    phi = 0.5 * (1.0 + torch.special.erf(torch.as_tensor(z)).numpy())
    return (mix.weights[:, None, :] * phi).sum(-1)


def cell_cdfs(
    stats: LogitStats, at: np.ndarray | None = None, cells: slice | None = None
) -> np.ndarray:
    """Every cell's CDF at the statistics' grid edges (or at the points ``at``).

    Args:
        stats: The statistics.
        at: ``(G,)`` points; default ``stats.grid.edges``.
        cells: Only these cells of the flattened ``C * C`` (row-major ``i * C + j``), as
            ``(R, G)``; each cell's CDF does not depend on the others. Default all.

    Returns:
        ``(C, C, G)`` float64, or ``(R, G)`` with ``cells``.
    """
    c = stats.num_classes
    if stats.estimator == "gmm":
        assert stats.mixtures is not None
        mix = stats.mixtures
        if cells is not None:
            k = mix.weights.shape[-1]
            mix = Mixture(
                *(a.reshape(c * c, k)[cells] for a in (mix.weights, mix.means, mix.sigmas))
            )
        return mixture_cdf(mix, stats.grid.edges if at is None else at)
    counts = stats.counts if cells is None else stats.counts.reshape(c * c, -1)[cells]
    cdf = hist_cdf(counts)
    if at is None:
        return cdf
    pos = np.clip((at - stats.grid.lo) / stats.grid.step, 0, stats.grid.bins)
    k = np.minimum(np.floor(pos).astype(np.int64), stats.grid.bins - 1)
    frac = pos - k
    return cdf[..., k] + frac * (cdf[..., k + 1] - cdf[..., k])


def anchor_quantiles(stats: LogitStats, u: np.ndarray, which: int | None = None) -> np.ndarray:
    """Inverse anchor CDFs.

    Args:
        stats: Statistics whose anchors are used.
        u: ``(Q,)`` levels.
        which: Only through the positive (0) or the negative (1) anchor; default both.

    Returns:
        ``(2, Q)``: row 0 through the positive anchor, row 1 through the negative one; ``(1,
        Q)`` with ``which`` (the values of that row of ``(2, Q)``).
    """
    rows = slice(None) if which is None else slice(which, which + 1)
    uu = np.tile(u.reshape(1, -1), (2 if which is None else 1, 1))
    if stats.estimator == "gmm":
        assert stats.anchor_mixtures is not None
        mix = stats.anchor_mixtures
        return mixture_quantile(Mixture(mix.weights[rows], mix.means[rows], mix.sigmas[rows]), uu)
    return hist_quantile(stats.grid.edges, stats.anchor_counts[rows], uu)
