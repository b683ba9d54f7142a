"""One image's logits resized to its output size and corrected: the prediction and scores.

Shape legend: C classes, h x w logit size, H x W output size, N pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from blda_posthoc.core.align import DEFAULT_TAU, default_chunk
from blda_posthoc.core.fit import channel_argmax, last_argmax
from blda_posthoc.core.methods import Corrector
from blda_posthoc.core.relabel import confidence_logodds


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


SLAB_PIXELS = 1 << 18
"""Output pixels per band of :func:`resized_rows` on the CPU (1 MB of float32 per channel
plane: a band's planes are read again while they are still in the cache)."""
BAND_MIN_WIDTH = 128
"""Narrowest output width :func:`resized_rows` cuts into bands (see there)."""
PIXEL_ALIGN = 128
"""Bands and default chunks hold multiples of this many pixels. Torch's reductions over a
pixel's channels take the last few pixels of a range (below a multiple of 16 per thread) by
another path, which can round differently; aligned pieces keep every pixel where the whole
image has it (see :func:`image_confidence`)."""


def resized_rows(
    logits: torch.Tensor, size: tuple[int, int], max_pixels: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`resize_logits` of ``(C, h, w)`` logits, bit for bit, a band of rows at a time.

    When ``H`` is ``h`` times a power of two, each band of input rows is resized with one row
    of its neighbours on either side and cropped: the bilinear weights are then multiples of a
    power of two, the same in the band as in the whole image, so every value equals the whole
    resize's (tested). Torch picks its kernel by the output size (a separable one once
    ``H + W`` reaches 128, with other rounding), so bands are only cut when ``W`` alone
    reaches :data:`BAND_MIN_WIDTH` (a band and the whole image then get the same kernel).
    Other sizes come as one band (the whole resize); so does any size when ``max_pixels`` is
    None.

    Args:
        logits: ``(C, h, w)`` logits (float32, or converted to it).
        size: Output ``(H, W)``.
        max_pixels: About the most output pixels per band (at least one input row's worth).

    Yields:
        ``(first output row, (C, r, W) float32 rows)``, top to bottom, covering ``H``; every
        band but the last holds a multiple of :data:`PIXEL_ALIGN` pixels.
    """
    z = logits.float()
    (h, w), (big_h, big_w) = tuple(z.shape[1:]), size
    factor = big_h // h
    narrow = big_w < BAND_MIN_WIDTH or w < 2
    if max_pixels is None or narrow or factor < 1 or big_h % h or factor & (factor - 1):
        yield 0, resize_logits(z, size)
        return
    assert max_pixels is not None
    unit = PIXEL_ALIGN // math.gcd(PIXEL_ALIGN, factor * big_w)  # input rows: aligned bands
    band = max(unit, max_pixels // (factor * big_w) // unit * unit)  # input rows per band
    for start in range(0, h, band):
        stop = min(start + band, h)
        if w == big_w and factor == 1:
            yield start, z[:, start:stop]
            continue
        low, high = max(start - 1, 0), min(stop + 1, h)
        part = resize_logits(z[:, low:high], ((high - low) * factor, big_w))
        first = (start - low) * factor
        yield start * factor, part[:, first : first + (stop - start) * factor]


def _bands(
    logits: torch.Tensor, size: tuple[int, int], step: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first pixel, (C, n) planes)`` of the resized image, band by band (see above)."""
    limit = max(SLAB_PIXELS, step) if logits.device.type == "cpu" else None
    for row, rows in resized_rows(logits, size, limit):
        yield row * size[1], rows.reshape(rows.shape[0], -1)


def _image_chunks(
    logits: torch.Tensor,
    size: tuple[int, int],
    step: int,
    plain: torch.Tensor | None,
    chunks: bool = True,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """The resized image band by band (:func:`_bands`), as chunks of pixel rows.

    Args:
        logits: ``(C, h, w)`` logits.
        size: Output ``(H, W)``.
        step: Pixels per chunk.
        plain: ``(H * W,)`` int64 buffer filled with the plain argmax of each band, or None.
        chunks: Whether to yield the chunks (False: only fill ``plain``).

    Yields:
        ``(the chunk's flat output pixels, (n, C) pixel rows)``, as ``correct_image``'s rows.
    """
    for first, planes in _bands(logits, size, step):
        if plain is not None:
            plain[first : first + planes.shape[1]] = channel_argmax(planes)
        if not chunks:
            continue
        for start in range(0, planes.shape[1], step):
            pixels = planes[:, start : start + step].T.contiguous()
            yield slice(first + start, first + start + pixels.shape[0]), pixels


def predict_image(
    logits: torch.Tensor,
    size: tuple[int, int],
    corrector: Corrector,
    tau: float = DEFAULT_TAU,
    chunk_pixels: int | None = None,
) -> torch.Tensor:
    """The prediction of :func:`correct_image` alone, without its scores (less time, memory).

    Equal to ``correct_image(...)[0]``; see :func:`plain_and_predicted`.

    Args:
        logits: ``(C, h, w)`` float32 logits.
        size: Output ``(H, W)``.
        corrector: The correction, on the logits' device.
        tau: Correction strength.
        chunk_pixels: Pixels per step (memory bound; the result does not depend on it).

    Returns:
        ``(H, W)`` int64 prediction.
    """
    return plain_and_predicted(logits, size, corrector, tau, chunk_pixels, plain=False)[1]


def plain_and_predicted(
    logits: torch.Tensor,
    size: tuple[int, int],
    corrector: Corrector,
    tau: float = DEFAULT_TAU,
    chunk_pixels: int | None = None,
    *,
    plain: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The plain argmax and the corrected prediction of an image, resized band by band.

    The logits are resized a band of rows at a time (:func:`resized_rows`), so the whole
    ``(C, H, W)`` image never exists; the plain argmax runs over the channel planes of each
    band (:func:`channel_argmax`), a correction transposes and scores one chunk of pixels at a
    time. Equal to ``channel_argmax(resize_logits(logits, size))`` and
    ``correct_image(logits, size, corrector, tau)[0]``, for any ``chunk_pixels``.

    Args:
        logits: ``(C, h, w)`` logits (at any size; ``(C, H, W)`` ones are used as they are).
        size: Output ``(H, W)``.
        corrector: The correction, on the logits' device.
        tau: Correction strength.
        chunk_pixels: Pixels per step of the correction.
        plain: Also return the plain argmax (for the identity it is the prediction itself).

    Returns:
        ``plain`` ``(H, W)`` int64 (None without ``plain``) and ``pred`` ``(H, W)`` int64.
    """
    c = logits.shape[0]
    identity = corrector.is_identity(tau)
    step = chunk_pixels or default_chunk(c)
    pred = torch.empty(size[0] * size[1], dtype=torch.long, device=logits.device)
    before = None  # the plain argmax, filled band by band (for the identity: the prediction)
    if identity:
        before = pred
    elif plain:
        before = torch.empty_like(pred)
    for at, pixels in _image_chunks(logits, size, step, before, chunks=not identity):
        pred[at] = last_argmax(corrector.log_scores(pixels, tau))
    return (before.reshape(size) if plain and before is not None else None), pred.reshape(size)


def image_confidence(
    logits: torch.Tensor,
    size: tuple[int, int],
    corrector: Corrector,
    tau: float = DEFAULT_TAU,
    chunk_pixels: int | None = None,
    *,
    plain: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Plain argmax, corrected pseudo-label and its confidence log-odds, without full scores.

    Equal to ``channel_argmax(z)`` and ``confidence_logodds(correct_image(logits, size,
    corrector, tau)[1])`` with ``z = resize_logits(logits, size)``: the same log-scores, one
    chunk of pixels at a time (:func:`blda_posthoc.core.relabel.confidence_logodds` on each
    chunk's channel-major view, as on the whole image's), so no ``(C, H, W)`` scores or
    copies of them are kept. The prediction is the same for any ``chunk_pixels``; the
    log-odds are bit for bit those of the whole image with the default chunks (multiples of
    :data:`PIXEL_ALIGN` pixels), and may differ by a unit in the last place near the end of
    other chunks.

    Args:
        logits: ``(C, h, w)`` logits (at any size; ``(C, H, W)`` ones are used as they are).
        size: Output ``(H, W)``.
        corrector: The correction, on the logits' device.
        tau: Correction strength.
        chunk_pixels: Pixels per step.
        plain: Also return the plain argmax.

    Returns:
        ``plain`` ``(H, W)`` int64 (None without ``plain``), ``pred`` ``(H, W)`` int64 and
        ``logodds`` ``(H, W)`` float32.
    """
    c = logits.shape[0]
    identity = corrector.is_identity(tau)
    step = chunk_pixels or default_chunk(c)
    n = size[0] * size[1]
    pred = torch.empty(n, dtype=torch.long, device=logits.device)
    before = torch.empty_like(pred) if plain else None
    logodds = torch.empty(n, dtype=torch.float32, device=logits.device)
    for at, pixels in _image_chunks(logits, size, step, before):
        scores = (
            torch.log_softmax(pixels, dim=-1) if identity else corrector.log_scores(pixels, tau)
        )
        pred[at], logodds[at] = confidence_logodds(scores.T)
    shaped = None if before is None else before.reshape(size)
    return shaped, pred.reshape(size), logodds.reshape(size)
