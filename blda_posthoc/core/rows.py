"""Predictions of many (correction, strength) rows of the same pixels, sharing their work.

``compare`` evaluates every method at every strength on the same images. Evaluated row by row,
each row repeats what does not depend on it; here the rows are grouped:

- rows that are the plain argmax (``none``, and any strength-0 identity) share one argmax;
- the BLDA rows of one :class:`~blda_posthoc.core.methods.Aligned` correction differ only in
  ``tau``: the calibration, the grid positions of every logit, the weights ``exp(z - max z)``
  and the diagonal maps are computed once, and the tabulated ``exp(tau * D_ij)`` of all their
  strengths sit side by side in one wide table, so one embedding-bag pass gathers every
  strength's sums (the same rows of the same table as one strength alone reads, each column
  summed in the same order, so every value is bit for bit the one-row value); the logarithm
  of those sums, the scores and the argmax of every strength are then one operation each over
  all strengths;
- the strengths of one :class:`~blda_posthoc.core.methods.Shift` or
  :class:`~blda_posthoc.core.methods.Blended` correction (a per-class map ``a_t * z + b_t``
  followed by ``log_softmax``) are scored and their argmax taken in one operation each;
- corrections with the same content share one group (``filled-blda`` is ``blda`` when no cell
  is borrowed; a ``--tau auto`` row joins the rows of its method), and a strength asked twice
  in a group is evaluated once;
- every other correction (including ones this module does not know) is evaluated by its own
  ``log_scores``, as a single row is.

Each row's prediction is therefore exactly the argmax of
:func:`blda_posthoc.core.correct.correct_image` for that row (the tests compare them): the
shared paths do the same float operations on the same values, only batched. Pixels that a
shared path cannot treat exactly (a logit outside the statistics' grid, where the BLDA weight
depends on ``tau``) go through the row's own ``log_scores``.

Shape legend: N pixels, C classes, R rows, T strengths of one group, G grid points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from blda_posthoc.core.align import (
    AlignmentMaps,
    LookupTables,
    corrected_log_scores,
    lookup_tables,
    own_at,
    within,
)
from blda_posthoc.core.fit import last_argmax
from blda_posthoc.core.methods import Aligned, Blended, Corrector, Shift

DEFAULT_ROW_CHUNK = 1 << 15
"""Pixels per step: the wide BLDA bags are ``(N, T * C)``, about 20 MB at 19 classes, 8 taus."""


@dataclass
class _Group:
    """Rows that share work: their indices in the row list and their strengths.

    ``taus`` holds each strength once; ``slots[k]`` is the position in ``taus`` of the
    strength of row ``rows[k]``.
    """

    kind: str  # "plain", "aligned", "linear" or "own"
    corrector: Corrector
    rows: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    taus: list[float] = field(default_factory=list)

    def add(self, row: int, tau: float) -> None:
        """Add row ``row`` of strength ``tau`` (a strength already here is evaluated once)."""
        if tau not in self.taus:
            self.taus.append(tau)
        self.rows.append(row)
        self.slots.append(self.taus.index(tau))


def _kind(corrector: Corrector, tau: float) -> str:
    """Which shared path evaluates ``corrector`` at ``tau`` (see the module docstring)."""
    if corrector.is_identity(tau):
        return "plain"
    if isinstance(corrector, Aligned) and tau != 0:
        return "aligned"
    if isinstance(corrector, (Shift, Blended)):
        return "linear"
    return "own"


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.device == b.device and torch.equal(a, b)


def same_content(a: Corrector, b: Corrector) -> bool:
    """Whether two corrections of a shared path compute the same scores (equal tensors).

    ``compare`` builds a correction per method and another one for each ``--tau auto`` row;
    ``filled-blda`` borrows no cell when the target statistics have enough pixels everywhere,
    and is then ``blda``. Such rows share one group.
    """
    if a is b:
        return True
    if isinstance(a, Aligned) and isinstance(b, Aligned):
        ma, mb = a.maps, b.maps
        same_pre = (a.pre is None and b.pre is None) or (
            a.pre is not None
            and b.pre is not None
            and _equal(a.pre.scale, b.pre.scale)
            and _equal(a.pre.bias, b.pre.bias)
        )
        return (
            (ma.lo, ma.step) == (mb.lo, mb.step)
            and _equal(ma.valid, mb.valid)
            and _equal(ma.table, mb.table)
            and same_pre
        )
    if isinstance(a, Shift) and isinstance(b, Shift):
        return _equal(a.shift, b.shift)
    if isinstance(a, Blended) and isinstance(b, Blended):
        return _equal(a.scale, b.scale) and _equal(a.bias, b.bias)
    return False


class RowPredictor:
    """Predict every row of a compare grid for chunks of pixels (see the module docstring).

    Args:
        rows: ``(corrector, tau)`` per row, on the device the pixels will be on.
        chunk_pixels: Pixels per step (memory bound; the predictions do not depend on it).

    Example:
        >>> from blda_posthoc.core.methods import Plain
        >>> predictor = RowPredictor([(Plain(), 0.0)])
        >>> predictor.predict(torch.tensor([[0.0, 2.0], [1.0, -1.0]])).tolist()
        [[1, 0]]
    """

    def __init__(
        self,
        rows: Sequence[tuple[Corrector, float]],
        *,
        chunk_pixels: int = DEFAULT_ROW_CHUNK,
    ) -> None:
        self.num_rows = len(rows)
        self.chunk_pixels = max(1, int(chunk_pixels))
        self.groups: list[_Group] = []
        for index, (corrector, tau) in enumerate(rows):
            tau = float(tau)
            kind = _kind(corrector, tau)
            group = next(
                (
                    g
                    for g in self.groups
                    if g.kind == kind == "plain"
                    or (
                        g.kind == kind in ("aligned", "linear")
                        and same_content(g.corrector, corrector)
                    )
                ),
                None,
            )
            if group is None:
                group = _Group(kind, corrector)
                self.groups.append(group)
            group.add(index, tau)
        self._wide: dict[int, tuple[torch.Tensor, torch.Tensor, LookupTables]] = {}

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """Every row's prediction of pixels.

        Args:
            z: ``(N, C)`` float32 logits (any strides; each step works on a contiguous copy,
                as :func:`~blda_posthoc.core.correct.correct_image` does).

        Returns:
            ``(R, N)`` int64 class ids, row ``r`` the argmax of row ``r``'s log-scores.
        """
        n = z.shape[0]
        out = torch.empty((self.num_rows, n), dtype=torch.long, device=z.device)
        for start in range(0, n, self.chunk_pixels):
            part = z[start : start + self.chunk_pixels].contiguous()
            out[:, start : start + part.shape[0]] = self._chunk(part)
        return out

    def counts(
        self, z: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
    ) -> torch.Tensor:
        """Every row's confusion counts of pixels, step by step (no ``(R, N)`` buffer).

        Pixels labelled ``ignore_index`` count in no row, so they are not predicted at all.

        Args:
            z: ``(N, C)`` float32 logits (any strides).
            label: ``(N,)`` true class ids.
            num_classes: ``C``.
            ignore_index: The label value to skip.

        Returns:
            ``(R, C, C + 1)`` int64 counts (see :func:`pixel_counts`).

        Raises:
            ValueError: A label outside ``0 .. C-1`` that is not 255.
        """
        total = torch.zeros(
            (self.num_rows, num_classes, num_classes + 1), dtype=torch.long, device=z.device
        )
        for start in range(0, z.shape[0], self.chunk_pixels):
            part = z[start : start + self.chunk_pixels]
            part_label = label[start : start + part.shape[0]]
            keep = (part_label != ignore_index).nonzero().squeeze(1)
            if keep.numel() < part.shape[0]:  # one copy of the kept pixels
                part, part_label = part[keep], part_label[keep]
            part = part.contiguous()
            size = self._size(part)
            for group in self.groups:  # each strength of a group counted once
                preds = self._group(group, part, size)
                counts = pixel_counts(preds, part_label, num_classes, ignore_index)
                total[group.rows] += counts[group.slots]
        return total

    def _size(self, z: torch.Tensor) -> float:
        """The largest ``|z|`` of a step, for the linear groups' error bound (0 without one)."""
        linear = any(group.kind == "linear" for group in self.groups)
        return float(z.abs().amax()) if linear and z.numel() else 0.0

    def _chunk(self, z: torch.Tensor) -> torch.Tensor:
        """``(R, n)`` predictions of one contiguous ``(n, C)`` step."""
        out = torch.empty((self.num_rows, z.shape[0]), dtype=torch.long, device=z.device)
        size = self._size(z)
        for group in self.groups:
            preds = self._group(group, z, size)
            for row, slot in zip(group.rows, group.slots, strict=True):
                out[row] = preds[slot]
        return out

    def _group(self, group: _Group, z: torch.Tensor, size: float) -> torch.Tensor:
        """``(T, n)``: one prediction per strength of the group, in the order of ``group.taus``.

        ``size`` is the largest ``|z|`` of the step.
        """
        if group.kind == "plain":
            return last_argmax(z)[None]  # what correct_image predicts for an identity
        if group.kind == "aligned":
            assert isinstance(group.corrector, Aligned)
            return self._aligned(group, group.corrector, z)
        if group.kind == "linear":
            return _linear(group, z, size)
        return torch.stack([group.corrector.log_scores(z, t).argmax(-1) for t in group.taus])

    def _wide_table(
        self, group: _Group, maps: AlignmentMaps
    ) -> tuple[torch.Tensor, torch.Tensor, LookupTables]:
        """What a group's strengths need, built once per run (not once per chunk).

        Returns:
            ``(C_j * G, T * C_i)`` every strength's ``exp_shift`` table side by side, the
            ``(T,)`` offsets of those tables, and the first strength's tables without their
            ``exp_shift`` (the parts that do not depend on ``tau``). Keeping them here means
            the maps' lookup cache, which holds only a few tables of many classes, is not
            asked again for every chunk.
        """
        key = id(group)
        if key not in self._wide:
            tables = [lookup_tables(maps, t) for t in group.taus]
            wide = torch.cat([table.exp_shift for table in tables], dim=1).contiguous()
            offsets = torch.tensor([table.offset for table in tables], device=wide.device)
            light = replace(tables[0], exp_shift=torch.empty(0))  # no view: frees the table
            self._wide[key] = (wide, offsets, light)
        return self._wide[key]

    def _aligned(self, group: _Group, corrector: Aligned, z: torch.Tensor) -> torch.Tensor:
        """``(T, n)``: every strength of one BLDA correction, as corrected_log_scores does.

        The scores of :meth:`aligned_scores`; pixels with a logit beyond the grid, whose
        weight depends on ``tau`` there, are scored by ``corrected_log_scores`` itself.
        """
        maps = corrector.maps
        base = z if corrector.pre is None else corrector.pre.apply(z)
        pred = last_argmax(self.aligned_scores(group, maps, base))  # (N, T)
        g = maps.table.shape[-1]
        low, high = maps.lo, maps.lo + maps.step * (g - 1)
        if within(base, low, high):
            return pred.T
        outside = (base != base.clamp(low, high)).any(1).nonzero().squeeze(1)
        if outside.numel():  # the tau-dependent weight of logits beyond the grid
            for slot, tau in enumerate(group.taus):
                pred[outside, slot] = last_argmax(corrected_log_scores(base[outside], maps, tau))
        return pred.T

    def aligned_scores(
        self, group: _Group, maps: AlignmentMaps, base: torch.Tensor
    ) -> torch.Tensor:
        """``(n, T, C)``: the log-scores of every strength of a BLDA group, batched.

        The operations are those of :func:`~blda_posthoc.core.align.corrected_log_scores` on
        ``(n, T, C)`` tensors (strength ``t`` in slice ``[:, t]``): the same values bit for bit
        (tested) for logits inside the grid; beyond it they lack the ``tau``-dependent weight.

        Args:
            group: An ``"aligned"`` group of this predictor.
            maps: Its correction's maps.
            base: ``(n, C)`` contiguous logits, calibrated when the correction calibrates.
        """
        n, c = base.shape
        wide, offsets, first = self._wide_table(group, maps)
        g = wide.shape[0] // c
        t = len(group.taus)
        inside = base.clamp(maps.lo, maps.lo + maps.step * (g - 1))
        pos = (inside - maps.lo) / maps.step
        k = pos.floor().clamp_(max=g - 2)
        frac = pos - k
        rows = k.long()
        rows += torch.arange(c, device=base.device) * g
        next_rows = rows + 1
        top = base.amax(1, keepdim=True)
        weight = torch.exp(base - top)  # (N, C_j)
        # Inside the grid the weight does not depend on tau (exp(-tau * 0) = 1): one wide bag.
        # In-place steps compute the values of corrected_log_scores' expressions.
        bag = F.embedding_bag(rows, wide, per_sample_weights=weight * (1 - frac), mode="sum")
        bag += F.embedding_bag(next_rows, wide, per_sample_weights=weight * frac, mode="sum")
        log_total = bag.log_().view(n, t, c)
        log_total += offsets.to(log_total.dtype)[:, None]
        if not first.all_valid:  # the cells without a shift do not depend on tau
            _add_skipped(log_total, weight @ first.skipped, first.skip_columns)
        t0, t1 = own_at(first.own, rows), own_at(first.own, next_rows)
        t1 -= t0
        t1 *= frac
        own_shift = t0.add_(t1)
        own_shift -= base  # t0 + frac * (t1 - t0) - base
        if not first.own_valid:  # a factor of 1 everywhere changes nothing
            own_shift *= maps.valid.diagonal()
        # base + tau * own_shift - top - log_total, in that order, for every strength
        scores = _strengths(group, base)[:, None] * own_shift[:, None, :]
        scores += base[:, None, :]
        scores -= top[:, :, None]
        scores -= log_total
        return scores


