"""One image's logits resized to its output size and corrected: the prediction and scores.

Shape legend: C classes, h x w logit size, H x W output size, N pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blda_posthoc.core.align import DEFAULT_TAU, default_chunk
from blda_posthoc.core.methods import Corrector


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of ``(C, h, w)`` logits to ``(C, H, W)``."""
    if tuple(logits.shape[1:]) == tuple(size):
        return logits
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]


def correct_image(
    logits: torch.Tensor,
    size: tuple[int, int],
    corrector: Corrector,
    tau: float = DEFAULT_TAU,
    chunk_pixels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize an image's logits to ``size`` and correct them.

    Args:
        logits: ``(C, h, w)`` float32 logits.
        size: Output ``(H, W)``.
        corrector: The correction (:mod:`blda_posthoc.core.methods`), on the logits' device.
        tau: Correction strength.
        chunk_pixels: Pixels per step (memory bound; the result does not depend on it).

    Returns:
        ``pred`` ``(H, W)`` int64 and ``scores`` ``(C, H, W)`` float32 log-scores.
    """
    z = resize_logits(logits.float(), size)
    c = z.shape[0]
    flat = z.reshape(c, -1).T.contiguous()  # (N, C): pixel rows, one copy
    if corrector.is_identity(tau):
        scores = torch.log_softmax(flat, dim=-1)
        pred = flat.argmax(-1)
    else:
        step = chunk_pixels or default_chunk(c)
        scores = torch.cat(
            [corrector.log_scores(flat[s : s + step], tau) for s in range(0, flat.shape[0], step)]
        )
        pred = scores.argmax(-1)
    return pred.reshape(size), scores.T.reshape(c, *size)
