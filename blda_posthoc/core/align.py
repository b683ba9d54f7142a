"""Post-hoc anchor alignment of logits (docs/method.md §4).

For every hypothesised class ``i`` and channel ``j`` the map ``T_ij = A_ij^{-1} o F_ij`` (with
``F_ij`` the CDF of cell ``M[i][j]``, ``A_ij`` the positive anchor when ``i == j`` and the
negative one otherwise, and ``F`` clamped to ``[r, 1 - r]``) is fixed once the statistics are
fitted, so it is tabulated once on the statistics' logit grid and applied by linear
interpolation. The corrected log-score of class ``i`` is::

    s_i = z_i + tau * D_ii - logsumexp_j(z_j + tau * D_ij),   D_ij = T_ij(z_j) - z_j

and the prediction is ``argmax_i s_i``. Cells with too few pixels get ``D_ij = 0``.

Shape legend: N pixels, C classes, H x W output size, h x w logit size, G grid points,
K mixture components, M rows, Q queries per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from blda_posthoc.core import defaults
from blda_posthoc.core.distributions import anchor_quantiles, cell_cdfs
from blda_posthoc.core.fit import LogitStats

# Defined where `blda CMD -h` reads them (no torch there); re-exported here.
DEFAULT_CLAMP = defaults.DEFAULT_CLAMP
DEFAULT_MIN_PIXELS = defaults.DEFAULT_MIN_PIXELS
DEFAULT_TAU = defaults.DEFAULT_TAU


@dataclass
class AlignmentMaps:
    """Tabulated maps ``T_ij`` on a uniform grid.

    Attributes:
        lo: First grid point.
        step: Grid spacing.
        table: ``(C, C, G)`` float32, ``table[i, j, g] = T_ij(lo + g * step)``.
        valid: ``(C, C)`` bool, False where the cell had too few pixels (no shift).
        clamp: The ``r`` used.
        min_pixels: Cells with fewer pixels than this were marked invalid.
        cache: Lookup tables per ``(tau, device)`` (see :func:`lookup_tables`).
    """

    lo: float
    step: float
    table: torch.Tensor
    valid: torch.Tensor
    clamp: float
    min_pixels: int
    cache: dict[tuple[float, str], LookupTables] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def skipped(self) -> list[tuple[int, int]]:
        """Cells ``(i, j)`` that get no shift."""
        return [(int(i), int(j)) for i, j in torch.nonzero(~self.valid).tolist()]

    def to(self, device: torch.device | str) -> AlignmentMaps:
        """The same maps on another device."""
        return AlignmentMaps(
            self.lo,
            self.step,
            self.table.to(device),
            self.valid.to(device),
            self.clamp,
            self.min_pixels,
        )


def build_maps(
    cond: LogitStats,
    anchors: LogitStats,
    clamp: float = DEFAULT_CLAMP,
    min_pixels: int | None = None,
    fallback: LogitStats | None = None,
) -> AlignmentMaps:
    """Tabulate ``T_ij = A_ij^{-1}(clamp(F_ij(z), r, 1 - r))`` on ``cond``'s grid.

    Args:
        cond: Statistics of the conditionals ``F_ij``.
        anchors: Statistics whose pooled anchors ``P+``, ``P-`` are the targets.
        clamp: ``r`` in ``[0, 0.5)``.
        min_pixels: Cells with fewer pixels get no shift; default ``cond``'s own setting.
        fallback: Statistics whose cells stand in where ``cond``'s are too small (e.g. source
            ground truth for classes that target pseudo-labels never predict).

    Returns:
        The maps, on the CPU.
    """
    if cond.class_names != anchors.class_names:
        raise ValueError("conditionals and anchors have different class names")
    if not 0.0 <= clamp < 0.5:
        raise ValueError(f"clamp must lie in [0, 0.5), got {clamp}")
    if min_pixels is None:
        min_pixels = int(cond.settings.get("min_pixels", DEFAULT_MIN_PIXELS))
    anchor_pixels = anchors.anchor_counts.sum(-1)
    if (anchor_pixels < max(min_pixels, 1)).any():
        raise ValueError(f"anchors hold too few pixels ({anchor_pixels.tolist()})")
    c, g = cond.num_classes, cond.grid.bins + 1
    cdf = cell_cdfs(cond)
    valid = cond.cell_pixels >= max(min_pixels, 1)
    if fallback is not None:
        if fallback.class_names != cond.class_names:
            raise ValueError("conditionals and fallback have different class names")
        borrow = ~valid & (fallback.cell_pixels >= max(min_pixels, 1))
        cdf = np.where(borrow[..., None], cell_cdfs(fallback, at=cond.grid.edges), cdf)
        valid = valid | borrow
    u = np.clip(cdf, clamp, 1.0 - clamp)
    through = anchor_quantiles(anchors, u.reshape(-1)).reshape(2, c, c, g)
    table = np.where(np.eye(c, dtype=bool)[..., None], through[0], through[1])
    return AlignmentMaps(
        lo=cond.grid.lo,
        step=cond.grid.step,
        table=torch.as_tensor(table, dtype=torch.float32),
        valid=torch.as_tensor(valid),
        clamp=clamp,
        min_pixels=min_pixels,
    )


@dataclass
class LookupTables:
    """What :func:`corrected_log_scores` looks up for one ``tau`` (see :func:`lookup_tables`).

    Attributes:
        exp_shift: ``(C_j * G, C_i)`` float32; row ``j * G + g`` holds
            ``valid_ij * exp(tau * D_ij(x_g) - offset)`` for every hypothesis ``i``.
        skipped: ``(C_j, C_i)`` float32, 1 where cell ``(i, j)`` gets no shift.
        own: ``(C, G)`` float32, ``T_ii(x_g)`` (the diagonal maps; row ``j`` uses the same
            grid rows ``j * G + g`` as ``exp_shift``).
        offset: The constant taken out of the exponent so that it cannot overflow.
    """

    exp_shift: torch.Tensor
    skipped: torch.Tensor
    own: torch.Tensor
    offset: float


MAX_EXPONENT_SPREAD = 160.0
"""Largest range of ``tau * D`` over the grid that float32 exponentials hold (about e^±80)."""


def lookup_tables(maps: AlignmentMaps, tau: float) -> LookupTables:
    """Tabulate ``exp(tau * D_ij)`` channel-major for one ``tau``, cached on the maps.

    Writing ``m = max_j z_j`` and ``w_j = exp(z_j - m)``, the log-sum-exp of the corrected
    score is ``m + log(sum_j w_j * exp(tau * D_ij(z_j)))``; with ``exp(tau * D_ij)`` tabulated
    per channel, that sum is one weighted row lookup per (pixel, channel): an embedding bag,
    with no ``(N, C, C)`` temporary.

    Args:
        maps: Tabulated maps.
        tau: Correction strength.

    Returns:
        The lookup tables, on the maps' device.
    """
    key = (float(tau), str(maps.table.device))
    if key not in maps.cache:
        table = maps.table.double()
        c, _, g = table.shape
        x = maps.lo + maps.step * torch.arange(g, dtype=torch.float64, device=table.device)
        valid = maps.valid.double()
        exponent = tau * (table - x)  # (C_i, C_j, G)
        used = exponent[maps.valid]
        low, high = (float(used.min()), float(used.max())) if used.numel() else (0.0, 0.0)
        if high - low > MAX_EXPONENT_SPREAD:
            raise ValueError(
                f"tau={tau} is too large for these statistics: tau * shift spans "
                f"{high - low:.0f} (at most {MAX_EXPONENT_SPREAD:.0f})"
            )
        offset = (low + high) / 2
        exp_shift = valid[..., None] * torch.exp(exponent - offset)
        maps.cache[key] = LookupTables(
            exp_shift=exp_shift.permute(1, 2, 0).reshape(c * g, c).float().contiguous(),
            skipped=(1.0 - valid).T.float().contiguous(),
            own=table.diagonal(dim1=0, dim2=1).T.float().contiguous(),
            offset=offset,
        )
    return maps.cache[key]


def corrected_log_scores(z: torch.Tensor, maps: AlignmentMaps, tau: float) -> torch.Tensor:
    """Corrected log-scores ``s`` of pixels.

    Args:
        z: ``(N, C)`` logits (float32), on the maps' device.
        maps: Tabulated maps.
        tau: Correction strength; 0 returns ``log_softmax(z)``.

    Returns:
        ``(N, C)`` log-scores; ``exp(s)`` does not sum to 1 (softmax it for probabilities).
    """
    if tau == 0:
        return torch.log_softmax(z, dim=-1)
    tables = lookup_tables(maps, tau)
    n, c = z.shape
    g = tables.own.shape[1]
    inside = z.clamp(maps.lo, maps.lo + maps.step * (g - 1))
    pos = (inside - maps.lo) / maps.step
    k = pos.floor().clamp_(max=g - 2)
    frac = pos - k
    k_long = k.long()
    top = z.amax(1, keepdim=True)
    weight = torch.exp(z - top)  # (N, C_j)
    # Outside the grid T is constant, so exp(tau * D) falls by exp(-tau * (z - edge)).
    shifted_weight = weight * torch.exp(-tau * (z - inside))
    rows = k_long + torch.arange(c, device=z.device) * g  # (N, C_j) rows of grid point k
    # sum_j w_j exp(tau * D_ij - offset) over valid cells, interpolated between k and k + 1.
    bag = F.embedding_bag(
        rows, tables.exp_shift, per_sample_weights=shifted_weight * (1 - frac), mode="sum"
    ) + F.embedding_bag(
        rows + 1, tables.exp_shift, per_sample_weights=shifted_weight * frac, mode="sum"
    )  # (N, C_i)
    log_total = torch.log(bag) + tables.offset
    if not bool(maps.valid.all()):
        log_total = torch.logaddexp(log_total, torch.log(weight @ tables.skipped))
    own = tables.own.reshape(-1)
    t0, t1 = own.take(rows), own.take(rows + 1)
    own_shift = (t0 + frac * (t1 - t0) - z) * maps.valid.diagonal()
    return z + tau * own_shift - top - log_total


def default_chunk(num_classes: int) -> int:
    """Pixels per step: temporaries are ``(N, 2C)``, so about 4 M values each."""
    return max(4096, (1 << 22) // (2 * num_classes))