def _add_skipped(log_total: torch.Tensor, extra: torch.Tensor, cols: torch.Tensor | None) -> None:
    """``log_total[:, t] = logaddexp(log_total[:, t], log(extra))`` for every strength ``t``.

    As :func:`~blda_posthoc.core.align.corrected_log_scores` adds the cells without a shift
    (only on ``cols`` when given: elsewhere ``extra`` is 0), on operands of the same shapes
    and layout: torch computes the last few elements of an elementwise pass, and broadcast or
    strided operands, by another (scalar) path that can round transcendental functions
    differently, so the strengths are taken one contiguous ``(N, C)`` slice at a time.

    Args:
        log_total: ``(N, T, C)`` log-sums of the shifted cells, changed in place.
        extra: ``(N, C)`` weights of the cells without a shift.
        cols: The hypotheses with such a cell, or None for all of them.
    """
    log_extra = torch.log(extra if cols is None else extra[:, cols])
    for slot in range(log_total.shape[1]):
        if cols is None:
            log_total[:, slot] = torch.logaddexp(log_total[:, slot].contiguous(), log_extra)
        else:
            log_total[:, slot, cols] = torch.logaddexp(log_total[:, slot, cols], log_extra)


def _linear(group: _Group, z: torch.Tensor, size: float) -> torch.Tensor:
    """``(T, n)``: every strength of a Shift or Blended correction, as its log_scores does.

    The scores of one strength are a per-class affine map of the logits whose coefficients
    are linear in ``tau`` (``z + tau * shift``; ``z * (1 + tau * (scale - 1)) + tau * bias``),
    so the gap between two classes is linear in ``tau``: a class that leads every other one at
    the smallest and at the largest strength of the group leads at every strength in between,
    by at least the smaller of its two leads. Where that lead, less the float error of the
    scores (:func:`_linear_slack`), exceeds :data:`LINEAR_MARGIN` at both ends, the pixel's
    prediction is that class at every strength: argmax and ``log_softmax`` cannot disagree on a
    pixel whose top two scores are that far apart. The other pixels are evaluated at every
    strength (:func:`_linear_exact`). The predictions are those of ``log_scores`` bit for bit.
    """
    taus = group.taus
    if len(taus) <= 2:
        return _linear_exact(group.corrector, z, taus)
    ends = [min(taus), max(taus)]
    scores = _linear_scores(group.corrector, z, ends)  # (n, 2, C)
    best = scores.max(-1)  # values and indices (n, 2); ties go to the first index
    runner = scores.scatter_(-1, best.indices[..., None], -torch.inf).amax(-1)
    lead = (best.values - runner).amin(-1)
    limit = 4 * _linear_slack(group.corrector, size, ends[1], z.dtype) + LINEAR_MARGIN
    proven = (best.indices[:, 0] == best.indices[:, 1]) & (lead > limit)
    pred = best.indices[:, 0].expand(len(taus), -1).clone()
    rest = (~proven).nonzero().squeeze(1)
    if rest.numel():
        pred[:, rest] = _linear_exact(group.corrector, z[rest], taus)
    return pred


