"""Class priors under label shift: EM re-estimation, BBSE, and the logit shifts they imply.

Everything here works on per-class vectors (priors, counts, weights) and on per-pixel posteriors;
it reads no files. Priors are non-negative and normalised to sum 1 on input, so counts are
accepted wherever priors are (``prior_shift``, ``logit_adjustment``).

Zero priors: a log of zero is an infinite logit shift, which would force or forbid a class
everywhere. The functions that take logs refuse zero priors; turn pixel counts into priors with
:func:`smooth_counts` (add-``alpha`` smoothing) first.

- EM (Saerens, Latinne & Decaestecker 2002): from posteriors ``p(c | x)`` under the source prior,
  iterate ``p'_c(x) ∝ p_c(x) π̂(c) / π_src(c)``, ``π̂(c) = mean_x p'_c(x)`` to a fixed point.
  One iteration is one pass over the pixels; :func:`em_step` is that pass on one chunk (sums add
  over chunks), :func:`em_iterate` the loop around any pass, :func:`em_priors` both in memory.
- BBSE (Lipton, Wang & Smola 2018): the source confusion ``C[i, j] = P(pred = i, y = j)`` and the
  target's predicted-class shares ``μ̂`` satisfy ``C w = μ̂`` for the importance weights
  ``w(j) = π_tgt(j) / π_src(j)``.

Shape legend: ``N`` pixels, ``C`` classes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _float64(values: ArrayLike) -> np.ndarray:
    """``values`` (numpy, torch on any device, or a sequence) as a float64 numpy array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _vector(values: ArrayLike, what: str) -> np.ndarray:
    """``values`` as ``(C,)`` float64 of finite, non-negative entries with a positive sum."""
    v = _float64(values)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{what} must have shape (C,), got {v.shape}")
    if not np.isfinite(v).all() or (v < 0).any() or v.sum() <= 0:
        raise ValueError(f"{what} must be finite, non-negative and not all zero")
    return v


def _priors(values: ArrayLike, what: str, *, positive: bool) -> np.ndarray:
    """``values`` normalised to sum 1; with ``positive``, zero entries are refused."""
    v = _vector(values, what)
    if positive and (v == 0).any():
        zero = np.flatnonzero(v == 0).tolist()
        raise ValueError(f"{what} is zero for class(es) {zero}: smooth the counts (smooth_counts)")
    return v / v.sum()


def smooth_counts(counts: ArrayLike, alpha: float = 1.0) -> np.ndarray:
    """Priors from pixel counts with add-``alpha`` smoothing.

    Args:
        counts: ``(C,)`` non-negative pixel counts per class.
        alpha: Pseudo-count added to every class (``1.0``: add-one / Laplace smoothing).

    Returns:
        ``(C,)`` float64 ``(counts + alpha) / (sum(counts) + C * alpha)``; positive when
        ``alpha > 0``.

    Raises:
        ValueError: Bad shape, negative or non-finite counts, ``alpha < 0``, or nothing to divide.

    Example:
        >>> smooth_counts(np.array([3, 0, 1]))
        array([0.57142857, 0.14285714, 0.28571429])
    """
    c = _float64(counts)
    if c.ndim != 1 or c.size == 0 or not np.isfinite(c).all() or (c < 0).any():
        raise ValueError(f"counts must be (C,) finite and non-negative, got {c}")
    if not alpha >= 0 or c.sum() + c.size * alpha <= 0:
        raise ValueError(f"need alpha >= 0 and a positive total, got alpha={alpha}")
    return (c + alpha) / (c.sum() + c.size * alpha)


def prior_shift(source_priors: ArrayLike, target_priors: ArrayLike) -> np.ndarray:
    """The Bayes logit shift for a change of class prior, ``log π_tgt − log π_src``.

    Adding it to source-calibrated logits gives the posteriors under the target prior.

    Args:
        source_priors: ``(C,)`` positive source priors (or counts; normalised here).
        target_priors: ``(C,)`` positive target priors (or counts; normalised here).

    Returns:
        ``(C,)`` float64 shift.

    Raises:
        ValueError: Shapes differ, or a prior is zero, negative or not finite.

    Example:
        >>> prior_shift(np.array([0.5, 0.5]), np.array([0.8, 0.2])).round(3)
        array([ 0.47 , -0.916])
    """
    src = _priors(source_priors, "source prior", positive=True)
    tgt = _priors(target_priors, "target prior", positive=True)
    if src.shape != tgt.shape:
        raise ValueError(f"source and target priors differ in shape: {src.shape}, {tgt.shape}")
    return np.log(tgt) - np.log(src)


