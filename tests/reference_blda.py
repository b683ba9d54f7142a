"""Independent, deliberately plain implementations of docs/method.md §4 used as test oracles.

Written from the formulas, not from the package: loops over (i, j), float64 numpy, raw
samples instead of tables.
"""

from __future__ import annotations

import numpy as np


def collect_cells(
    logits: np.ndarray, labels: np.ndarray, num_classes: int
) -> list[list[np.ndarray]]:
    """Raw samples of the logit-collection matrix: ``cells[c][l]`` = z_l at pixels labelled c.

    logits: (N, C); labels: (N,) with 255 = ignore.
    """
    keep = labels != 255
    z, y = logits[keep].astype(np.float64), labels[keep]
    return [[np.sort(z[y == c, ch]) for ch in range(num_classes)] for c in range(num_classes)]


def ecdf(samples: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Fraction of samples <= x."""
    return np.searchsorted(samples, x, side="right") / samples.size


def reference_scores_raw(
    logits: np.ndarray,
    cells: list[list[np.ndarray]],
    anchor_cells: list[list[np.ndarray]],
    tau: float,
    clamp: float = 0.01,
    min_pixels: int = 1,
) -> np.ndarray:
    """Scores s (N, C) from exact empirical CDFs and sample quantiles (np.quantile)."""
    n, c = logits.shape
    z = logits.astype(np.float64)
    pos = np.concatenate([anchor_cells[k][k] for k in range(c)])
    neg = np.concatenate([anchor_cells[a][b] for a in range(c) for b in range(c) if a != b])
    scores = np.zeros((n, c))
    for i in range(c):
        shifted = z.copy()
        for j in range(c):
            cell = cells[i][j]
            if cell.size < min_pixels:
                continue
            u = np.clip(ecdf(cell, z[:, j]), clamp, 1 - clamp)
            target = np.quantile(pos if i == j else neg, u)
            shifted[:, j] = z[:, j] + tau * (target - z[:, j])
        m = shifted.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(shifted - m).sum(axis=1))
        scores[:, i] = shifted[:, i] - lse
    return scores


def reference_scores_hist(
    logits: np.ndarray,
    edges: np.ndarray,
    counts: np.ndarray,
    anchor_counts: np.ndarray,
    tau: float,
    clamp: float = 0.01,
    min_pixels: int = 1,
) -> np.ndarray:
    """Scores s (N, C) from histogram CDFs (linear within a bin), evaluated pointwise.

    counts: (C, C, B); anchor_counts: (2, B); edges: (B + 1,).
    """
    n, c = logits.shape
    z = logits.astype(np.float64)

    def cdf_points(h: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(h)]) / h.sum()

    def inverse(h: np.ndarray, u: np.ndarray) -> np.ndarray:
        cdf = cdf_points(h)
        out = np.empty_like(u)
        for q, level in enumerate(u):
            k = int(np.argmax(cdf >= level))  # first edge with F >= u
            k = max(k, 1)
            c0, c1 = cdf[k - 1], cdf[k]
            frac = 0.0 if c1 == c0 else (level - c0) / (c1 - c0)
            out[q] = edges[k - 1] + frac * (edges[k] - edges[k - 1])
        return out

    scores = np.zeros((n, c))
    for i in range(c):
        shifted = z.copy()
        for j in range(c):
            if counts[i, j].sum() < min_pixels:
                continue
            u = np.clip(np.interp(z[:, j], edges, cdf_points(counts[i, j])), clamp, 1 - clamp)
            target = inverse(anchor_counts[0 if i == j else 1], u)
            shifted[:, j] = z[:, j] + tau * (target - z[:, j])
        m = shifted.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(shifted - m).sum(axis=1))
        scores[:, i] = shifted[:, i] - lse
    return scores


def confusion(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix [true, pred] over pixels whose label is not 255."""
    keep = label != 255
    return np.bincount(
        label[keep].astype(np.int64) * num_classes + pred[keep], minlength=num_classes**2
    ).reshape(num_classes, num_classes)


def miou(conf: np.ndarray) -> float:
    """Mean IoU (percent) over classes present in prediction or label."""
    tp = np.diag(conf).astype(float)
    denom = conf.sum(0) + conf.sum(1) - tp
    valid = denom > 0
    return float(100 * np.mean(tp[valid] / denom[valid]))