LINEAR_MARGIN = 2.0**-16
"""Lead (beyond the float error) above which the argmax of a Shift or Blended row's scores is
also the argmax of their ``log_softmax``: subtracting the pixel's log-sum-exp (at most
``log(255)`` above the top score) can merge only scores closer than about ``2**-21``."""


def _linear_scores(corrector: Corrector, z: torch.Tensor, taus: Sequence[float]) -> torch.Tensor:
    """``(n, T, C)``: the scores of every strength, as ``log_scores`` computes them.

    The per-class terms of strength ``t`` are computed as ``log_scores`` computes them for
    ``tau = taus[t]``, one ``(T, C)`` row each (the same float operations, batched).
    """
    t = torch.tensor(taus, dtype=z.dtype, device=z.device)[:, None]  # (T, 1)
    if isinstance(corrector, Shift):  # z + tau * shift
        return z[:, None, :] + t * corrector.shift
    assert isinstance(corrector, Blended)  # z * (1 + tau * (scale - 1)) + tau * bias
    scores = z[:, None, :] * (1 + t * (corrector.scale - 1))
    scores += t * corrector.bias
    return scores


def _linear_slack(corrector: Corrector, size: float, tau: float, dtype: torch.dtype) -> float:
    """A bound of the float error of any score of :func:`_linear_scores` at strengths ``<= tau``.

    ``size`` is the largest ``|z|`` of the pixels, ``dtype`` that of the scores.

    Each of the at most six rounded operations errs by at most ``eps / 2`` of a value no larger
    than ``|z| * (1 + tau * |scale - 1|) + tau * |bias|``; four times ``eps`` of that bound plus
    one covers them with room.
    """
    if isinstance(corrector, Shift):
        size += tau * float(corrector.shift.abs().amax())
    else:
        assert isinstance(corrector, Blended)
        size *= 1 + tau * float((corrector.scale - 1).abs().amax())
        size += tau * float(corrector.bias.abs().amax())
    return 4 * torch.finfo(dtype).eps * (size + 1)


