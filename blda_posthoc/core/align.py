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

import math
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


BUILD_CHUNK_VALUES = 1 << 18
"""Grid values (cells x points) tabulated per step of :func:`build_maps` and
:func:`lookup_tables` (at least one cell, or one hypothesis row of ``C x G`` values)."""
BUILD_BYTES_PER_VALUE = 160
"""Bytes of float64/int64 temporaries per grid value of one :func:`build_maps` step (CDFs,
levels, the quantile search through one anchor), measured by peak RSS (about 150)."""
LOOKUP_BYTES_PER_VALUE = 48
"""Bytes of temporaries per grid value of one :func:`lookup_tables` step."""
TABLE_BYTES_PER_VALUE = 8
"""Bytes per grid value held once a correction is ready: the float32 maps and one float32
lookup table (:func:`lookup_tables`)."""
MIN_TABLE_POINTS = 257
"""Fewest grid points a table is resampled to when the full grid does not fit the memory."""
CACHE_BYTES = 1 << 28
"""Lookup tables of several strengths are cached up to this many bytes (at least one)."""


def table_memory(num_classes: int, points: int) -> int:
    """Peak bytes of building and holding one correction's tables (see :func:`build_maps`).

    Args:
        num_classes: ``C``.
        points: Grid points ``G`` of the tables.

    Returns:
        ``8 C^2 G`` bytes held (float32 maps and one lookup table) plus the temporaries of
        the larger build step (about :data:`BUILD_CHUNK_VALUES` values). The statistics
        themselves are not counted.

    Example:
        >>> round(table_memory(128, 4097) / 2**30, 2)
        0.54
    """
    values = num_classes * num_classes * points
    build = BUILD_BYTES_PER_VALUE * min(values, max(points, BUILD_CHUNK_VALUES))
    lookup = LOOKUP_BYTES_PER_VALUE * min(values, max(num_classes * points, BUILD_CHUNK_VALUES))
    return TABLE_BYTES_PER_VALUE * values + max(build, lookup)


def table_points(num_classes: int, points: int, budget: float) -> int | None:
    """The most grid points, at most ``points``, whose tables fit ``budget`` bytes.

    Returns:
        ``points`` when the full grid fits; else the largest count of at least
        :data:`MIN_TABLE_POINTS` that fits (a coarser resampling of the same maps); None when
        not even that fits.
    """
    if table_memory(num_classes, points) <= budget:
        return points
    low, high = MIN_TABLE_POINTS, points
    if table_memory(num_classes, low) > budget:
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if table_memory(num_classes, mid) <= budget else (low, mid - 1)
    return low


STATS_BYTES_PER_VALUE = 8
"""Bytes per histogram count held while a correction runs (int64 ``(C, C, B)`` per group)."""
PROCESS_BYTES = 800 * 2**20
"""Address space of a command beyond its statistics and tables: 0.64 GiB once torch, h5py and
numpy are imported (0.3 GiB of it resident), and 0.12 GiB more during a BLDA run (VmPeak over
the arrays, measured at 128 and 160 classes), with a little margin."""


