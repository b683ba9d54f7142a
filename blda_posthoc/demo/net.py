"""The demo's small segmentation network (a tiny encoder-decoder), trained on the source domain.

Input: ``(N, 3, H, W)`` float RGB already normalised as ``(pixel - MEAN) / STD`` with pixels in
0..255. Output: ``(N, C, H, W)`` logits at full input resolution (H and W multiples of 8 are
best; others are handled by resizing back to the input size).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blda_posthoc.demo.synthesize import DEMO_CLASSES

MEAN = (123.675, 116.28, 103.53)
"""Per-channel mean of the input normalisation, in 0..255 pixel units (ImageNet)."""

STD = (58.395, 57.12, 57.375)
"""Per-channel standard deviation of the input normalisation, in 0..255 pixel units."""

WEIGHTS = Path(__file__).with_name("model.pt")
"""The shipped state dict, trained by ``scripts/train_demo_model.py``."""


def conv_block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3x3 convolution, batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DemoSegNet(nn.Module):
    """A light encoder-decoder: stride-2 stem, three encoder levels, additive skips.

    Features live at 1/2, 1/4 and 1/8 of the input size; the decoder returns to 1/2 and the
    logits are bilinearly upsampled to the input size (about 0.1 M parameters).

    Args:
        num_classes: Number of output classes C.
        width: Channels at 1/2 resolution; 1/4 and 1/8 use 2x and 4x.
    """

    def __init__(self, num_classes: int = len(DEMO_CLASSES), width: int = 16) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.enc1 = nn.Sequential(conv_block(3, w1, stride=2), conv_block(w1, w1))
        self.enc2 = nn.Sequential(conv_block(w1, w2, stride=2), conv_block(w2, w2))
        self.enc3 = nn.Sequential(
            conv_block(w2, w3, stride=2),
            conv_block(w3, w3, dilation=2),
            conv_block(w3, w3, dilation=4),
        )
        self.lat3 = nn.Conv2d(w3, w2, 1)
        self.dec2 = conv_block(w2, w2)
        self.lat2 = nn.Conv2d(w2, w1, 1)
        self.dec1 = conv_block(w1, w1)
        self.head = nn.Conv2d(w1, num_classes, 1)

    @staticmethod
    def _up(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 3, H, W)`` normalised images to ``(N, C, H, W)`` logits."""
        f1 = self.enc1(x)
        f2 = self.enc2(f1)
        f3 = self.enc3(f2)
        d2 = self.dec2(f2 + self._up(self.lat3(f3), f2.shape[-2:]))
        d1 = self.dec1(f1 + self._up(self.lat2(d2), f1.shape[-2:]))
        return self._up(self.head(d1), x.shape[-2:])


def build(num_classes: int = len(DEMO_CLASSES), pretrained: bool = True) -> nn.Module:
    """Factory for ``dump-logits``: the demo network, with the shipped weights by default.

    Args:
        num_classes: Number of classes; the shipped weights need ``len(DEMO_CLASSES)``.
        pretrained: Load ``model.pt`` from the package (when it exists).

    Returns:
        The network in eval mode.
    """
    model = DemoSegNet(num_classes)
    if pretrained:
        if num_classes != len(DEMO_CLASSES):
            raise ValueError(
                f"the shipped weights have {len(DEMO_CLASSES)} classes, asked for {num_classes}"
            )
        if not WEIGHTS.is_file():
            raise FileNotFoundError(
                f"{WEIGHTS}: demo weights missing; run scripts/train_demo_model.py"
            )
        model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Normalise ``(N, H, W, 3)`` uint8 RGB into the network's ``(N, 3, H, W)`` float input."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() - mean) / std
