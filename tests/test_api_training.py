"""The API inside a training loop: :class:`api.StatsAccumulator` and :func:`api.correct`."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_labels, make_logits
from torch import nn

from blda_posthoc import api
from blda_posthoc.core.fit import Grid
from blda_posthoc.errors import InputError

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
C = 4
NAMES = ["road", "car", "pole", "sign"]
BIAS = np.array([1.0, 0.3, -0.6, -1.2], dtype=np.float32)


def images(seed: int, n: int, size: tuple[int, int] = (16, 24)) -> list[tuple[np.ndarray, ...]]:
    """``(logits (C, H, W), label (H, W))`` pairs, biased towards the first classes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = make_labels(rng, C, *size)
        out.append((make_logits(rng, label, C, BIAS), label))
    return out


def assert_same_counts(got: api.LogitStats, want: api.LogitStats) -> None:
    assert got.grid == want.grid
    np.testing.assert_array_equal(got.counts, want.counts)
    np.testing.assert_array_equal(got.anchor_counts, want.anchor_counts)
    assert got.extras is not None and want.extras is not None
    np.testing.assert_array_equal(got.extras.predicted, want.extras.predicted)
    np.testing.assert_array_equal(got.extras.confidence, want.extras.confidence)


@pytest.mark.parametrize("labels", ["pseudo", "gt"])
def test_accumulator_counts_what_fit_stats_counts(labels):
    data = images(1, 6)
    low = min(float(z.min()) for z, _ in data)
    high = max(float(z.max()) for z, _ in data)
    grid = Grid.covering(low, high, 512)  # the grid fit_stats chooses for these images
    acc = api.StatsAccumulator(
        class_names=NAMES, labels=labels, logit_range=(grid.lo, grid.hi), bins=512, min_pixels=5
    )
    for z, y in data:
        acc.update(torch.from_numpy(z), torch.from_numpy(y) if labels == "gt" else None)
    want = api.fit_stats(
        [(f"i{k}", z, y if labels == "gt" else None) for k, (z, y) in enumerate(data)],
        class_names=NAMES,
        labels=labels,
        bins=512,
        min_pixels=5,
        calibrate=False,
    )
    got = acc.compute()
    assert_same_counts(got, want)
    assert got.settings["num_images"] == 6 and got.settings["clipped_logits"] == 0
    assert got.settings["labels"] == labels and got.settings["min_pixels"] == 5


def test_batches_shards_and_reset_give_the_same_counts():
    data = images(2, 6)
    one = api.StatsAccumulator(class_names=NAMES, logit_range=(-12, 12), bins=256)
    for z, _ in data:
        one.update(z)
    batched = api.StatsAccumulator(class_names=NAMES, logit_range=(-12, 12), bins=256)
    batched.update(np.stack([z for z, _ in data[:4]]))
    other = api.StatsAccumulator(class_names=NAMES, logit_range=(-12, 12), bins=256)
    other.update(np.stack([z for z, _ in data[4:]]))
    batched.merge(other)  # two "processes" merged == one pass
    assert_same_counts(batched.compute(), one.compute())
    assert batched.num_images == 6
    batched.reset()
    with pytest.raises(api.InputError, match="no images yet"):
        batched.compute()
    batched.update(data[0][0])
    single = api.StatsAccumulator(class_names=NAMES, logit_range=(-12, 12), bins=256)
    single.update(data[0][0])
    assert_same_counts(batched.compute(), single.compute())


def test_logits_outside_the_range_are_clipped_into_the_edge_bins_and_counted():
    z = np.zeros((C, 2, 3), np.float32)
    z[0, 0, 0], z[1, 0, 1], z[2, 1, 2] = 100.0, -100.0, 4.0
    acc = api.StatsAccumulator(class_names=NAMES, logit_range=(-5, 5), bins=16, min_pixels=1)
    acc.update(z)
    stats = acc.compute()
    assert acc.clipped == 2 and stats.settings["clipped_logits"] == 2
    # Pixel (0, 0) is class 0 (argmax 100): its channel-0 logit sits in the top bin.
    assert stats.counts[0, 0, -1] == 1
    # Pixel (0, 1): argmax is channel 0 (ties at 0 go to the first), channel 1 at -100.
    assert stats.counts[0, 1, 0] == 1


