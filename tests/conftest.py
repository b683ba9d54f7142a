"""Shared fixtures: small synthetic logits cases written as .npy logits and trainId PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_labels(rng: np.random.Generator, num_classes: int, h: int, w: int) -> np.ndarray:
    """A ``(h, w)`` uint8 map of rectangular blobs with a few ignore (255) pixels."""
    label = np.zeros((h, w), dtype=np.uint8)
    for _ in range(3 * num_classes):
        c = int(rng.integers(0, num_classes))
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        dy, dx = int(rng.integers(2, max(3, h // 2))), int(rng.integers(2, max(3, w // 2)))
        label[y0 : y0 + dy, x0 : x0 + dx] = c
    label[rng.random((h, w)) < 0.02] = 255
    return label


def make_logits(
    rng: np.random.Generator, label: np.ndarray, num_classes: int, bias: np.ndarray
) -> np.ndarray:
    """``(C, h, w)`` float32 logits: noisy one-hot of the label plus a per-class bias."""
    h, w = label.shape
    logits = rng.normal(0.0, 1.5, size=(num_classes, h, w)).astype(np.float32)
    valid = label != 255
    onehot = np.zeros((num_classes, h, w), dtype=np.float32)
    onehot[label[valid], np.nonzero(valid)[0], np.nonzero(valid)[1]] = 1.0
    logits += 3.0 * onehot + bias[:, None, None]
    return logits


def write_case(
    root: Path,
    num_images: int = 6,
    num_classes: int = 4,
    size: tuple[int, int] = (24, 32),
    seed: int = 0,
    bias_scale: float = 0.0,
) -> tuple[Path, Path]:
    """Write ``root/logits/NAME.npy`` and ``root/labels/NAME.png``; return both folders.

    Names include a sub-folder (``city_a/img_000``) to exercise relative names.
    """
    rng = np.random.default_rng(seed)
    bias = np.linspace(-bias_scale, bias_scale, num_classes).astype(np.float32)
    logits_dir, labels_dir = root / "logits", root / "labels"
    for i in range(num_images):
        name = f"city_{'ab'[i % 2]}/img_{i:03d}"
        label = make_labels(rng, num_classes, *size)
        logits = make_logits(rng, label, num_classes, bias)
        (logits_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (labels_dir / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(logits_dir / f"{name}.npy", logits)
        Image.fromarray(label).save(labels_dir / f"{name}.png")
    return logits_dir, labels_dir


@pytest.fixture
def npy_case(tmp_path: Path) -> tuple[Path, Path]:
    """A 4-class case of 6 images, biased towards the last class."""
    return write_case(tmp_path / "case", bias_scale=1.0)


def fitted_case(root: Path, *, tgt_images: int, dtype: str = "float16") -> dict[str, Path]:
    """Source (unbiased, labelled) and target (biased) stores of 5 classes and their statistics.

    ``src_stats`` is fitted with ground truth (so it holds calibrations), ``tgt_stats`` with
    pseudo-labels and ``--calibration src_stats`` (so every method has what it needs).
    """
    from click.testing import CliRunner

    from blda_posthoc.cli import main

    def run(*args: object) -> None:
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output + str(result.exception)

    src = write_case(root / "src", num_images=8, num_classes=5, seed=21, bias_scale=0.0)
    tgt = write_case(root / "tgt", num_images=tgt_images, num_classes=5, seed=22, bias_scale=1.5)
    paths = {k: root / f"{k}.h5" for k in ("src", "tgt", "src_stats", "tgt_stats")}
    paths["labels"] = tgt[1]
    run("import-logits", src[0], "--labels", src[1], "--out", paths["src"], "--dtype", dtype)
    run("import-logits", tgt[0], "--labels", tgt[1], "--out", paths["tgt"], "--dtype", dtype)
    run(
        "fit-stats",
        paths["src"],
        "--label-source",
        "gt",
        "--min-pixels",
        "20",
        "--out",
        paths["src_stats"],
    )
    run(
        "fit-stats",
        paths["tgt"],
        "--label-source",
        "pseudo",
        "--min-pixels",
        "20",
        "--calibration",
        paths["src_stats"],
        "--out",
        paths["tgt_stats"],
    )
    return paths