@dataclass(frozen=True)
class Tables:
    """The correction tables a command holds at once (for :func:`correction_memory`).

    Attributes:
        strengths: One entry per set of maps: the strengths whose lookup tables it caches
            (:func:`lookup_tables` keeps up to :data:`CACHE_BYTES` of them, at least one).
        extra: More ``(C, C, G)`` float32 arrays (``compare``'s side-by-side lookup tables).
        work: Bytes of other work held besides the tables (``compare``'s rows).
    """

    strengths: tuple[int, ...] = ()
    extra: int = 0
    work: int = 0

    def memory(self, num_classes: int, points: int) -> int:
        """Bytes on a grid of ``points``: the arrays, plus one build step's temporaries."""
        if not self.strengths and not self.extra:
            return self.work
        array = 4 * num_classes * num_classes * points
        cached = max(1, CACHE_BYTES // array)
        arrays = sum(1 + min(max(1, n), cached) for n in self.strengths) + self.extra
        return arrays * array + table_memory(num_classes, points) - 2 * array + self.work


ONE_CORRECTION = Tables((1,))
"""One correction at one strength: its maps and one lookup table (:func:`table_memory`)."""


def correction_memory(
    num_classes: int, bins: int, *, groups: int, tables: Tables = ONE_CORRECTION
) -> int:
    """Peak bytes of a process that reads statistics and builds corrections on them.

    Args:
        num_classes: ``C``.
        bins: Histogram bins ``B`` of the statistics.
        groups: ``(C, C, B)`` count arrays read (a file with statistics of calibrated logits
            holds two; ``--stats`` and ``--anchors`` add up).
        tables: The corrections' tables held at once, on the ``B + 1`` edges.

    Returns:
        :data:`PROCESS_BYTES` plus ``8 C^2 B`` per group plus the tables.

    Example:
        >>> round(correction_memory(160, 4096, groups=3) / 2**30, 2)
        3.95
    """
    held = STATS_BYTES_PER_VALUE * groups * num_classes * num_classes * bins
    return PROCESS_BYTES + held + tables.memory(num_classes, bins + 1)


BINS_STEP = 64
"""Bin counts :func:`fitting_bins` suggests are multiples of this."""


def fitting_bins(num_classes: int, *, groups: int, tables: Tables, budget: float) -> int | None:
    """The most histogram bins (a multiple of :data:`BINS_STEP`) whose correction fits.

    Returns:
        The largest ``B`` with ``correction_memory(C, B, ...) <= budget``, or None when not
        even :data:`BINS_STEP` bins fit.

    Example:
        >>> fitting_bins(176, groups=3, tables=ONE_CORRECTION, budget=4 * 2**30)
        3392
    """
    low, high = 0, (1 << 16) // BINS_STEP  # up to 65536 bins, the stats files' limit
    while low < high:
        mid = (low + high + 1) // 2
        need = correction_memory(num_classes, mid * BINS_STEP, groups=groups, tables=tables)
        low, high = (mid, high) if need <= budget else (low, mid - 1)
    return low * BINS_STEP if low else None


def _chunks(count: int, size: int) -> list[slice]:
    """Slices of ``count`` items of ``size`` values each, about BUILD_CHUNK_VALUES per slice."""
    step = max(1, BUILD_CHUNK_VALUES // size)
    return [slice(i, min(i + step, count)) for i in range(0, count, step)]


def build_maps(
    cond: LogitStats,
    anchors: LogitStats,
    clamp: float = DEFAULT_CLAMP,
    min_pixels: int | None = None,
    fallback: LogitStats | None = None,
    *,
    points: int | None = None,
) -> AlignmentMaps:
    """Tabulate ``T_ij = A_ij^{-1}(clamp(F_ij(z), r, 1 - r))`` on ``cond``'s grid.

    The table is filled a few cells at a time (each cell's map depends on its own CDF and one
    anchor only), so the float64 temporaries stay near :data:`BUILD_CHUNK_VALUES` values
    whatever ``C``; memory is :func:`table_memory`. The values are those of one whole-array
    pass.

    Args:
        cond: Statistics of the conditionals ``F_ij``.
        anchors: Statistics whose pooled anchors ``P+``, ``P-`` are the targets.
        clamp: ``r`` in ``[0, 0.5)``.
        min_pixels: Cells with fewer pixels get no shift; default ``cond``'s own setting.
        fallback: Statistics whose cells stand in where ``cond``'s are too small (e.g. source
            ground truth for classes that target pseudo-labels never predict).
        points: Tabulate on this many evenly spaced points over ``cond``'s grid instead of its
            ``B + 1`` edges (a coarser table for large ``C``; see :func:`table_points`).

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
    c = cond.num_classes
    full = points is None or points >= cond.grid.bins + 1
    at = cond.grid.edges if full else np.linspace(cond.grid.lo, cond.grid.hi, int(points or 0))
    g = len(at)
    valid = cond.cell_pixels >= max(min_pixels, 1)
    borrow = np.zeros_like(valid)
    if fallback is not None:
        if fallback.class_names != cond.class_names:
            raise ValueError("conditionals and fallback have different class names")
        borrow = ~valid & (fallback.cell_pixels >= max(min_pixels, 1))
    table = torch.empty((c, c, g), dtype=torch.float32)
    flat, own = table.view(c * c, g), np.eye(c, dtype=bool).reshape(-1)
    for cells in _chunks(c * c, g):
        cdf = cell_cdfs(cond, None if full else at, cells)  # (R, G)
        if fallback is not None:
            cdf = np.where(borrow.reshape(-1)[cells, None], cell_cdfs(fallback, at, cells), cdf)
        u = np.clip(cdf, clamp, 1.0 - clamp)
        # Off-diagonal cells go through the negative anchor, diagonal ones the positive.
        part = anchor_quantiles(anchors, u.reshape(-1), which=1).reshape(u.shape)
        diagonal = own[cells]
        if diagonal.any():
            part[diagonal] = anchor_quantiles(anchors, u[diagonal].reshape(-1), which=0).reshape(
                -1, g
            )
        flat[cells] = torch.as_tensor(part, dtype=torch.float32)
    return AlignmentMaps(
        lo=cond.grid.lo,
        step=cond.grid.step if full else (cond.grid.hi - cond.grid.lo) / (g - 1),
        table=table,
        valid=torch.as_tensor(valid | borrow),
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
        all_valid: Whether every cell gets a shift (no ``skipped`` term needed).
        own_valid: Whether every diagonal cell gets a shift.
        skip_columns: The hypotheses ``i`` with a cell ``(i, j)`` without a shift, when not
            all of them have one (None: every hypothesis has, or none).
    """

    exp_shift: torch.Tensor
    skipped: torch.Tensor
    own: torch.Tensor
    offset: float
    all_valid: bool = False
    own_valid: bool = False
    skip_columns: torch.Tensor | None = None


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
        c, _, g = maps.table.shape
        x = maps.lo + maps.step * torch.arange(g, dtype=torch.float64, device=maps.table.device)
        valid = maps.valid.double()
        # Two passes over row chunks (the exponent range first), so that no (C, C, G) float64
        # temporary exists; every value is the one a whole-array pass gives.
        chunks = _chunks(c, c * g)
        low, high = math.inf, -math.inf
        for rows in chunks:
            used = (tau * (maps.table[rows].double() - x))[maps.valid[rows]]
            if used.numel():
                low, high = min(low, float(used.min())), max(high, float(used.max()))
        low, high = (0.0, 0.0) if low > high else (low, high)
        if high - low > MAX_EXPONENT_SPREAD:
            raise ValueError(
                f"tau={tau} is too large for these statistics: tau * shift spans "
                f"{high - low:.0f} (at most {MAX_EXPONENT_SPREAD:.0f})"
            )
        offset = (low + high) / 2
        exp_shift = torch.empty((c, g, c), dtype=torch.float32, device=maps.table.device)
        for rows in chunks:
            exponent = tau * (maps.table[rows].double() - x)  # (R_i, C_j, G)
            part = valid[rows, :, None] * torch.exp(exponent - offset)
            exp_shift[:, :, rows] = part.permute(1, 2, 0).float()
        tables = LookupTables(
            exp_shift=exp_shift.reshape(c * g, c),
            skipped=(1.0 - valid).T.float().contiguous(),
            own=maps.table.diagonal(dim1=0, dim2=1).T.contiguous(),
            offset=offset,
            all_valid=bool(maps.valid.all()),
            own_valid=bool(maps.valid.diagonal().all()),
            skip_columns=_partial(maps.valid),
        )
        keep = max(1, CACHE_BYTES // max(1, tables.exp_shift.numel() * 4))
        while len(maps.cache) >= keep:  # large tables: drop the oldest strength
            maps.cache.pop(next(iter(maps.cache)))
        maps.cache[key] = tables
    return maps.cache[key]


def _partial(valid: torch.Tensor) -> torch.Tensor | None:
    """``(K,)`` hypotheses with a cell without a shift, or None when that is none or all."""
    rows = torch.nonzero(~valid.all(dim=1)).reshape(-1)
    return rows if 0 < rows.numel() < valid.shape[0] else None


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
    low, high = maps.lo, maps.lo + maps.step * (g - 1)
    inside = z.clamp(low, high)
    pos = (inside - maps.lo) / maps.step
    k = pos.floor().clamp_(max=g - 2)
    frac = pos - k
    top = z.amax(1, keepdim=True)
    weight = torch.exp(z - top)  # (N, C_j)
    # Outside the grid T is constant, so exp(tau * D) falls by exp(-tau * (z - edge)). Inside
    # it that factor is exp(-0.0) = 1 exactly: pixels all inside the grid (the common case,
    # checked on the CPU where it costs no device sync) skip it with the same values.
    shifted_weight = weight
    if z.device.type != "cpu" or not within(z, low, high):
        shifted_weight = weight * torch.exp(-tau * (z - inside))
    rows = k.long()
    rows += torch.arange(c, device=z.device) * g  # (N, C_j) rows of grid point k
    next_rows = rows + 1
    # sum_j w_j exp(tau * D_ij - offset) over valid cells, interpolated between k and k + 1.
    # (In-place steps below compute what the out-of-place expression in the comment on each
    # would, value for value, with fewer temporaries.)
    bag = F.embedding_bag(
        rows, tables.exp_shift, per_sample_weights=shifted_weight * (1 - frac), mode="sum"
    )
    bag += F.embedding_bag(
        next_rows, tables.exp_shift, per_sample_weights=shifted_weight * frac, mode="sum"
    )  # (N, C_i)
    log_total = bag.log_()
    log_total += tables.offset  # log(bag) + offset
    if not tables.all_valid:
        extra = weight @ tables.skipped  # (N, C_i): the weights of the cells without a shift
        cols = tables.skip_columns
        if cols is None:
            log_total = torch.logaddexp(log_total, torch.log(extra))
        else:  # elsewhere extra is 0 and logaddexp(x, log 0) = x: only these columns change
            log_total[:, cols] = torch.logaddexp(log_total[:, cols], torch.log(extra[:, cols]))
    t0, t1 = own_at(tables.own, rows), own_at(tables.own, next_rows)
    t1 -= t0
    t1 *= frac
    own_shift = t0.add_(t1)
    own_shift -= z  # t0 + frac * (t1 - t0) - z
    if not tables.own_valid:  # a factor of 1 everywhere changes nothing: skipped then
        own_shift *= maps.valid.diagonal()
    scores = own_shift.mul_(tau)
    scores = z + scores
    scores -= top
    scores -= log_total
    return scores  # z + tau * own_shift - top - log_total


def own_at(own: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``own.reshape(-1).take(rows)`` for ``(C, G)`` diagonal maps and ``(N, C)`` grid rows.

    ``index_select`` on the flat table gathers the same values as ``take``, a few times
    faster on the CPU.
    """
    return own.reshape(-1).index_select(0, rows.reshape(-1)).view(rows.shape)


def within(z: torch.Tensor, low: float, high: float) -> bool:
    """Whether every value of ``z`` lies in ``[low, high]`` (False with a NaN)."""
    if not z.numel():
        return True
    least, most = torch.aminmax(z)
    return low <= float(least) and float(most) <= high


def default_chunk(num_classes: int) -> int:
    """Pixels per step: temporaries are ``(N, 2C)``, about 1 M values each.

    Small enough that the thirty-odd elementwise passes of :func:`corrected_log_scores` run
    from the cache (4 M values per step took about 1.8x the CPU time at Cityscapes size);
    results do not depend on it. A multiple of 128 pixels (see
    :data:`blda_posthoc.core.correct.PIXEL_ALIGN`).
    """
    return max(4096, (1 << 20) // (2 * num_classes) // 128 * 128)
