"""A deterministic segmenter that sleeps in every forward pass (``slow_models:build``).

Subprocess tests use it to interrupt or kill ``dump-logits`` in the middle of a run; the delay
per call is ``BLDA_TEST_DELAY`` seconds (default 0: as fast as the plain model).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn


class SlowPointwise(nn.Module):
    """A fixed 1x1 convolution to four classes, sleeping ``delay`` seconds per call."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.delay = delay
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        return self.conv(x)


def build() -> nn.Module:
    """The model, with the delay from ``BLDA_TEST_DELAY``."""
    return SlowPointwise(float(os.environ.get("BLDA_TEST_DELAY", "0")))
