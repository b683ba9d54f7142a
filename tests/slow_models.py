"""A deterministic segmenter that sleeps in every forward pass (``slow_models:build``).

Subprocess tests use it to interrupt or kill ``dump-logits`` in the middle of a run; the delay
per call is ``BLDA_TEST_DELAY`` seconds (default 0: as fast as the plain model). With
``BLDA_TEST_READY=FILE`` and ``BLDA_TEST_HOLD_AFTER=N`` the model creates ``FILE`` at its call
N + 1 and then waits there (up to ``HOLD_SECONDS``) for the test to interrupt it: the test acts on
a signal from the victim, not after a guessed delay, and the victim cannot finish first.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

HOLD_SECONDS = 120.0
"""How long a held model waits for the test's signal before it carries on."""


class SlowPointwise(nn.Module):
    """A fixed 1x1 convolution to four classes, sleeping ``delay`` seconds per call."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.delay = delay
        self.calls = 0
        ready = os.environ.get("BLDA_TEST_READY")
        self.ready = Path(ready) if ready else None
        self.hold_after = int(os.environ.get("BLDA_TEST_HOLD_AFTER", "0"))
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.ready is not None and self.calls > self.hold_after:
            self.ready.touch()
            end = time.monotonic() + HOLD_SECONDS
            while time.monotonic() < end:  # until the test interrupts the process
                time.sleep(0.05)
        return self.conv(x)


def build() -> nn.Module:
    """The model, with the delay from ``BLDA_TEST_DELAY``."""
    return SlowPointwise(float(os.environ.get("BLDA_TEST_DELAY", "0")))
