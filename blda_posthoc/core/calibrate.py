"""Classic post-hoc calibration of logits: temperature, vector and bias scaling (Guo et al. 2017).

Each calibration is an affine map along the class axis, ``z' = scale * z + bias``, fitted on
labelled logits (a seeded pixel sample of the source set is enough) by minimising the mean
cross-entropy of ``softmax(z')`` by Newton's method (exact Hessians: a few steps on ``2C``
parameters at most). The objective is convex in ``(scale, bias)``, so the fit from the identity
start is unique up to a common shift of the biases, which softmax ignores;
the returned biases are centred (mean 0 over the classes present in the sample).

- ``temperature``: one shared scale ``1 / T`` for every class, no bias.
- ``vector``: a scale and a bias per class.
- ``bias``: a bias per class, scales fixed at 1.

Classes absent from the fitting sample carry no evidence; fitting their biases would drive them
to ``-inf``. For ``vector`` and ``bias`` they are therefore left out of the fit (the present
classes are fitted as if the absent ones did not exist) and get scale 1 and the lowest bias of
any present class: finite, and never favoured over a present class. ``temperature`` has no
per-class parameter and fits on all classes.

Shape legend: ``N`` pixels, ``C`` classes, ``H, W`` image height and width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from blda_posthoc.core.classes import IGNORE_INDEX

CALIBRATIONS = ("temperature", "vector", "bias")

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True, eq=False)
class Calibration:
    """A fitted affine map ``z' = scale * z + bias`` along the class axis.

    Attributes:
        kind: One of :data:`CALIBRATIONS`.
        scale: ``(C,)`` float64; all equal (``1 / T``) for ``temperature``, all ones for ``bias``.
        bias: ``(C,)`` float64; all zeros for ``temperature``.
        loss: Mean cross-entropy of the calibrated logits on the fitting sample (no penalty).

    Example:
        >>> cal = Calibration("temperature", np.full(2, 0.5), np.zeros(2), loss=0.3)
        >>> cal.apply(torch.tensor([[2.0, -4.0]]))
        tensor([[ 1., -2.]])
    """

    kind: str
    scale: np.ndarray
    bias: np.ndarray
    loss: float

    def __post_init__(self) -> None:
        if self.kind not in CALIBRATIONS:
            raise ValueError(f"calibration kind must be one of {CALIBRATIONS}, got {self.kind!r}")
        scale = np.array(self.scale, dtype=np.float64)
        bias = np.array(self.bias, dtype=np.float64)
        if scale.ndim != 1 or scale.shape != bias.shape or scale.size == 0:
            raise ValueError(
                f"scale and bias must both have shape (C,), got {scale.shape} and {bias.shape}"
            )
        if not (np.isfinite(scale).all() and np.isfinite(bias).all()):
            raise ValueError("calibration scale and bias must be finite")
        scale.flags.writeable = False
        bias.flags.writeable = False
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "bias", bias)

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return int(self.scale.shape[0])

    def apply(self, logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Calibrate ``logits`` along the class axis ``dim``.

        Args:
            logits: Floating tensor with ``C`` entries along ``dim``, e.g. ``(N, C)`` with
                ``dim=-1`` or ``(C, H, W)`` with ``dim=0``.
            dim: The class axis.

        Returns:
            ``scale * logits + bias``, same shape, device and dtype as ``logits``.

        Raises:
            ValueError: ``logits`` is not floating point or has the wrong class count.
        """
        if not logits.is_floating_point():
            raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
        if logits.ndim == 0 or logits.shape[dim] != self.num_classes:
            raise ValueError(
                f"logits must have {self.num_classes} classes along dim {dim}, "
                f"got shape {tuple(logits.shape)}"
            )
        shape = [1] * logits.ndim
        shape[dim] = self.num_classes
        scale = torch.tensor(self.scale, dtype=logits.dtype, device=logits.device)
        bias = torch.tensor(self.bias, dtype=logits.dtype, device=logits.device)
        return logits * scale.reshape(shape) + bias.reshape(shape)


