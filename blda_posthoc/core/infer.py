"""Running a frozen segmenter on image tensors: normalisation, resizing, sliding windows.

Pure torch: no paths, files or command-line parsing. Shape legend: ``N`` images, ``C`` classes,
``H, W`` original image size, ``h, w`` model input or output size.

Conventions follow what users of mmsegmentation expect: the mean and std are given on the
0-255 scale and applied to RGB (or BGR) pixels; sliding-window inference places windows every
``stride`` pixels, shifts the last window inwards so that it ends at the border, and averages
the logits where windows overlap.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from blda_posthoc.core import defaults
from blda_posthoc.core.correct import same_aspect

# Defined where `blda CMD -h` reads them (no torch there); re-exported here.
IMAGENET_MEAN = defaults.IMAGENET_MEAN
IMAGENET_STD = defaults.IMAGENET_STD

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "tf32": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
"""``--precision`` values and the autocast dtype each selects (None: no autocast).

``fp32`` is true float32 on CUDA too: TensorFloat-32 matrix and convolution kernels (which
torch's cuDNN convolutions use by default on Ampere and later GPUs, with about 1e-3 relative
error) are turned off while the model runs. ``tf32`` allows them (float32 storage, faster
products on such GPUs; the same as ``fp32`` on CPU)."""

Model = Callable[[torch.Tensor], Any]
"""A segmenter: ``(N, 3, h, w)`` float input to a tensor, a list/tuple or a dict of them."""


@dataclass(frozen=True)
class Preprocess:
    """How images become model input and how logits are brought back.

    Attributes:
        mean: Per-channel mean on the 0-255 scale, in the model's channel order.
        std: Per-channel standard deviation on the 0-255 scale, in the model's channel order.
        bgr: Feed channels in BGR order (mean and std are then given in BGR order too).
        scale: Resize the input by this factor before the model (None: keep).
        size: Resize the input to ``(h, w)`` before the model (None: keep); excludes ``scale``.
        window: Sliding-window size ``(h, w)`` in model-input pixels (None: whole image).
        stride: Sliding-window step ``(h, w)``; defaults to ``window``.
        logits_scale: Logits are returned at ``round(H * logits_scale), round(W * ...)``; None
            (native) keeps the model's own output size (the input size with a sliding window),
            capped at the image size. Later commands upsample bilinearly to the image size, so
            native storage loses nothing and is typically 16x smaller than full resolution.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    bgr: bool = False
    scale: float | None = None
    size: tuple[int, int] | None = None
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    logits_scale: float | None = None

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {self.mean} and {self.std}")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError(f"mean and std must be finite, got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.scale is not None and self.size is not None:
            raise ValueError("give either scale or size, not both")
        if self.scale is not None and not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be positive and finite, got {self.scale}")
        if self.logits_scale is not None and not 0 < self.logits_scale <= 1:
            raise ValueError(f"logits_scale must be in (0, 1], got {self.logits_scale}")
        for name in ("size", "window", "stride"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or min(value) < 1):
                raise ValueError(f"{name} must be two positive integers (h, w), got {value}")
        if self.stride is not None and self.window is None:
            raise ValueError("stride needs a window")


def logits_size(size: tuple[int, int], logits_scale: float) -> tuple[int, int]:
    """Size ``(h, w)`` at which logits of an ``(H, W)`` image are kept."""
    return max(1, round(size[0] * logits_scale)), max(1, round(size[1] * logits_scale))


def input_size(size: tuple[int, int], pre: Preprocess) -> tuple[int, int]:
    """Size ``(h, w)`` of the model input for an ``(H, W)`` image."""
    if pre.size is not None:
        return pre.size
    if pre.scale is not None:
        return max(1, round(size[0] * pre.scale)), max(1, round(size[1] * pre.scale))
    return size


