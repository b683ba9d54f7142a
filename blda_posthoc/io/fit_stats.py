"""Stream logits stores into fitted statistics (METHOD.md §4)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from blda_posthoc.core.correct import resize_logits
from blda_posthoc.core.fit import Grid, LogitHistogram, LogitStats, make_stats
from blda_posthoc.io.errors import InputError
from blda_posthoc.io.store import LogitStore

LABEL_SOURCES = ("gt", "pseudo")
DEFAULT_BINS = 4096


def fit_store(
    store: LogitStore,
    *,
    labels: str,
    estimator: str = "hist",
    components: int = 5,
    min_pixels: int = 100,
    bins: int = DEFAULT_BINS,
    device: torch.device | str = "cpu",
    progress: Callable[[Iterable[str], int], Iterable[str]] | None = None,
) -> LogitStats:
    """Fit statistics in one pass over a store, at each image's recorded size.

    Logits are resized bilinearly to the image size first, exactly as ``correct`` sees them.
    Memory is bounded by one image plus the ``(C, C, bins)`` histograms.

    Args:
        store: One or more stores read as one dataset.
        labels: ``gt`` (the store's label maps) or ``pseudo`` (argmax of the logits).
        estimator: ``hist`` or ``gmm``.
        components: Mixture components for ``gmm``.
        min_pixels: Cells with fewer pixels are skipped by ``correct``.
        bins: Histogram bins over the store's logit range.
        device: Where to compute.
        progress: Wraps the iteration over image names.

    Returns:
        The fitted statistics.
    """
    if labels not in LABEL_SOURCES:
        raise InputError(f"--labels must be one of {LABEL_SOURCES}, got {labels!r}")
    if labels == "gt" and not store.has_labels():
        raise InputError(f"{store.paths[0]}: --labels gt needs label maps in every image")
    lo, hi = store.logit_range()
    histogram = LogitHistogram(store.num_classes, Grid.covering(lo, hi, bins), device)
    names: Iterable[str] = store.names
    if progress is not None:
        names = progress(store.names, len(store.names))
    for name in names:
        record = store.read(name, with_label=labels == "gt")
        z = resize_logits(torch.from_numpy(record.logits).to(device), record.size)
        if labels == "gt":
            assert record.label is not None
            if record.label.shape != record.size:
                raise InputError(f"{name}: label size {record.label.shape} != {record.size}")
            y = torch.from_numpy(record.label).to(device).long()
        else:
            y = z.argmax(0)
        histogram.update(z, y)
    settings: dict[str, Any] = {
        "labels": labels,
        "min_pixels": min_pixels,
        "bins": bins,
        "num_images": len(store.names),
        "num_pixels": histogram.num_pixels,
        "sources": [str(p) for p in store.paths],
        "resolution": "image",
    }
    return make_stats(histogram, store.class_names, estimator, components, settings)
