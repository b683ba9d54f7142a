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

CITYSCAPES_LABEL_IDS: tuple[int, ...] = (
    7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33,
)  # fmt: skip
"""The Cityscapes ``labelId`` of each of the 19 trainIds, in trainId order (road = 7, ...)."""

UNLABELED_ID = 0
"""The Cityscapes ``labelId`` of ``unlabeled``: what ignore (255) becomes in a labelIds map."""

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


def is_cityscapes(class_names: list[str] | tuple[str, ...]) -> bool:
    """Whether ``class_names`` are the 19 Cityscapes classes in trainId order."""
    return tuple(class_names) == CITYSCAPES_CLASSES


def cityscapes_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Map a Cityscapes trainId map to the labelIds that cityscapesScripts evaluates.

    Args:
        train_ids: ``(H, W)`` integer trainIds, 0..18 or 255 (ignore).

    Returns:
        ``(H, W)`` uint8 labelIds (:data:`CITYSCAPES_LABEL_IDS`; ignore becomes
        :data:`UNLABELED_ID`).

    Raises:
        ValueError: When a value is neither a trainId 0..18 nor 255.
    """
    values = np.asarray(train_ids)
    known = len(CITYSCAPES_LABEL_IDS)
    bad = ((values < 0) | (values >= known)) & (values != IGNORE_INDEX)
    if bad.any():
        raise ValueError(
            f"value {int(values[bad].flat[0])} is neither a Cityscapes trainId (0..{known - 1}) "
            f"nor {IGNORE_INDEX}"
        )
    table = np.full(IGNORE_INDEX + 1, UNLABELED_ID, dtype=np.uint8)
    table[:known] = CITYSCAPES_LABEL_IDS
    return table[values.astype(np.int64)]