def logit_adjustment(source_priors: ArrayLike, target_priors: ArrayLike, tau: float) -> np.ndarray:
    """The logit-adjustment shift ``τ · (log π_src − log π̂_tgt)``, applied as ``z' = z + shift``.

    With ``π̂_tgt`` the model's estimated (e.g. predicted) class shares on the target, the shift
    lowers the classes whose target share exceeds their source share, and ``τ`` sets how far.
    Note the sign: this is ``−τ · prior_shift(source_priors, target_priors)``.

    Args:
        source_priors: ``(C,)`` positive source priors (or counts).
        target_priors: ``(C,)`` positive estimated target priors (or counts).
        tau: Strength; ``0`` gives no shift.

    Returns:
        ``(C,)`` float64 shift.

    Raises:
        ValueError: As :func:`prior_shift`.
    """
    return tau * -prior_shift(source_priors, target_priors)


def _probs(probs: ArrayLike, num_classes: int) -> torch.Tensor:
    """``(N, C)`` float64 tensor on the device of ``probs``."""
    p = torch.as_tensor(probs).detach().to(torch.float64)
    if p.ndim != 2 or p.shape[1] != num_classes:
        raise ValueError(f"probs must have shape (N, {num_classes}), got {tuple(p.shape)}")
    return p


def em_step(probs: ArrayLike, source_priors: ArrayLike, current: ArrayLike) -> np.ndarray:
    """One EM pass over a chunk of pixels: the summed re-weighted posteriors.

    Each pixel's posteriors are re-weighted by ``current / source_priors`` and renormalised; the
    result is their sum over the chunk. Sums of chunks add up to the sum of the whole, and the
    next estimate is ``sums / sums.sum()`` (see :func:`em_iterate`). A pixel whose re-weighted
    posteriors are all zero contributes nothing.

    Args:
        probs: ``(N, C)`` posteriors under the source prior (numpy or torch, any device; computed
            in float64 on that device).
        source_priors: ``(C,)`` positive source priors.
        current: ``(C,)`` the current target-prior estimate.

    Returns:
        ``(C,)`` float64 sums over the chunk.

    Raises:
        ValueError: Bad shapes, zero source priors, negative posteriors.
    """
    src = _priors(source_priors, "source prior", positive=True)
    p = _probs(probs, src.size)
    if bool((p < 0).any()):
        raise ValueError("probs must be non-negative")
    return _em_sums(p, src, current)


def _em_sums(p: torch.Tensor, src: np.ndarray, current: ArrayLike) -> np.ndarray:
    """:func:`em_step` of checked ``(N, C)`` float64 posteriors and normalised source priors.

    The loops of :func:`em_priors` and :func:`em_map_priors` check the posteriors once and
    call this on every pass (the values are those of :func:`em_step`).
    """
    cur = _priors(current, "current prior", positive=False)
    if cur.shape != src.shape:
        raise ValueError(f"current and source priors differ in shape: {cur.shape}, {src.shape}")
    weighted = p * torch.as_tensor(cur / src, device=p.device)
    total = weighted.sum(1, keepdim=True)
    weighted /= torch.where(total > 0, total, torch.ones_like(total))
    return weighted.sum(0).cpu().numpy()