def _labelled_sample(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N', C)`` float64 logits and ``(N',)`` int64 labels on the CPU, unlabelled dropped."""
    z = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    y = torch.as_tensor(labels).detach().to("cpu")
    if z.ndim != 2 or z.shape[1] == 0:
        raise ValueError(f"logits must have shape (N, C), got {tuple(z.shape)}")
    if y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels must hold integer class ids, got dtype {y.dtype}")
    if y.shape != z.shape[:1]:
        raise ValueError(f"labels must have shape ({z.shape[0]},), got {tuple(y.shape)}")
    y = y.to(torch.int64)
    keep = (y >= 0) & (y < z.shape[1]) & (y != IGNORE_INDEX)
    z, y = z[keep], y[keep]
    if y.numel() == 0:
        raise ValueError("no labelled pixels to fit a calibration on")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("logits of labelled pixels must be finite")
    return z, y


def _minimise(
    z: torch.Tensor,
    y: torch.Tensor,
    kind: str,
    *,
    max_iter: int,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit the parameters of ``kind`` by damped Newton steps with exact Hessians.

    The objective is the mean cross-entropy of ``softmax(z * scale + bias)`` plus the optional
    pull ``weight_decay / 2 * (|scale - 1|^2 + |bias|^2)`` over the fitted parameters. It is
    convex, so Newton's method from the identity converges in a few steps; directions the
    objective ignores (a common shift of the biases) get no step.

    Args:
        z: ``(N, K)`` float64 logits.
        y: ``(N,)`` int64 labels in ``0 .. K-1``.
        kind: One of :data:`CALIBRATIONS`.
        max_iter: Newton steps at most.
        weight_decay: Weight of the pull towards the identity.

    Returns:
        ``scale`` (``(1,)`` for ``temperature``, else ``(K,)``) and ``bias`` ``(K,)``, float64.
    """
    n, k = z.shape
    # theta -> (scale, bias): scale = 1 + S @ theta, bias = B @ theta.
    eye, none = torch.eye(k, dtype=z.dtype), torch.zeros(k, k, dtype=z.dtype)
    if kind == "temperature":
        S, B = torch.ones(k, 1, dtype=z.dtype), torch.zeros(k, 1, dtype=z.dtype)
    elif kind == "vector":
        S, B = torch.cat([eye, none], 1), torch.cat([none, eye], 1)
    else:
        S, B = none, eye
    J = torch.cat([S, B], 0)  # (2K, P): d(scale, bias) / d theta
    theta = torch.zeros(J.shape[1], dtype=z.dtype)
    ones = torch.ones(n, dtype=z.dtype)
    labelled = z.gather(1, y[:, None]).squeeze(1)
    # Per class: the labels' count and the sum of their own logits (the one-hot side of the
    # gradient), so that each step needs column sums of p and p * z only.
    counts = torch.bincount(y, minlength=k).to(z.dtype)
    own = torch.zeros(k, dtype=z.dtype).index_add_(0, y, labelled)

    def objective(t: torch.Tensor) -> tuple[float, torch.Tensor]:
        logp = torch.log_softmax(torch.addcmul(B @ t, z, 1 + S @ t), dim=1)
        loss = -float(logp.gather(1, y[:, None]).sum()) / n + 0.5 * weight_decay * float(t @ t)
        return loss, logp

    loss, logp = objective(theta)
    for _ in range(max_iter):
        p = logp.exp_()
        pz = p * z
        sum_p, sum_pz, sum_pzz = ones @ p, ones @ pz, ones @ (pz * z)
        grad = J.T @ torch.cat([sum_pz - own, sum_p - counts]) / n + weight_decay * theta
        hess_ss = torch.diag(sum_pzz) - pz.T @ pz
        hess_sb = torch.diag(sum_pz) - pz.T @ p
        hess_bb = torch.diag(sum_p) - p.T @ p
        hess = torch.cat([torch.cat([hess_ss, hess_sb], 1), torch.cat([hess_sb.T, hess_bb], 1)])
        hess = J.T @ hess @ J / n + weight_decay * torch.eye(J.shape[1], dtype=z.dtype)
        values, vectors = torch.linalg.eigh(hess)
        usable = values > values.max().clamp(min=0) * 1e-12
        step = -vectors[:, usable] @ ((vectors[:, usable].T @ grad) / values[usable])
        slope = float(grad @ step)
        if not slope < 0:
            break
        length = 1.0
        trial_loss, trial_logp = objective(theta + step)
        while trial_loss > loss + 1e-4 * length * slope and length > 1e-10:
            length *= 0.5
            trial_loss, trial_logp = objective(theta + length * step)
        if trial_loss > loss:
            break
        theta = theta + length * step
        improved = loss - trial_loss
        loss, logp = trial_loss, trial_logp
        if improved <= 1e-15 * max(1.0, abs(loss)):
            break
    return 1 + (S @ theta)[: 1 if kind == "temperature" else k], B @ theta


