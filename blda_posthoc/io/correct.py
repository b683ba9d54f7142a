"""Apply the alignment to every image of a store and write trainId PNGs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blda_posthoc.core.classes import colorize, palette_for
from blda_posthoc.core.correct import AlignmentMaps, predict, resize_logits
from blda_posthoc.io.errors import InputError
from blda_posthoc.io.images import write_png
from blda_posthoc.io.store import LogitStore

COLOR_SUFFIX = "_color"
"""Colour previews are written beside the trainId files as ``NAME_color.png``."""


def output_paths(out_dir: Path, names: Iterable[str], color: bool) -> dict[str, list[Path]]:
    """The files written per image: ``NAME.png`` and, with ``color``, ``NAME_color.png``."""
    paths = {}
    for name in names:
        files = [out_dir / f"{name}.png"]
        if color:
            files.append(out_dir / f"{name}{COLOR_SUFFIX}.png")
        paths[name] = files
    return paths


def check_outputs(paths: dict[str, list[Path]], overwrite: bool, resume: bool) -> list[str]:
    """Names still to write; refuse (before writing anything) to replace existing files.

    Args:
        paths: Output files per name.
        overwrite: Replace existing files.
        resume: Skip names whose files all exist.

    Returns:
        The names to process.
    """
    todo = []
    for name, files in paths.items():
        exists = [f.exists() for f in files]
        if all(exists) and resume:
            continue
        if any(exists) and not overwrite and not resume:
            first = files[exists.index(True)]
            raise InputError(f"{first}: already exists (use --overwrite, or --resume to skip)")
        todo.append(name)
    return todo


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (sorted keys, so the same content gives the same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def correct_store(
    store: LogitStore,
    maps: AlignmentMaps | None,
    tau: float,
    out_dir: Path,
    *,
    color: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    device: torch.device | str = "cpu",
    progress: Callable[[Iterable[str], int], Iterable[str]] | None = None,
) -> dict[str, Any]:
    """Correct every image and write ``out_dir/NAME.png`` trainIds at the image's size.

    Args:
        store: The logits.
        maps: Tabulated maps (None: plain argmax).
        tau: Correction strength.
        out_dir: Output folder (names keep their sub-folders).
        color: Also write ``NAME_color.png`` palette previews.
        overwrite: Replace existing PNGs.
        resume: Skip images whose outputs exist.
        device: Where to compute.
        progress: Wraps the iteration over image names.

    Returns:
        ``{"images": n_written, "skipped_existing": n, "pixels_before": [C], "pixels_after":
        [C]}`` with per-class predicted pixel counts before and after the correction.
    """
    paths = output_paths(out_dir, store.names, color)
    todo = check_outputs(paths, overwrite, resume)
    palette = palette_for(store.class_names)
    c = store.num_classes
    before = np.zeros(c, dtype=np.int64)
    after = np.zeros(c, dtype=np.int64)
    dev_maps = maps.to(device) if maps is not None else None
    iterable: Iterable[str] = todo if progress is None else progress(todo, len(todo))
    for name in iterable:
        record = store.read(name, with_label=False)
        z = resize_logits(torch.from_numpy(record.logits).to(device), record.size)
        pred, _ = predict(z, record.size, dev_maps, tau)
        before += np.bincount(z.argmax(0).reshape(-1).cpu().numpy(), minlength=c)
        label_map = pred.cpu().numpy().astype(np.uint8)
        after += np.bincount(label_map.reshape(-1), minlength=c)
        write_png(paths[name][0], label_map)
        if color:
            write_png(paths[name][1], colorize(label_map, palette))
    return {
        "images": len(todo),
        "skipped_existing": len(store.names) - len(todo),
        "pixels_before": before.tolist(),
        "pixels_after": after.tolist(),
    }