def _checked_pass(probs: ArrayLike, src: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``current -> em_step(probs, src, current)`` with the posteriors checked once, up front."""
    p = _probs(probs, src.size)
    if bool((p < 0).any()):
        raise ValueError("probs must be non-negative")
    # em_step normalises the source priors it is given: so does this, once
    step_src = _priors(src, "source prior", positive=True)
    return lambda current: _em_sums(p, step_src, current)


def em_iterate(
    one_pass: Callable[[np.ndarray], np.ndarray],
    source_priors: ArrayLike,
    *,
    max_iter: int = 1000,
    tol: float = 1e-8,
) -> tuple[np.ndarray, int]:
    """Run the EM fixed-point loop around any pass over the data.

    Args:
        one_pass: Maps the current ``(C,)`` estimate to the ``(C,)`` sums of :func:`em_step` over
            all pixels (e.g. summed over the chunks of a store).
        source_priors: ``(C,)`` positive source priors; also the starting estimate.
        max_iter: Passes at most.
        tol: Stop once the estimate moves by less than ``tol`` in every class.

    Returns:
        ``(C,)`` float64 target-prior estimate summing to 1, and the number of passes made
        (``max_iter`` when the loop stopped without meeting ``tol``).

    Raises:
        ValueError: Bad source priors, ``max_iter < 1``, or a pass with all-zero sums.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    current = _priors(source_priors, "source prior", positive=True)
    for iteration in range(1, max_iter + 1):
        sums = _vector(one_pass(current), "EM pass sums")
        new = sums / sums.sum()
        moved = float(np.abs(new - current).max())
        current = new
        if moved < tol:
            return current, iteration
    return current, max_iter


def em_priors(
    probs: ArrayLike, source_priors: ArrayLike, *, max_iter: int = 1000, tol: float = 1e-8
) -> tuple[np.ndarray, int]:
    """Target priors by EM (Saerens, Latinne & Decaestecker 2002), all pixels in memory.

    Needs calibrated posteriors: on an under-confident model the fixed point collapses onto one
    class.

    Args:
        probs: ``(N, C)`` posteriors under the source prior.
        source_priors: ``(C,)`` positive source priors.
        max_iter: Iterations at most.
        tol: Stop once the estimate moves by less than ``tol`` in every class.

    Returns:
        ``(C,)`` float64 target-prior estimate summing to 1, and the number of iterations.

    Raises:
        ValueError: As :func:`em_step` and :func:`em_iterate`.

    Example:
        Certain posteriors: the estimate is the share of pixels per class.

        >>> probs = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> em_priors(probs, np.array([0.5, 0.5]))
        (array([0.75, 0.25]), 2)
    """
    src = _priors(source_priors, "source prior", positive=True)
    return em_iterate(_checked_pass(probs, src), src, max_iter=max_iter, tol=tol)


def bbse_weights(source_confusion: ArrayLike, target_pred_shares: ArrayLike) -> np.ndarray:
    """Importance weights ``w(j) = π_tgt(j) / π_src(j)`` by black-box shift estimation.

    Solves ``C_src w = μ̂_tgt`` in the least-squares sense (minimum norm when ``C_src`` is
    singular, e.g. a class never labelled on the source gets weight 0) and clips ``w >= 0``.
    The target priors follow as ``w * π_src`` with ``π_src = C_src.sum(0)``, renormalised
    (:func:`bbse_priors`).

    Args:
        source_confusion: ``(C, C)`` ``C_src[i, j] = P(pred = i, y = j)`` on labelled source
            pixels (counts are accepted: normalised to sum 1 here).
        target_pred_shares: ``(C,)`` predicted-class shares on the target (or counts).

    Returns:
        ``(C,)`` float64 non-negative weights.

    Raises:
        ValueError: Bad shapes, negative or non-finite entries, all-zero inputs.
    """
    conf = _float64(source_confusion)
    mu = _priors(target_pred_shares, "target predicted shares", positive=False)
    if conf.shape != (mu.size, mu.size):
        raise ValueError(f"source confusion must have shape {(mu.size, mu.size)}, got {conf.shape}")
    _vector(conf.ravel(), "source confusion")
    weights, *_ = np.linalg.lstsq(conf / conf.sum(), mu, rcond=None)
    return np.clip(weights, 0.0, None)


def bbse_priors(source_confusion: ArrayLike, target_pred_shares: ArrayLike) -> np.ndarray:
    """Target priors by BBSE: :func:`bbse_weights` times the source label shares, renormalised.

    Args:
        source_confusion: ``(C, C)`` as in :func:`bbse_weights`.
        target_pred_shares: ``(C,)`` as in :func:`bbse_weights`.

    Returns:
        ``(C,)`` float64 priors summing to 1 (zero for classes whose weight was clipped).

    Raises:
        ValueError: As :func:`bbse_weights`, or every weight clipped to zero.
    """
    weights = bbse_weights(source_confusion, target_pred_shares)
    conf = _float64(source_confusion)
    return _priors(weights * conf.sum(0), "BBSE target prior", positive=False)


def em_map_priors(
    probs: ArrayLike,
    source_priors: ArrayLike,
    *,
    weight: float = 0.1,
    max_iter: int = 1000,
    tol: float = 1e-8,
) -> tuple[np.ndarray, int]:
    """Target priors by EM with a Dirichlet hyper-prior centred on the source priors (MAP).

    The M-step of :func:`em_priors` becomes ``π̂ ∝ Σ_x p'(x) + κ N π_src`` (a Dirichlet with
    concentration ``1 + κ N π_src``): every class keeps at least ``κ / (1 + κ)`` of its source
    prior, so a class cannot collapse to 0, and ``κ = 0`` is plain EM. The sums are those of
    :func:`em_step` (chunk-additive), so the loop runs over any pass with
    :func:`em_map_iterate`.

    Args:
        probs: ``(N, C)`` posteriors under the source prior.
        source_priors: ``(C,)`` positive source priors.
        weight: ``κ``, the hyper-prior's pseudo-pixels as a fraction of ``N``.
        max_iter: Iterations at most.
        tol: Stop once the estimate moves by less than ``tol`` in every class.

    Returns:
        ``(C,)`` float64 estimate summing to 1, and the number of iterations.

    Raises:
        ValueError: As :func:`em_priors`, or ``weight < 0``.
    """
    src = _priors(source_priors, "source prior", positive=True)
    return em_map_iterate(
        _checked_pass(probs, src),
        src,
        int(_probs(probs, src.size).shape[0]),
        weight=weight,
        max_iter=max_iter,
        tol=tol,
    )


def em_map_iterate(
    one_pass: Callable[[np.ndarray], np.ndarray],
    source_priors: ArrayLike,
    num_pixels: int,
    *,
    weight: float = 0.1,
    max_iter: int = 1000,
    tol: float = 1e-8,
) -> tuple[np.ndarray, int]:
    """:func:`em_iterate` with the Dirichlet pseudo-counts ``κ N π_src`` added to each pass."""
    if not weight >= 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    src = _priors(source_priors, "source prior", positive=True)
    pseudo = weight * max(num_pixels, 1) * src
    return em_iterate(lambda current: one_pass(current) + pseudo, src, max_iter=max_iter, tol=tol)


def sinkhorn_offsets(
    log_probs: ArrayLike,
    target_shares: ArrayLike,
    *,
    epsilon: float = 0.1,
    max_iter: int = 500,
    tol: float = 1e-4,
) -> np.ndarray:
    """Per-class offsets that move the predicted class shares to ``target_shares`` (OT).

    Entropic optimal transport of the pixels (uniform mass) onto the classes (mass
    ``target_shares``) with cost ``-log p_c(x)``: the column duals ``g`` of Sinkhorn's
    iteration ``g_c ← g_c + ε (log π_c − log mean_x softmax((log p(x) + g) / ε)_c)``. As
    ``ε → 0`` the assignment becomes the hard one, so ``argmax_c log p_c(x) + g_c`` gives each
    class about its target share; ``g`` is a logit bias (centred, mean 0).

    Args:
        log_probs: ``(N, C)`` log-posteriors (or logits: a per-pixel constant changes nothing).
        target_shares: ``(C,)`` positive target class shares.
        epsilon: Entropic regularisation on the log-probability scale.
        max_iter: Iterations at most.
        tol: Stop once no class's soft share differs from its target by more than ``tol``
            (relative).

    Returns:
        ``(C,)`` float64 offsets, mean 0.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    target = _priors(target_shares, "target shares", positive=True)
    s = _probs(log_probs, target.size) / epsilon
    g = torch.zeros(target.size, dtype=torch.float64, device=s.device)
    log_target = torch.as_tensor(np.log(target), device=s.device)
    for _ in range(max_iter):
        soft = torch.softmax(s + g, dim=1).mean(0).clamp_min(1e-300)
        step = log_target - torch.log(soft)
        g = g + step
        if float(step.abs().max()) < tol:
            break
    offsets = (epsilon * g).cpu().numpy()
    return offsets - offsets.mean()


def occurrence_priors(
    mean_probs: ArrayLike, pixel_priors: ArrayLike, *, pseudo: float = 1.0
) -> np.ndarray:
    """Image-level class occurrence, label-free (the priors of Liu et al., CVPR 2022).

    A class occurs in an image when the image's mean predicted probability of that class
    exceeds the class's pixel prior; its occurrence prior is the share of images where it
    occurs, smoothed as ``(count + pseudo) / (M + 2 pseudo)`` (never 0 or 1).

    Args:
        mean_probs: ``(M, C)`` mean predicted probabilities per image.
        pixel_priors: ``(C,)`` pixel priors (the threshold per class).
        pseudo: Smoothing pseudo-count.

    Returns:
        ``(C,)`` float64 occurrence frequencies in ``(0, 1)`` (not normalised: a class can
        occur in every image).
    """
    m = _float64(mean_probs)
    prior = _priors(pixel_priors, "pixel priors", positive=False)
    if m.ndim != 2 or m.shape[1] != prior.size or m.shape[0] == 0:
        raise ValueError(f"mean_probs must have shape (M, {prior.size}), got {m.shape}")
    if not pseudo > 0:
        raise ValueError(f"pseudo must be > 0, got {pseudo}")
    present = (m > prior).sum(0)
    return (present + pseudo) / (m.shape[0] + 2 * pseudo)


def smooth_towards(counts: ArrayLike, prior: ArrayLike, weight: float) -> np.ndarray:
    """Shares from counts, smoothed towards ``prior`` (a Dirichlet centred on it).

    Args:
        counts: ``(C,)`` non-negative counts.
        prior: ``(C,)`` positive prior (or counts).
        weight: Pseudo-counts ``weight * sum(counts)`` spread as ``prior``; must be > 0.

    Returns:
        ``(C,)`` float64 ``(counts + weight N prior) / (N (1 + weight))``: every class keeps at
        least ``weight / (1 + weight)`` of its prior.
    """
    c = _vector(counts, "counts")
    p = _priors(prior, "prior", positive=True)
    if not weight > 0 or c.shape != p.shape:
        raise ValueError(f"need weight > 0 and matching shapes, got {weight}, {c.shape}, {p.shape}")
    n = c.sum()
    return (c + weight * n * p) / (n * (1 + weight))
