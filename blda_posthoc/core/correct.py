"""One image's logits resized to its output size and corrected: the prediction and scores.

Shape legend: C classes, h x w logit size, H x W output size, N pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blda_posthoc.core.align import DEFAULT_TAU, default_chunk
from blda_posthoc.core.fit import channel_argmax
from blda_posthoc.core.methods import Corrector


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of ``(C, h, w)`` logits to ``(C, H, W)``."""
    if tuple(logits.shape[1:]) == tuple(size):
        return logits
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]


def sample_positions(length: int, stride: int) -> torch.Tensor:
    """Indices ``stride // 2, stride // 2 + stride, ...`` below ``length``.

    Every ``stride``-th pixel, from the middle of the first block; all of them at stride 1.
    """
    return torch.arange(stride // 2, length, stride)


def _source_weights(
    length_in: int, length_out: int, at: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear (``align_corners=False``) source indices and weights of output positions."""
    # In float32, as torch computes them for float32 logits.
    scale = torch.tensor(length_in, dtype=torch.float32) / length_out
    src = (scale * (at.float() + 0.5) - 0.5).clamp(min=0.0)
    low = src.floor().long().clamp(max=length_in - 1)
    high = (low + 1).clamp(max=length_in - 1)
    frac = src - low
    return low, high, 1 - frac, frac


def sample_logits(
    logits: torch.Tensor, size: tuple[int, int], stride: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The resized logits at every ``stride``-th pixel of each axis, without resizing the rest.

    Equals ``resize_logits(logits, size)[:, rows][:, :, cols]`` up to float rounding (the
    same four neighbours and weights; only the order of the float operations may differ, by
    a few units in the last place); with ``stride`` 1 it is :func:`resize_logits` itself.

    Args:
        logits: ``(C, h, w)`` float32 logits.
        size: The full output ``(H, W)``.
        stride: Keep every ``stride``-th row and column (see :func:`sample_positions`).

    Returns:
        ``(C, H', W')`` logits and the kept ``rows`` ``(H',)`` and ``cols`` ``(W',)``.
    """
    rows, cols = sample_positions(size[0], stride), sample_positions(size[1], stride)
    if stride == 1:
        return resize_logits(logits, size), rows, cols
    if tuple(logits.shape[1:]) == tuple(size):
        return logits[:, rows.to(logits.device)][:, :, cols.to(logits.device)], rows, cols
    device = logits.device
    h0, h1, a0, a1 = (t.to(device) for t in _source_weights(logits.shape[1], size[0], rows))
    w0, w1, b0, b1 = (t.to(device) for t in _source_weights(logits.shape[2], size[1], cols))
    upper, lower = logits[:, h0], logits[:, h1]
    top = upper[:, :, w0] * b0 + upper[:, :, w1] * b1
    bottom = lower[:, :, w0] * b0 + lower[:, :, w1] * b1
    return top * a0[:, None] + bottom * a1[:, None], rows, cols


def same_aspect(small: tuple[int, int], large: tuple[int, int]) -> bool:
    """Whether ``small = (h, w)`` is ``large = (H, W)`` scaled by one factor, up to rounding.

    The rule every resize of logits onto an image obeys: a model's output (or an imported
    array) is its input scaled by a common factor ``s`` with each side rounded, ``h = H / s +
    e_h`` and ``w = W / s + e_w`` with ``|e| < 1`` output pixel, which is exactly
    ``|h * W - w * H| < H + W``. A transposed ``(w, h)`` output, or one stretched along one
    axis, breaks it (square images cannot show a transposition).

    Example:
        >>> same_aspect((128, 256), (1024, 2048)), same_aspect((33, 65), (1025, 2049))
        (True, True)
        >>> same_aspect((256, 128), (1024, 2048)), same_aspect((640, 64), (64, 64))
        (False, False)
    """
    (h, w), (big_h, big_w) = small, large
    return abs(h * big_w - w * big_h) < big_h + big_w


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


def predict_image(
    logits: torch.Tensor,
    size: tuple[int, int],
    corrector: Corrector,
    tau: float = DEFAULT_TAU,
    chunk_pixels: int | None = None,
) -> torch.Tensor:
    """The prediction of :func:`correct_image` alone, without its scores (less time, memory).

    The plain argmax runs plane by plane over the channels (no pixel-major copy, no
    log-softmax); a correction transposes and scores one chunk of pixels at a time (no copy of
    the whole image, no score tensor kept). Equal to ``correct_image(...)[0]``.

    Args:
        logits: ``(C, h, w)`` float32 logits.
        size: Output ``(H, W)``.
        corrector: The correction, on the logits' device.
        tau: Correction strength.
        chunk_pixels: Pixels per step (memory bound; the result does not depend on it).

    Returns:
        ``(H, W)`` int64 prediction.
    """
    z = resize_logits(logits.float(), size)
    c = z.shape[0]
    if corrector.is_identity(tau):
        return channel_argmax(z)
    planes = z.reshape(c, -1)  # (C, N)
    step = chunk_pixels or default_chunk(c)
    pred = torch.empty(planes.shape[1], dtype=torch.long, device=z.device)
    for start in range(0, planes.shape[1], step):
        pixels = planes[:, start : start + step].T.contiguous()  # (n, C), as correct_image's
        pred[start : start + pixels.shape[0]] = corrector.log_scores(pixels, tau).argmax(-1)
    return pred.reshape(size)
