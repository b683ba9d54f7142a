"""Predictions of many (correction, strength) rows of the same pixels, sharing their work.

``compare`` evaluates every method at every strength on the same images. Evaluated row by row,
each row repeats what does not depend on it; here the rows are grouped:

- rows that are the plain argmax (``none``, and any strength-0 identity) share one argmax;
- the BLDA rows of one :class:`~blda_posthoc.core.methods.Aligned` correction differ only in
  ``tau``: the calibration, the grid positions of every logit, the weights ``exp(z - max z)``
  and the diagonal maps are computed once, and the tabulated ``exp(tau * D_ij)`` of all their
  strengths sit side by side in one wide table, so one embedding-bag pass gathers every
  strength's sums (the same rows of the same table as one strength alone reads, each column
  summed in the same order, so every value is bit for bit the one-row value);
- every other correction (including ones this module does not know) is evaluated by its own
  ``log_scores``, as a single row is.

Each row's prediction is therefore exactly the argmax of
:func:`blda_posthoc.core.correct.correct_image` for that row (the tests compare them); pixels
that a shared path cannot treat exactly (a logit outside the statistics' grid, where the BLDA
weight depends on ``tau``) go through the row's own ``log_scores``.

Shape legend: N pixels, C classes, R rows, T strengths of one group, G grid points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from blda_posthoc.core.align import AlignmentMaps, corrected_log_scores, lookup_tables
from blda_posthoc.core.methods import Aligned, Corrector

DEFAULT_ROW_CHUNK = 1 << 15
"""Pixels per step: the wide BLDA bags are ``(N, T * C)``, about 20 MB at 19 classes, 8 taus."""


@dataclass
class _Group:
    """Rows that share work: their indices in the row list and their strengths."""

    kind: str  # "plain", "aligned" or "own"
    corrector: Corrector
    rows: list[int] = field(default_factory=list)
    taus: list[float] = field(default_factory=list)


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
        by_key: dict[tuple[str, int], _Group] = {}
        for index, (corrector, tau) in enumerate(rows):
            tau = float(tau)
            if corrector.is_identity(tau):
                key = ("plain", 0)
            elif isinstance(corrector, Aligned) and tau != 0:
                key = ("aligned", id(corrector))
            else:
                key = ("own", index)
            group = by_key.get(key)
            if group is None:
                group = by_key[key] = _Group(key[0], corrector)
                self.groups.append(group)
            group.rows.append(index)
            group.taus.append(tau)
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
            for row, pred in zip(group.rows, self._group(group, z), strict=True):
                out[row] = pred
        return out

    def _group(self, group: _Group, z: torch.Tensor) -> list[torch.Tensor]:
        if group.kind == "plain":
            plain = z.argmax(-1)  # what correct_image predicts for an identity
            return [plain] * len(group.rows)
        if group.kind == "aligned":
            assert isinstance(group.corrector, Aligned)
            return self._aligned(group, group.corrector, z)
        return [group.corrector.log_scores(z, t).argmax(-1) for t in group.taus]

    def _wide_table(self, group: _Group, maps: AlignmentMaps) -> torch.Tensor:
        """``(C_j * G, T * C_i)``: every strength's ``exp_shift`` table side by side."""
        key = id(group)
        if key not in self._wide:
            tables = [lookup_tables(maps, t).exp_shift for t in group.taus]
            self._wide[key] = torch.cat(tables, dim=1).contiguous()
        return self._wide[key]

    def _aligned(self, group: _Group, corrector: Aligned, z: torch.Tensor) -> list[torch.Tensor]:
        """Every strength of one BLDA correction, computed as corrected_log_scores does."""
        maps = corrector.maps
        base = z if corrector.pre is None else corrector.pre.apply(z)
        n, c = base.shape
        wide = self._wide_table(group, maps)
        g = wide.shape[0] // c
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
        skipped = None if bool(maps.valid.all()) else weight
        first = lookup_tables(maps, group.taus[0])
        own = first.own.reshape(-1)
        t0, t1 = own.take(rows), own.take(rows + 1)
        own_shift = (t0 + frac * (t1 - t0) - base) * maps.valid.diagonal()
        outside = (base != inside).any(1).nonzero().squeeze(1)
        preds = []
        for t, tau in enumerate(group.taus):
            tables = lookup_tables(maps, tau)
            log_total = torch.log(bag[:, t * c : (t + 1) * c]) + tables.offset
            if skipped is not None:
                log_total = torch.logaddexp(log_total, torch.log(skipped @ tables.skipped))
            pred = (base + tau * own_shift - top - log_total).argmax(-1)
            if outside.numel():  # the tau-dependent weight of logits beyond the grid
                pred[outside] = corrected_log_scores(base[outside], maps, tau).argmax(-1)
            preds.append(pred)
        return preds


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
