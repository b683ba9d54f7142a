"""Class names and colour palettes, including the Cityscapes preset."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255
"""Label value for pixels that carry no class (Cityscapes trainId convention)."""

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

PRESETS: dict[str, tuple[str, ...]] = {"cityscapes": CITYSCAPES_CLASSES}


def default_names(num_classes: int) -> list[str]:
    """Names ``class_0 ... class_{C-1}`` for a model whose classes are unnamed."""
    return [f"class_{i}" for i in range(num_classes)]


def palette_for(class_names: list[str] | tuple[str, ...]) -> np.ndarray:
    """Return a ``(256, 3)`` uint8 palette: Cityscapes colours by name, others deterministic.

    Classes whose name is a Cityscapes class get its colour; the rest get a fixed pseudo-random
    colour; index 255 (ignore) is black.
    """
    by_name = dict(zip(CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, strict=True))
    rng = np.random.default_rng(12345)
    extra = rng.integers(40, 256, size=(256, 3), dtype=np.uint8)
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(255):
        if index < len(class_names) and class_names[index] in by_name:
            palette[index] = by_name[class_names[index]]
        else:
            palette[index] = extra[index]
    palette[IGNORE_INDEX] = 0
    return palette


def colorize(label_map: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map a ``(H, W)`` uint8 trainId map to a ``(H, W, 3)`` uint8 RGB picture."""
    return palette[label_map]
