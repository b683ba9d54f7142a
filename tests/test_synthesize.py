from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from blda_posthoc.demo.data import write_benchmark
from blda_posthoc.demo.net import MEAN, STD, WEIGHTS, build, normalise
from blda_posthoc.demo.synthesize import (
    CAR,
    DEMO_CLASSES,
    DOMAINS,
    PERSON,
    POLE,
    SIDEWALK,
    SIGN,
    class_frequencies,
    gaussian_blur,
    render_indexed,
    render_scene,
)
from blda_posthoc.io.images import find_files, read_label, read_rgb

SIZE = (64, 128)


@pytest.mark.parametrize("domain", DOMAINS)
def test_same_seed_same_scene(domain: str) -> None:
    a_img, a_lab = render_indexed(3, domain, 5, SIZE)
    b_img, b_lab = render_indexed(3, domain, 5, SIZE)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    c_img, c_lab = render_scene(np.random.default_rng([3, DOMAINS.index(domain), 5]), domain, SIZE)
    assert np.array_equal(a_img, c_img) and np.array_equal(a_lab, c_lab)


@pytest.mark.parametrize("domain", DOMAINS)
def test_other_seed_or_index_other_scene(domain: str) -> None:
    img, lab = render_indexed(3, domain, 5, SIZE)
    assert not np.array_equal(img, render_indexed(4, domain, 5, SIZE)[0])
    assert not np.array_equal(lab, render_indexed(3, domain, 6, SIZE)[1])


@pytest.mark.parametrize("domain", DOMAINS)
def test_shapes_and_label_values(domain: str) -> None:
    img, lab = render_indexed(0, domain, 0, SIZE)
    assert img.shape == (*SIZE, 3) and img.dtype == np.uint8
    assert lab.shape == SIZE and lab.dtype == np.uint8
    values = set(np.unique(lab).tolist())
    assert values <= set(range(len(DEMO_CLASSES))) | {255}


@cache
def _labels(domain: str, count: int = 24) -> np.ndarray:
    return np.stack([render_indexed(7, domain, i, SIZE)[1] for i in range(count)])


def test_all_classes_present_and_some_ignore() -> None:
    for domain in DOMAINS:
        labels = _labels(domain)
        assert (class_frequencies(labels) > 0).all(), domain
        assert (labels == 255).any()
        assert (labels == 255).mean() < 0.01


def test_label_shift_goes_the_intended_way() -> None:
    source, target = class_frequencies(_labels("source")), class_frequencies(_labels("target"))
    assert target[SIDEWALK] > 1.5 * source[SIDEWALK]
    assert target[PERSON] > 1.5 * source[PERSON]
    assert target[POLE] > 1.2 * source[POLE]
    assert target[CAR] < 0.7 * source[CAR]
    assert target[SIGN] > 1.2 * source[SIGN]


@pytest.mark.parametrize("domain", DOMAINS)
def test_poles_and_signs_are_rare_but_learnable(domain: str) -> None:
    labels = _labels(domain)
    freq = class_frequencies(labels)
    # Rare, thin classes (realistic imbalance) ...
    assert freq[POLE] < 0.02 and freq[SIGN] < 0.01
    assert freq[SIGN] <= sorted(freq)[1]  # signs among the two rarest classes
    # ... yet present in most scenes, with plates big enough to learn from.
    assert np.mean([(lab == SIGN).any() for lab in labels]) > 0.75
    assert freq[SIGN] > 0.001


def test_target_is_darker_and_smoother() -> None:
    src = np.stack([render_indexed(1, "source", i, SIZE)[0] for i in range(8)]).astype(float)
    tgt = np.stack([render_indexed(1, "target", i, SIZE)[0] for i in range(8)]).astype(float)
    assert tgt.mean() < src.mean() - 10
    assert tgt.std(axis=(1, 2)).mean() < src.std(axis=(1, 2)).mean()


def test_gaussian_blur_keeps_constant_images() -> None:
    flat = np.full((9, 11, 3), 0.5, dtype=np.float32)
    assert np.allclose(gaussian_blur(flat, 1.2), 0.5)
    assert gaussian_blur(flat, 0.0) is flat


def test_write_benchmark_layout(tmp_path: Path) -> None:
    folders = write_benchmark(tmp_path, count=2, seed=5, size=SIZE)
    for domain in DOMAINS:
        images, labels = folders[domain]
        assert list(find_files(images, (".png",))) == ["scene_0000", "scene_0001"]
        assert list(find_files(labels, (".png",))) == ["scene_0000", "scene_0001"]
        img, lab = render_indexed(5, domain, 1, SIZE)
        assert np.array_equal(read_rgb(images / "scene_0001.png"), img)
        assert np.array_equal(read_label(labels / "scene_0001.png"), lab)


def test_shipped_model_loads_and_segments() -> None:
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 3_000_000
    model = build()
    assert not model.training
    images = np.stack([render_indexed(0, "source", i, (128, 256))[0] for i in range(2)])
    with torch.no_grad():
        logits = model(normalise(torch.from_numpy(images)))
    assert logits.shape == (2, len(DEMO_CLASSES), 128, 256)
    assert torch.isfinite(logits).all()
    assert len(MEAN) == len(STD) == 3


def test_build_without_weights_and_wrong_class_count() -> None:
    model = build(num_classes=4, pretrained=False)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 40, 72)).shape == (1, 4, 40, 72)
    with pytest.raises(ValueError, match="classes"):
        build(num_classes=4)
