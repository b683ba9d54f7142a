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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from blda_posthoc.core.align import AlignmentMaps, corrected_log_scores, lookup_tables
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
        self._wide: dict[int, torch.Tensor] = {}

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

    def counts(self, z: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Every row's confusion counts of pixels, step by step (no ``(R, N)`` buffer).

        Args:
            z: ``(N, C)`` float32 logits (any strides).
            label: ``(N,)`` true class ids (255 = ignore).
            num_classes: ``C``.

        Returns:
            ``(R, C, C + 1)`` int64 counts (see :func:`pixel_counts`).

        Raises:
            ValueError: A label outside ``0 .. C-1`` that is not 255.
        """
        total = torch.zeros(
            (self.num_rows, num_classes, num_classes + 1), dtype=torch.long, device=z.device
        )
        for start in range(0, z.shape[0], self.chunk_pixels):
            part = z[start : start + self.chunk_pixels].contiguous()
            stop = start + part.shape[0]
            total += pixel_counts(self._chunk(part), label[start:stop], num_classes)
        return total

    def _chunk(self, z: torch.Tensor) -> torch.Tensor:
        """``(R, n)`` predictions of one contiguous ``(n, C)`` step."""
        out = torch.empty((self.num_rows, z.shape[0]), dtype=torch.long, device=z.device)
        for group in self.groups:
            preds = self._group(group, z)
            for row, slot in zip(group.rows, group.slots, strict=True):
                out[row] = preds[slot]
        return out

    def _group(self, group: _Group, z: torch.Tensor) -> torch.Tensor:
        """``(T, n)``: one prediction per strength of the group, in the order of ``group.taus``."""
        if group.kind == "plain":
            return z.argmax(-1)[None]  # what correct_image predicts for an identity
        if group.kind == "aligned":
            assert isinstance(group.corrector, Aligned)
            return self._aligned(group, group.corrector, z)
        if group.kind == "linear":
            return _linear(group, z)
        return torch.stack([group.corrector.log_scores(z, t).argmax(-1) for t in group.taus])

    def _wide_table(self, group: _Group, maps: AlignmentMaps) -> torch.Tensor:
        """``(C_j * G, T * C_i)``: every strength's ``exp_shift`` table side by side."""
        key = id(group)
        if key not in self._wide:
            tables = [lookup_tables(maps, t).exp_shift for t in group.taus]
            self._wide[key] = torch.cat(tables, dim=1).contiguous()
        return self._wide[key]

    def _aligned(self, group: _Group, corrector: Aligned, z: torch.Tensor) -> torch.Tensor:
        """``(T, n)``: every strength of one BLDA correction, as corrected_log_scores does.

        The operations are those of :func:`~blda_posthoc.core.align.corrected_log_scores` on
        ``(n, T, C)`` tensors (strength ``t`` in slice ``[:, t]``): the same values, batched.
        """
        maps = corrector.maps
        base = z if corrector.pre is None else corrector.pre.apply(z)
        n, c = base.shape
        wide = self._wide_table(group, maps)
        g = wide.shape[0] // c
        t = len(group.taus)
        inside = base.clamp(maps.lo, maps.lo + maps.step * (g - 1))
        pos = (inside - maps.lo) / maps.step
        k = pos.floor().clamp_(max=g - 2)
        frac = pos - k
        rows = k.long() + torch.arange(c, device=base.device) * g
        top = base.amax(1, keepdim=True)
        weight = torch.exp(base - top)  # (N, C_j)
        # Inside the grid the weight does not depend on tau (exp(-tau * 0) = 1): one wide bag.
        bag = F.embedding_bag(
            rows, wide, per_sample_weights=weight * (1 - frac), mode="sum"
        ) + F.embedding_bag(rows + 1, wide, per_sample_weights=weight * frac, mode="sum")
        offsets = [lookup_tables(maps, tau).offset for tau in group.taus]
        log_total = torch.log(bag).view(n, t, c)
        log_total += torch.tensor(offsets, dtype=log_total.dtype, device=base.device)[:, None]
        first = lookup_tables(maps, group.taus[0])
        if not bool(maps.valid.all()):  # the cells without a shift do not depend on tau
            log_total = torch.logaddexp(log_total, torch.log(weight @ first.skipped)[:, None])
        own = first.own.reshape(-1)
        t0, t1 = own.take(rows), own.take(rows + 1)
        own_shift = (t0 + frac * (t1 - t0) - base) * maps.valid.diagonal()
        # base + tau * own_shift - top - log_total, in that order, for every strength
        scores = _strengths(group, base)[:, None] * own_shift[:, None, :]
        scores += base[:, None, :]
        scores -= top[:, :, None]
        scores -= log_total
        pred = scores.argmax(-1)  # (N, T)
        outside = (base != inside).any(1).nonzero().squeeze(1)
        if outside.numel():  # the tau-dependent weight of logits beyond the grid
            for slot, tau in enumerate(group.taus):
                pred[outside, slot] = corrected_log_scores(base[outside], maps, tau).argmax(-1)
        return pred.T


def _linear(group: _Group, z: torch.Tensor) -> torch.Tensor:
    """``(T, n)``: every strength of a Shift or Blended correction, as its log_scores does.

    The per-class terms of strength ``t`` are computed as ``log_scores`` computes them for
    ``tau = taus[t]``, one ``(T, C)`` row each; the scores of all strengths are then one
    ``(n, T, C)`` tensor, log-softmaxed and reduced in one call each.
    """
    corrector = group.corrector
    taus = _strengths(group, z)[:, None]  # (T, 1)
    if isinstance(corrector, Shift):  # z + tau * shift
        scores = z[:, None, :] + taus * corrector.shift
    else:  # Blended: z * (1 + tau * (scale - 1)) + tau * bias
        assert isinstance(corrector, Blended)
        scores = z[:, None, :] * (1 + taus * (corrector.scale - 1))
        scores += taus * corrector.bias
    return torch.log_softmax(scores, dim=-1).argmax(-1).T


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
    y = y[keep]
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
    index = (
        preds[:, keep] + (y * (c + 1))[None] + cells * torch.arange(r, device=preds.device)[:, None]
    )
    return torch.bincount(index.reshape(-1), minlength=r * cells).reshape(r, c, c + 1)
