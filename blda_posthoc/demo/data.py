"""Write the synthetic benchmark to disk as images and trainId label PNGs.

Layout::

    ROOT/source/images/scene_0000.png   (H, W, 3) RGB
    ROOT/source/labels/scene_0000.png   (H, W) uint8 trainIds, 255 = ignore
    ROOT/target/images/...              same for the target domain
    ROOT/target/labels/...
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from blda_posthoc.demo.synthesize import DEFAULT_SIZE, DOMAINS, render_indexed
from blda_posthoc.io.images import write_png

DEFAULT_SEED = 0
"""Seed of the demo's data (the demo model was trained on scenes of another seed)."""

DEFAULT_COUNT = 100
"""Default number of scenes per domain (`blda demo` takes about 30 s on 2 CPU cores)."""


def scene_name(index: int) -> str:
    """Name of scene ``index``: ``scene_0000``, ``scene_0001``, ..."""
    return f"scene_{index:04d}"


def write_domain(
    root: Path,
    domain: str,
    count: int = DEFAULT_COUNT,
    seed: int = DEFAULT_SEED,
    size: tuple[int, int] = DEFAULT_SIZE,
    on_scene: Callable[[int], None] | None = None,
) -> tuple[Path, Path]:
    """Render ``count`` scenes of ``domain`` into ``root/domain/{images,labels}``.

    Args:
        root: Benchmark folder.
        domain: ``"source"`` or ``"target"``.
        count: Number of scenes.
        seed: Data seed; the same seed gives the same files.
        size: ``(H, W)`` of the scenes.
        on_scene: Called with the index after each scene (e.g. to advance a progress bar).

    Returns:
        The images folder and the labels folder.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    images, labels = root / domain / "images", root / domain / "labels"
    for index in range(count):
        image, label = render_indexed(seed, domain, index, size)
        write_png(images / f"{scene_name(index)}.png", image)
        write_png(labels / f"{scene_name(index)}.png", label)
        if on_scene is not None:
            on_scene(index)
    return images, labels


def write_benchmark(
    root: Path,
    count: int = DEFAULT_COUNT,
    seed: int = DEFAULT_SEED,
    size: tuple[int, int] = DEFAULT_SIZE,
) -> dict[str, tuple[Path, Path]]:
    """Render both domains (see :func:`write_domain`); returns ``{domain: (images, labels)}``."""
    return {domain: write_domain(root, domain, count, seed, size) for domain in DOMAINS}