def normalize(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Turn RGB pixels into normalised, resized model input.

    Args:
        images: ``(N, H, W, 3)`` uint8 (or float on the 0-255 scale) RGB pixels.
        pre: Channel order, mean, std and resizing.

    Returns:
        ``(N, 3, h, w)`` float32 on the device of ``images``.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB pixels, got {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float()
    if pre.bgr:
        x = x.flip(1)
    mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    target = input_size((x.shape[2], x.shape[3]), pre)
    if target != (x.shape[2], x.shape[3]):
        x = resize(x, target)
    return x.contiguous()


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(N, C, h, w)`` to ``(N, C, *size)`` (align_corners=False)."""
    if (x.shape[2], x.shape[3]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


OUTPUT_KEYS = ("out", "logits")
"""Entries tried, in order, when a model returns a mapping or an object and no key is given:
``out`` (torchvision) and ``logits`` (Hugging Face ``ModelOutput``)."""


def select_output(output: Any, key: str | None = None) -> torch.Tensor:
    """Pick the logits from a model's output.

    Without ``key``: a tensor is the logits; from a mapping (a dict, a Hugging Face
    ``ModelOutput``) the entry ``out``, else ``logits``, else the first tensor value; from an
    object with an ``out`` or ``logits`` attribute (e.g. a named tuple) that attribute; from a
    list/tuple its first tensor. With ``key``: that entry of a mapping (a whole number also
    picks the mapping's value at that position), that element of a list/tuple (a whole number)
    or that attribute of an object. A picked value that is itself a container is searched again
    without a key.

    Args:
        output: What the model returned.
        key: The ``--output-key`` of ``dump-logits``, or None.

    Returns:
        The ``(N, C, h, w)`` logits tensor.

    Raises:
        ValueError: Nothing matches, or the match is not a 4-D tensor.
    """
    if key is not None:
        output = _pick(output, key)
    for _ in range(8):  # descend through nested containers
        if isinstance(output, torch.Tensor):
            break
        output = _default_pick(output)
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"model returned {type(output).__name__}, expected a tensor")
    if output.ndim != 4:
        raise ValueError(f"model output must be (N, C, h, w), got shape {tuple(output.shape)}")
    return output


def _describe(output: Any) -> str:
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with entries {list(output)}"
    if isinstance(output, list | tuple):
        return f"a {type(output).__name__} of {len(output)}"
    return f"a {type(output).__name__}"


def _pick(output: Any, key: str) -> Any:
    """The value of ``output`` named by ``key`` (see :func:`select_output`)."""
    index = int(key) if key.lstrip("-").isdigit() else None
    if isinstance(output, Mapping):
        if key in output:
            return output[key]
        values = list(output.values())
        if index is not None and -len(values) <= index < len(values):
            return values[index]
    elif isinstance(output, list | tuple) and index is not None:
        if -len(output) <= index < len(output):
            return output[index]
    elif not isinstance(output, torch.Tensor) and hasattr(output, key):
        return getattr(output, key)
    raise ValueError(f"--output-key {key}: not found; the model returned {_describe(output)}")


def _default_pick(output: Any) -> Any:
    """One step of the default choice (see :func:`select_output`)."""
    if isinstance(output, Mapping):
        for key in OUTPUT_KEYS:
            if key in output:
                return output[key]
        for value in output.values():
            if isinstance(value, torch.Tensor):
                return value
        raise ValueError(
            f"model returned {_describe(output)}: none is 'out' or 'logits' or a tensor "
            "(choose one with --output-key)"
        )
    for key in OUTPUT_KEYS:
        if not isinstance(output, str | bytes) and isinstance(
            getattr(output, key, None), torch.Tensor
        ):
            return getattr(output, key)
    if isinstance(output, list | tuple):
        if not output:
            raise ValueError("model returned an empty list")
        for value in output:
            if isinstance(value, torch.Tensor):
                return value
        return output[0]
    raise ValueError(f"model returned {type(output).__name__}, expected a tensor")


class OutputKey:
    """A model whose output is reduced to its logits by ``--output-key``.

    Args:
        model: The segmenter.
        key: See :func:`select_output`.
    """

    def __init__(self, model: Model, key: str) -> None:
        self.model = model
        self.key = key

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model and pick its logits."""
        return select_output(self.model(x), self.key)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of sliding windows along one axis, covering ``[0, length)``.

    Windows start every ``stride`` pixels; the last one is moved back so that it ends at
    ``length``. A window longer than the axis becomes one window over the whole axis.

    Args:
        length: Axis length.
        window: Window length.
        stride: Step between window starts.

    Returns:
        Increasing start offsets.
    """
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


def forward_whole(model: Model, x: torch.Tensor) -> torch.Tensor:
    """Run the model once on ``(N, 3, h, w)``; return its ``(N, C, h', w')`` float32 logits.

    Raises:
        ValueError: The output is not the input's shape scaled by one factor (a transposed
            ``(N, C, w', h')`` or a stretched output; see
            :func:`blda_posthoc.core.correct.same_aspect`): resizing it would mix up pixels.
    """
    logits = select_output(model(x)).float()
    size, got = (int(x.shape[2]), int(x.shape[3])), (int(logits.shape[2]), int(logits.shape[3]))
    if not same_aspect(got, size):
        raise ValueError(
            f"the model returned logits of {got[0]}x{got[1]} pixels for a {size[0]}x{size[1]} "
            "input: not the input's aspect ratio (transposed (N, C, W, H) output?)"
        )
    return logits


def forward_slide(
    model: Model, x: torch.Tensor, window: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """Sliding-window inference with overlapping logits averaged.

    Each window's logits are resized to the window's size (bilinear) and summed into a canvas;
    every pixel is then divided by the number of windows that covered it.

    Args:
        model: The segmenter.
        x: ``(N, 3, h, w)`` model input.
        window: Window size ``(h, w)``.
        stride: Step ``(h, w)`` between windows.

    Returns:
        ``(N, C, h, w)`` float32 logits.
    """
    n, _, h, w = x.shape
    total: torch.Tensor | None = None
    count = torch.zeros((1, 1, h, w), dtype=torch.float32, device=x.device)
    for top in window_starts(h, window[0], stride[0]):
        for left in window_starts(w, window[1], stride[1]):
            bottom, right = min(top + window[0], h), min(left + window[1], w)
            crop = x[:, :, top:bottom, left:right]
            logits = resize(forward_whole(model, crop), (bottom - top, right - left))
            if total is None:
                total = torch.zeros(
                    (n, logits.shape[1], h, w), dtype=torch.float32, device=x.device
                )
            total[:, :, top:bottom, left:right] += logits
            count[:, :, top:bottom, left:right] += 1
    assert total is not None
    return total / count


def predict_logits(
    model: Model, images: torch.Tensor, pre: Preprocess, precision: str = "fp32"
) -> torch.Tensor:
    """Logits of a batch of same-size images at the stored resolution.

    Args:
        model: The segmenter.
        images: ``(N, H, W, 3)`` uint8 RGB pixels on the model's device.
        pre: Preprocessing and inference mode.
        precision: ``fp32``, ``fp16`` or ``bf16`` (autocast on the images' device).

    Returns:
        ``(N, C, h, w)`` float32 logits with ``(h, w) = logits_size((H, W), pre.logits_scale)``,
        or the model's output size with a native ``logits_scale`` (None).
    """
    size = (images.shape[1], images.shape[2])
    x = normalize(images, pre)
    with torch.inference_mode(), autocast(x.device, precision):
        if pre.window is None:
            logits = forward_whole(model, x)
        else:
            logits = forward_slide(model, x, pre.window, pre.stride or pre.window)
    if pre.logits_scale is not None:
        return resize(logits.float(), logits_size(size, pre.logits_scale))
    if logits.shape[2] > size[0] or logits.shape[3] > size[1]:
        return resize(logits.float(), size)
    return logits.float()


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Run the model at ``precision`` on ``device``: autocast, and TF32 on or off on CUDA.

    Args:
        device: Where the model runs.
        precision: A key of :data:`PRECISIONS`. ``fp16`` is refused on CPU.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("fp16 autocast needs a CUDA device; use bf16 or fp32 on CPU")
    with tf32_allowed(device.type == "cuda" and precision != "fp32"):
        if dtype is None:
            yield
            return
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


@contextlib.contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """Allow or forbid TensorFloat-32 CUDA matrix products and convolutions, then restore."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