def test_accumulator_refuses_bad_input():
    acc = api.StatsAccumulator(class_names=NAMES)
    with pytest.raises(api.InputError, match="C = 4"):
        acc.update(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(api.InputError, match="no labels"):
        acc.update(np.zeros((C, 4, 4), np.float32), np.zeros((4, 4), np.int64))
    gt = api.StatsAccumulator(class_names=NAMES, labels="gt")
    with pytest.raises(api.InputError, match="label maps"):
        gt.update(np.zeros((C, 4, 4), np.float32))
    with pytest.raises(api.InputError, match="do not match"):
        gt.update(np.zeros((2, C, 4, 4), np.float32), np.zeros((3, 4, 4), np.int64))
    with pytest.raises(api.InputError, match="NaN"):
        acc.update(np.full((C, 4, 4), np.nan, np.float32))
    with pytest.raises(api.InputError, match="logit_range"):
        api.StatsAccumulator(class_names=NAMES, logit_range=(3, 3))
    with pytest.raises(api.InputError, match="other classes"):
        acc.merge(api.StatsAccumulator(class_names=NAMES, bins=128))


# ------------------------------------------------------------------ a real training loop

COLOURS = torch.tensor([[0.2, 0.2, 0.2], [0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.9, 0.9, 0.1]])


def scene(rng: np.random.Generator, shift: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 3, 16, 24)`` images of coloured blobs and their ``(n, 16, 24)`` labels.

    ``shift`` darkens the rare classes' colours towards the road's (the target domain).
    """
    labels = torch.from_numpy(np.stack([make_labels(rng, C, 16, 24) for _ in range(n)])).long()
    labels[labels == 255] = 0
    colours = COLOURS.clone()
    colours[1:] = (1 - shift) * colours[1:] + shift * colours[0]
    x = colours[labels].permute(0, 3, 1, 2)
    x = x + 0.15 * torch.from_numpy(rng.normal(size=x.shape).astype(np.float32))
    return x, labels


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, C, 3, padding=1))


def test_a_training_loop_refreshes_the_statistics_and_trains_on_corrected_labels():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    student = tiny_net()
    optimiser = torch.optim.SGD(student.parameters(), lr=0.5)
    xs, ys = scene(rng, 0.0, 8)
    for _ in range(30):  # a short source-only training: the teacher's starting point
        optimiser.zero_grad()
        F.cross_entropy(student(xs), ys).backward()
        optimiser.step()
    with torch.no_grad():
        source = api.fit_stats(
            [(f"s{k}", z, y) for k, (z, y) in enumerate(zip(student(xs), ys, strict=True))],
            class_names=NAMES,
            min_pixels=5,
            calibrate=False,
        )
    teacher = copy.deepcopy(student).eval()
    before = [p.detach().clone() for p in student.parameters()]
    acc = api.StatsAccumulator(class_names=NAMES, logit_range=(-30, 30), bins=512, min_pixels=5)
    every, steps = 2, 6
    correction = None
    refreshed, seen, used = [], [], []
    for step in range(steps):
        xt, _ = scene(rng, 0.5, 4)
        with torch.no_grad():
            logits = teacher(xt)  # (B, C, H, W), on the teacher's device
        acc.update(logits)
        seen.append(logits)
        if step % every == 0:
            correction = api.load("blda", stats=acc.compute(), anchors=source, tau=0.5)
            refreshed.append(step)
        assert correction is not None
        pseudo, _ = api.correct(logits, correction)
        used.append((step, pseudo))
        loss = F.cross_entropy(student(xs), ys) + F.cross_entropy(student(xt), pseudo)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():  # EMA teacher
            for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
                t.mul_(0.9).add_(s, alpha=0.1)
        assert torch.isfinite(loss)
    assert refreshed == [0, 2, 4] and acc.num_images == steps * 4
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    # Rebuilt separately: the statistics of the teacher logits seen up to each refresh, a fresh
    # correction, and api.correct on each step's logits give the labels the loop trained on.
    changed = 0
    for step, pseudo in used:
        last = max(r for r in refreshed if r <= step)
        fresh = api.StatsAccumulator(
            class_names=NAMES, logit_range=(-30, 30), bins=512, min_pixels=5
        )
        fresh.update(torch.cat(seen[: last + 1]))
        again = api.load("blda", stats=fresh.compute(), anchors=source, tau=0.5)
        want, _ = api.correct(seen[step], again)
        assert torch.equal(pseudo, want)
        changed += int((pseudo != seen[step].argmax(1)).sum())
    assert changed > 0  # the correction did move some pseudo-labels off the plain argmax


def test_the_docs_training_loop_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", API_DOC.read_text(), re.S)
    scope: dict[str, object] = {}
    exec(compile(blocks[1], "docs/api.md", "exec"), scope)  # noqa: S102
    target = scope["target"]
    assert isinstance(target, api.StatsAccumulator)
    assert target.num_images == 80 and target.clipped == 0
    assert scope["pseudo"].shape == (4, 32, 32)  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", ["em-map", "ot-prior", "self-calibrate", "occurrence-adjust"])
def test_sample_methods_are_refused_on_accumulated_statistics(method):
    # The accumulator keeps no pixel sample: these methods would estimate nothing (em-map kept
    # only its calibration, self-calibrate was the identity) instead of saying so.
    acc = api.StatsAccumulator(class_names=NAMES, logit_range=(-12, 12), bins=256, min_pixels=1)
    for z, _ in images(3, 2):
        acc.update(torch.from_numpy(z))
    stats = acc.compute()
    with pytest.raises(InputError, match=r"pixel sample"):
        api.load(method, stats=stats, anchors=stats)
    assert api.load("blda", stats=stats, anchors=stats).method == "blda"  # needs no sample
