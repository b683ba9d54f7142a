"""Paired bootstrap intervals: against a direct resampling of per-image confusion matrices."""

from __future__ import annotations

import numpy as np
import pytest

from blda_posthoc.core.bootstrap import (
    gain_intervals,
    image_counts,
    includes_zero,
    metric_from_counts,
    paired_bootstrap,
    resample_weights,
)
from blda_posthoc.core.evaluate import summarize


def random_matrices(rng: np.random.Generator, images: int, classes: int, skill: float):
    """``(I, C, C + 1)`` per-image confusion matrices; a few classes per image, some absent."""
    out = np.zeros((images, classes, classes + 1), dtype=np.int64)
    for i in range(images):
        present = rng.choice(classes, size=rng.integers(1, classes + 1), replace=False)
        for t in present:
            pixels = int(rng.integers(1, 400))
            right = int(rng.binomial(pixels, skill))
            out[i, t, t] += right
            wrong = rng.integers(0, classes + 1, size=pixels - right)  # column C: out of range
            np.add.at(out[i, t], wrong, 1)
    return out


def reference_interval(row, base, metric, n, seed):
    """Resample images directly: per resample, add the drawn matrices up and summarise."""
    images = row.shape[0]
    drawn = np.random.default_rng(seed).integers(0, images, size=(n, images))
    gains = []
    for b in range(n):
        r = summarize(row[drawn[b]].sum(0))[metric]
        z = summarize(base[drawn[b]].sum(0))[metric]
        if r is not None and z is not None:
            gains.append(r - z)
    seen = summarize(row.sum(0))[metric] - summarize(base.sum(0))[metric]
    lo, hi = np.percentile(gains, [2.5, 97.5])
    return min(lo, seen), max(hi, seen)


@pytest.mark.parametrize("metric", ["miou", "macc"])
def test_equals_direct_resampling_of_confusion_matrices(metric):
    rng = np.random.default_rng(3)
    base = random_matrices(rng, 23, 6, 0.6)
    row = random_matrices(rng, 23, 6, 0.7)
    got = paired_bootstrap(image_counts(row), image_counts(base), metric=metric, n=400, seed=11)
    want = reference_interval(row, base, metric, 400, 11)
    assert got is not None
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_counts_give_the_metrics_of_summarize():
    rng = np.random.default_rng(5)
    matrices = random_matrices(rng, 9, 7, 0.5)
    total = matrices.sum(0)
    summary = summarize(total)
    counts = image_counts(matrices).sum(0)
    assert np.array_equal(counts, image_counts(total))
    assert metric_from_counts(counts, "miou") == pytest.approx(summary["miou"], abs=1e-12)
    assert metric_from_counts(counts, "macc") == pytest.approx(summary["macc"], abs=1e-12)
    square = total[:, :7]  # a (C, C) matrix: no out-of-range column
    assert metric_from_counts(image_counts(square), "miou") == pytest.approx(
        summarize(square)["miou"], abs=1e-12
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_interval_holds_the_observed_gain(seed):
    rng = np.random.default_rng(100 + seed)
    images = int(rng.integers(2, 30))
    base = image_counts(random_matrices(rng, images, 5, 0.5))
    rows = [image_counts(random_matrices(rng, images, 5, s)) for s in (0.3, 0.5, 0.8)]
    for row, interval in zip(rows, gain_intervals(rows, base, n=200, seed=seed), strict=True):
        seen = metric_from_counts(row.sum(0), "miou") - metric_from_counts(base.sum(0), "miou")
        assert interval is not None
        assert interval[0] <= seen <= interval[1]
        assert interval[0] < interval[1]  # different rows: a real spread


def test_zero_resamples_is_off_and_seed_decides():
    rng = np.random.default_rng(8)
    base = image_counts(random_matrices(rng, 15, 4, 0.5))
    row = image_counts(random_matrices(rng, 15, 4, 0.7))
    assert paired_bootstrap(row, base, n=0) is None
    first = paired_bootstrap(row, base, n=300, seed=4)
    assert first == paired_bootstrap(row, base, n=300, seed=4)
    assert first != paired_bootstrap(row, base, n=300, seed=5)
    assert paired_bootstrap(base, base, n=300) == (0.0, 0.0)  # paired: no gain, no spread


def test_rows_share_the_resamples():
    rng = np.random.default_rng(9)
    base = image_counts(random_matrices(rng, 12, 4, 0.5))
    rows = [image_counts(random_matrices(rng, 12, 4, s)) for s in (0.4, 0.9)]
    together = gain_intervals(rows, base, n=250, seed=2)
    alone = [paired_bootstrap(r, base, n=250, seed=2) for r in rows]
    assert together == alone


def test_resample_weights_draw_every_image_count_times():
    weights = resample_weights(7, 2500, seed=1)  # more than one block
    assert weights.shape == (2500, 7) and (weights.sum(1) == 7).all()
    first = np.random.default_rng(1).integers(0, 7, size=(1000, 7))
    assert np.array_equal(weights[0], np.bincount(first[0], minlength=7))
    assert abs(weights.mean() - 1.0) < 0.05


def test_undefined_and_bad_inputs():
    empty = np.zeros((4, 3, 2), dtype=np.int64)  # no labelled pixel anywhere
    assert paired_bootstrap(empty, empty, n=10) is None
    assert gain_intervals([], empty, n=10) == []
    with pytest.raises(ValueError, match="differ"):
        paired_bootstrap(np.zeros((3, 3, 2)), empty, n=10)
    with pytest.raises(ValueError, match="unknown metric"):
        paired_bootstrap(empty, empty, metric="pixel", n=10)
    with pytest.raises(ValueError, match=">= 0"):
        paired_bootstrap(empty, empty, n=-1)
    assert includes_zero([-0.5, 1.0]) and not includes_zero([0.1, 1.0])
    assert not includes_zero(None)


def test_interval_is_widened_to_hold_the_observed_gain():
    # One resample: the percentiles are that resample's gain, which is not the observed one;
    # the interval runs between the two.
    rng = np.random.default_rng(12)
    base = random_matrices(rng, 9, 5, 0.5)
    row = random_matrices(rng, 9, 5, 0.8)
    drawn = np.random.default_rng(6).integers(0, 9, size=(1, 9))[0]
    resampled = summarize(row[drawn].sum(0))["miou"] - summarize(base[drawn].sum(0))["miou"]
    seen = summarize(row.sum(0))["miou"] - summarize(base.sum(0))["miou"]
    assert abs(resampled - seen) > 0.1
    got = paired_bootstrap(image_counts(row), image_counts(base), n=1, seed=6)
    assert got is not None
    np.testing.assert_allclose(got, (min(resampled, seen), max(resampled, seen)), atol=1e-9)
