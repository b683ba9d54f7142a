"""Post-hoc corrections of a segmenter's logits, behind one interface (docs/method.md).

Every correction turns pixel logits ``z`` into log-scores whose argmax is the corrected
prediction. They differ in what they know:

- ``none``: the plain argmax (``log_softmax(z)``).
- ``blda``: anchor alignment of the class-conditional logit distributions
  (:func:`blda_posthoc.core.correct.corrected_log_scores`); ``calibrated-blda`` aligns calibrated
  logits with statistics fitted on calibrated logits; ``filled-blda`` borrows source cells where
  target pseudo-labels leave a cell empty.
- ``temperature`` / ``vector-scaling`` / ``bias``: an affine map ``a * z + b`` fitted by
  cross-entropy on labelled (source) logits; ``vector-scaling`` and ``bias`` are applied ``tau``
  of the way (``temperature`` has no strength).
- ``cbst``, ``em-map``, ``ot-prior``, ``occurrence-adjust``, ``logit-adjust``: a per-class
  additive shift ``z + tau * shift``, from class-balanced confidence thresholds, an EM estimate
  of the target class priors with a Dirichlet hyper-prior, optimal-transport offsets to that
  estimate, per-image class occurrence (Liu et al. 2022), or the predicted class shares;
  ``em-map`` estimates on calibrated logits and applies calibration and shift together ``tau``
  of the way.
- ``self-calibrate``: a per-class affine map fitted on target logits against class-balanced
  confident pseudo-labels of a corrected prediction, applied ``tau`` of the way.

A correction's strength is ``tau``; every correction with a strength is the identity at
``tau = 0``. Corrections are immutable; one object serves every ``tau`` (``compare`` evaluates a
whole grid with one).

Shape legend: N pixels, C classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from blda_posthoc.core import defaults
from blda_posthoc.core.align import AlignmentMaps, corrected_log_scores

# Defined where `blda CMD -h` reads them (no torch there); re-exported here.
DEFAULT_TAUS = defaults.DEFAULT_TAUS
METHODS = defaults.METHODS
has_strength = defaults.has_strength
COMPARE_DEFAULT = defaults.COMPARE_DEFAULT
NOT_IN_COMPARE_DEFAULT = defaults.NOT_IN_COMPARE_DEFAULT
removed_reason = defaults.removed_reason


class Corrector(Protocol):
    """What every correction offers."""

    def log_scores(self, z: torch.Tensor, tau: float) -> torch.Tensor:
        """``(N, C)`` logits (float32) -> ``(N, C)`` log-scores; argmax = prediction."""
        ...

    def is_identity(self, tau: float) -> bool:
        """Whether the argmax is the plain argmax at this ``tau`` (no work needed)."""
        ...

    def to(self, device: torch.device | str) -> Corrector:
        """The same correction with its tensors on ``device``."""
        ...


@dataclass(frozen=True)
class Plain:
    """The plain argmax (``--method none``)."""

    def log_scores(self, z: torch.Tensor, tau: float) -> torch.Tensor:
        """``log_softmax(z)``."""
        return torch.log_softmax(z, dim=-1)

    def is_identity(self, tau: float) -> bool:
        """Always."""
        return True

    def to(self, device: torch.device | str) -> Plain:
        """Itself."""
        return self


@dataclass(frozen=True)
class Affine:
    """``z' = scale * z + bias`` per class (temperature, vector scaling, bias).

    Attributes:
        scale: ``(C,)`` float32.
        bias: ``(C,)`` float32.
    """

    scale: torch.Tensor
    bias: torch.Tensor

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` logits -> ``(N, C)`` calibrated logits."""
        return z * self.scale + self.bias

    def log_scores(self, z: torch.Tensor, tau: float) -> torch.Tensor:
        """``log_softmax(scale * z + bias)``; ``tau`` is not used."""
        return torch.log_softmax(self.apply(z), dim=-1)

    def is_identity(self, tau: float) -> bool:
        """Never (the map has no strength)."""
        return False

    def to(self, device: torch.device | str) -> Affine:
        """On ``device``."""
        return Affine(self.scale.to(device), self.bias.to(device))


@dataclass(frozen=True)
class Blended:
    """An affine map applied ``tau`` of the way: ``z' = (1 + tau (scale - 1)) z + tau bias``.

    That is the log-linear blend ``(1 - tau) z + tau (scale z + bias)`` of the raw logits and the
    fully mapped ones: the identity at ``tau = 0``, the whole map at ``tau = 1``.

    Attributes:
        scale: ``(C,)`` float32 per-class scale at ``tau = 1``.
        bias: ``(C,)`` float32 per-class bias at ``tau = 1``.
    """

    scale: torch.Tensor
    bias: torch.Tensor

    def log_scores(self, z: torch.Tensor, tau: float) -> torch.Tensor:
        """``log_softmax`` of the blended map of ``z``."""
        return torch.log_softmax(z * (1 + tau * (self.scale - 1)) + tau * self.bias, dim=-1)

    def is_identity(self, tau: float) -> bool:
        """At ``tau = 0``."""
        return tau == 0

    def to(self, device: torch.device | str) -> Blended:
        """On ``device``."""
        return Blended(self.scale.to(device), self.bias.to(device))


@dataclass(frozen=True)
class Shift:
    """``z' = z + tau * shift``: one additive term per class.

    Attributes:
        shift: ``(C,)`` float32 per-class shift at ``tau = 1``.
    """

    shift: torch.Tensor

    def log_scores(self, z: torch.Tensor, tau: float) -> torch.Tensor:
        """``log_softmax(z + tau * shift)``."""
        return torch.log_softmax(z + tau * self.shift, dim=-1)

    def is_identity(self, tau: float) -> bool:
        """At ``tau = 0``."""
        return tau == 0

    def to(self, device: torch.device | str) -> Shift:
        """On ``device``."""
        return Shift(self.shift.to(device))


@dataclass(frozen=True)
class Aligned:
    """BLDA anchor alignment, optionally of calibrated logits.

    Attributes:
        maps: Tabulated maps ``T_ij`` (fitted on calibrated logits when ``pre`` is set).
        pre: A calibration applied before the alignment, or None.
    """

    maps: AlignmentMaps
    pre: Affine | None = None

    def log_scores(self, z: torch.Tensor, tau: float) -> torch.Tensor:
        """Corrected log-scores of ``pre(z)`` (not normalised)."""
        base = z if self.pre is None else self.pre.apply(z)
        return corrected_log_scores(base, self.maps, tau)

    def is_identity(self, tau: float) -> bool:
        """At ``tau = 0`` without a calibration."""
        return tau == 0 and self.pre is None

    def to(self, device: torch.device | str) -> Aligned:
        """On ``device`` (the maps' lookup tables are rebuilt there on first use)."""
        if self.maps.table.device == torch.device(device) and (
            self.pre is None or self.pre.scale.device == torch.device(device)
        ):
            return self
        return Aligned(self.maps.to(device), None if self.pre is None else self.pre.to(device))