def _linear_exact(corrector: Corrector, z: torch.Tensor, taus: Sequence[float]) -> torch.Tensor:
    """``(T, n)``: the argmax of ``log_softmax`` of every strength's scores."""
    return last_argmax(torch.log_softmax(_linear_scores(corrector, z, taus), dim=-1)).T


def _strengths(group: _Group, like: torch.Tensor) -> torch.Tensor:
    """``(T,)`` the group's strengths in ``like``'s dtype (each as ``tau * tensor`` rounds it)."""
    return torch.tensor(group.taus, dtype=like.dtype, device=like.device)


def pixel_counts(
    preds: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Confusion counts of every row at once.

    Args:
        preds: ``(R, N)`` predictions in ``0 .. C-1``.
        label: ``(N,)`` true class ids; ``ignore_index`` pixels are skipped.
        num_classes: ``C``.
        ignore_index: The label value to skip.

    Returns:
        ``(R, C, C + 1)`` int64 counts laid out as
        :class:`~blda_posthoc.core.evaluate.ConfusionMatrix` holds them (column ``C``: a
        prediction outside ``0 .. C-1``, which these rows never make).

    Raises:
        ValueError: A label outside ``0 .. C-1`` that is not ``ignore_index``.
    """
    c = num_classes
    y = label.reshape(-1).long()
    keep = (y != ignore_index).nonzero().squeeze(1)
    if keep.numel() < y.numel():
        preds, y = preds[:, keep], y[keep]
    r = preds.shape[0]
    if y.numel():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= c:
            bad = low if low < 0 else high
            raise ValueError(
                f"label value {bad} is outside 0..{c - 1} and is not the ignore value "
                f"{ignore_index}"
            )
    cells = c * (c + 1)
    index = preds + (y * (c + 1))[None]
    index += cells * torch.arange(r, device=preds.device)[:, None]
    return torch.bincount(index.reshape(-1), minlength=r * cells).reshape(r, c, c + 1)