def fit_calibration(
    logits: ArrayLike,
    labels: ArrayLike,
    kind: str,
    *,
    max_iter: int = 100,
    weight_decay: float = 0.0,
) -> Calibration:
    """Fit a calibration of ``kind`` by minimising mean cross-entropy on labelled logits.

    The fit runs on the CPU in float64 by damped Newton steps (exact Hessian, backtracking line
    search) from the identity (scale 1, bias 0) and is deterministic. See the module docstring
    for classes absent from the sample.

    Args:
        logits: ``(N, C)`` float logits (numpy or torch, any device).
        labels: ``(N,)`` int labels; pixels labelled ``255`` or outside ``0 .. C-1`` are dropped.
        kind: One of :data:`CALIBRATIONS`.
        max_iter: Newton steps at most.
        weight_decay: Optional L2 pull of the fitted parameters towards the identity,
            ``weight_decay / 2 * (sum (scale - 1)^2 + sum bias^2)`` over the fitted parameters
            (the shared temperature scale counts once), added to the objective.

    Returns:
        The fitted :class:`Calibration`; its ``loss`` is the plain mean cross-entropy of the
        returned map over all ``C`` classes on the labelled pixels.

    Raises:
        ValueError: Unknown ``kind``, bad shapes or dtypes, non-finite logits, no labelled pixel,
            ``max_iter < 1`` or ``weight_decay < 0``.

    Example:
        Three of four pixels right at a logit gap of 4: ``sigmoid(4 / T) = 3/4``, ``T = 4 / ln 3``.

        >>> z = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
        >>> cal = fit_calibration(z, torch.tensor([0, 1, 0, 0]), "temperature")
        >>> round(float(cal.scale[0]), 4), round(float(np.log(3)) / 4, 4)
        (0.2747, 0.2747)
    """
    if kind not in CALIBRATIONS:
        raise ValueError(f"calibration kind must be one of {CALIBRATIONS}, got {kind!r}")
    if max_iter < 1 or not weight_decay >= 0:
        raise ValueError(f"need max_iter >= 1, weight_decay >= 0; got {max_iter}, {weight_decay}")
    z, y = _labelled_sample(logits, labels)
    c = z.shape[1]
    if kind == "temperature":
        cols = torch.arange(c)
    else:
        cols = torch.nonzero(torch.bincount(y, minlength=c) > 0).flatten()
    remap = torch.full((c,), -1, dtype=torch.int64)
    remap[cols] = torch.arange(cols.numel())
    k = cols.numel()
    scale, bias = _minimise(
        z[:, cols], remap[y], kind, max_iter=max_iter, weight_decay=weight_decay
    )

    fitted_scale = scale.expand(k).numpy()
    fitted_bias = bias.numpy()
    fitted_bias = fitted_bias - fitted_bias.mean()
    full_scale = np.ones(c) if kind != "temperature" else np.full(c, fitted_scale[0])
    full_bias = np.full(c, fitted_bias.min())
    full_scale[cols.numpy()] = fitted_scale
    full_bias[cols.numpy()] = fitted_bias
    loss = F.cross_entropy(z * torch.from_numpy(full_scale) + torch.from_numpy(full_bias), y)
    return Calibration(kind, full_scale, full_bias, float(loss))


def sample_pixels(num_pixels: int, count: int, seed: int) -> np.ndarray:
    """Seeded sample of pixel indices without replacement.

    Args:
        num_pixels: Number of pixels to draw from (indices ``0 .. num_pixels-1``).
        count: Number of pixels to draw; all pixels when ``count >= num_pixels``.
        seed: Non-negative seed; the same arguments always give the same indices.

    Returns:
        ``(min(count, num_pixels),)`` int64 indices, sorted ascending, without repeats.

    Raises:
        ValueError: A negative argument.

    Example:
        >>> sample_pixels(5, 10, seed=0)
        array([0, 1, 2, 3, 4])
    """
    if num_pixels < 0 or count < 0 or seed < 0:
        raise ValueError(f"need num_pixels, count and seed >= 0, got {num_pixels}, {count}, {seed}")
    if count >= num_pixels:
        return np.arange(num_pixels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    picked = rng.choice(num_pixels, size=count, replace=False, shuffle=False)
    return np.sort(picked).astype(np.int64)
