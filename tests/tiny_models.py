"""Tiny segmenters the dump-logits tests build (importable as ``tiny_models:build``)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn


def save_scripted(model: nn.Module, path: Path) -> Path:
    """Save ``model`` as a TorchScript file, as users export theirs for ``--model``.

    Reading TorchScript files is what the tests exercise, so torch's deprecation warning about
    writing them (``torch.jit.trace`` warns alike) is silenced here, and only here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning
        )
        torch.jit.script(model).save(str(path))
    return path


class TinyNet(nn.Module):
    """A two-layer conv net that keeps the input resolution; output as tensor, tuple or dict."""

    def __init__(self, num_classes: int = 4, output: str = "tensor") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, num_classes, 1)
        self.output = output
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.conv2(torch.relu(self.conv1(x)))
        if self.output == "tuple":
            return (logits, x)
        if self.output == "dict":
            return {"out": logits, "aux": x}
        return logits


class Pointwise(nn.Module):
    """A 1x1 conv: every output pixel depends on its own input pixel only."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class HalfRes(nn.Module):
    """Logits at half the input resolution (like a real decoder head at a reduced stride)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def build() -> TinyNet:
    """Factory for ``--model tiny_models:build`` (4 classes, output a dict)."""
    return TinyNet(num_classes=4, output="dict")


def build_tuple() -> TinyNet:
    """Factory whose model returns ``(logits, aux)``."""
    return TinyNet(num_classes=4, output="tuple")


def build_tensor() -> TinyNet:
    """Factory whose model returns the logits tensor."""
    return TinyNet(num_classes=4, output="tensor")


class Transposed(nn.Module):
    """A 1x1 conv whose logits come out ``(N, C, W, H)``: the layout mistake an export can make."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).transpose(2, 3)


class Asserting(nn.Module):
    """A scripted model whose ``assert`` fails on every input (``torch.jit.Error`` when run)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[2] > 100000, "input smaller than this model accepts"
        return self.conv(x)


class Raising(nn.Module):
    """A scripted model that raises a ``RuntimeError`` of its own on every input."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            raise RuntimeError("this model wants 4 input channels")
        return self.conv(x)
