import numpy as np
import pytest
import torch

from blda_posthoc.core.correct import hist_cdf, hist_quantile, mixture_cdf
from blda_posthoc.core.fit import Grid, LogitHistogram, fit_mixture, make_stats, pool_anchors

C = 4


def random_pixels(seed: int, n: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    labels[rng.random(n) < 0.05] = 255
    z = rng.normal(0, 1.5, (n, C)).astype(np.float32)
    valid = labels != 255
    z[np.nonzero(valid)[0], labels[valid]] += 3.0
    return torch.from_numpy(z), torch.from_numpy(labels)


def test_grid_covers_range_with_whole_bounds():
    g = Grid.covering(-3.2, 7.9, 100)
    assert (g.lo, g.hi) == (-5.0, 9.0)
    assert g.edges.shape == (101,) and g.step == pytest.approx(0.14)


def test_histogram_matches_numpy_per_cell():
    z, y = random_pixels(0)
    grid = Grid.covering(float(z.min()), float(z.max()), 64)
    hist = LogitHistogram(C, grid)
    hist.update(z, y)
    counts = hist.counts()
    for c in range(C):
        for ch in range(C):
            expected, _ = np.histogram(z[y == c, ch].numpy().astype(np.float64), bins=grid.edges)
            np.testing.assert_array_equal(counts[c, ch], expected)
    assert hist.num_pixels == int((y != 255).sum())


def test_histogram_accepts_image_layout_and_skips_out_of_range_labels():
    z, y = random_pixels(1, n=12 * 10)
    y[:5] = 7  # not a class: skipped like ignore
    grid = Grid(-10, 10, 32)
    flat, image = LogitHistogram(C, grid), LogitHistogram(C, grid)
    flat.update(z, y)
    image.update(z.T.reshape(C, 12, 10), y.reshape(12, 10))
    np.testing.assert_array_equal(flat.counts(), image.counts())
    assert flat.num_pixels == int(((y != 255) & (y < C)).sum())


def test_chunk_size_and_merge_do_not_change_counts():
    z, y = random_pixels(2)
    grid = Grid(-8, 10, 128)
    one = LogitHistogram(C, grid)
    one.update(z, y)
    small_chunks = LogitHistogram(C, grid, chunk_pixels=37)
    small_chunks.update(z, y)
    left, right = LogitHistogram(C, grid), LogitHistogram(C, grid)
    left.update(z[:1234], y[:1234])
    right.update(z[1234:], y[1234:])
    left.merge(right)
    np.testing.assert_array_equal(one.counts(), small_chunks.counts())
    np.testing.assert_array_equal(one.counts(), left.counts())
    assert left.num_pixels == one.num_pixels


def test_merge_refuses_other_grid():
    with pytest.raises(ValueError):
        LogitHistogram(C, Grid(-1, 1, 8)).merge(LogitHistogram(C, Grid(-1, 2, 8)))


def test_anchors_pool_diagonal_and_off_diagonal():
    counts = np.arange(2 * 2 * 3).reshape(2, 2, 3)
    anchors = pool_anchors(counts)
    np.testing.assert_array_equal(anchors[0], counts[0, 0] + counts[1, 1])
    np.testing.assert_array_equal(anchors[1], counts[0, 1] + counts[1, 0])


def test_hist_cdf_and_quantile_are_inverse():
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 20, size=(2, 50))
    edges = np.linspace(-5, 5, 51)
    cdf = hist_cdf(counts)
    assert cdf[:, 0].tolist() == [0, 0] and np.allclose(cdf[:, -1], 1)
    u = rng.uniform(0.01, 0.99, size=(2, 30))
    z = hist_quantile(edges, counts, u)
    back = np.stack([np.interp(z[r], edges, cdf[r]) for r in range(2)])
    np.testing.assert_allclose(back, u, atol=1e-9)


def test_hist_quantile_skips_empty_bins():
    counts = np.array([[5, 0, 0, 5]])
    edges = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    # F reaches 0.5 at z = 1 and stays flat until 3: the smallest z with F >= 0.5 is 1.
    assert hist_quantile(edges, counts, np.array([[0.5]]))[0, 0] == pytest.approx(1.0)
    assert hist_quantile(edges, counts, np.array([[0.75]]))[0, 0] == pytest.approx(3.5)


def test_gmm_recovers_a_known_mixture():
    rng = np.random.default_rng(4)
    samples = np.concatenate([rng.normal(-2, 0.5, 30000), rng.normal(3, 1.0, 10000)])
    grid = Grid(-8, 10, 720)
    counts, _ = np.histogram(samples, bins=grid.edges)
    mix = fit_mixture(grid.centers, counts[None], components=2)
    order = np.argsort(mix.means[0])
    np.testing.assert_allclose(mix.weights[0][order], [0.75, 0.25], atol=0.01)
    np.testing.assert_allclose(mix.means[0][order], [-2, 3], atol=0.05)
    np.testing.assert_allclose(mix.sigmas[0][order], [0.5, 1.0], atol=0.05)
    x = np.linspace(-6, 8, 200)
    true_cdf = np.searchsorted(np.sort(samples), x) / samples.size
    assert np.abs(mixture_cdf(mix, x)[0] - true_cdf).max() < 0.01


def test_gmm_with_five_components_fits_every_cell_and_anchor():
    z, y = random_pixels(5)
    hist = LogitHistogram(C, Grid.covering(float(z.min()), float(z.max()), 256))
    hist.update(z, y)
    stats = make_stats(hist, list("abcd"), "gmm", components=5)
    assert stats.mixtures is not None and stats.anchor_mixtures is not None
    assert stats.mixtures.weights.shape == (C, C, 5)
    np.testing.assert_allclose(stats.mixtures.weights.sum(-1), 1.0)
    assert (stats.mixtures.sigmas**2 >= 1e-4 - 1e-12).all()
    # The positive cells sit about 3 above the negative ones.
    mean = (stats.mixtures.weights * stats.mixtures.means).sum(-1)
    assert (np.diag(mean) > mean.mean() + 1.5).all()


def test_gmm_leaves_empty_cells_with_zero_weight():
    hist = LogitHistogram(2, Grid(-5, 5, 64))
    hist.update(torch.tensor([[2.0, -1.0]] * 50), torch.zeros(50, dtype=torch.long))
    stats = make_stats(hist, ["a", "b"], "gmm", components=3)
    assert stats.mixtures is not None
    assert stats.mixtures.weights[1].sum() == 0  # class b never labelled
    assert stats.mixtures.weights[0, 0].sum() == pytest.approx(1.0)


def test_fingerprint_changes_with_content():
    z, y = random_pixels(6)
    grid = Grid(-8, 10, 64)
    a, b = LogitHistogram(C, grid), LogitHistogram(C, grid)
    a.update(z, y)
    b.update(z[:-1], y[:-1])
    fa = make_stats(a, list("abcd")).fingerprint
    assert fa == make_stats(a, list("abcd")).fingerprint
    assert fa != make_stats(b, list("abcd")).fingerprint
