import numpy as np
import pytest
import torch

from blda_posthoc.core.distributions import hist_cdf, hist_quantile, mixture_cdf
from blda_posthoc.core.fit import (
    Grid,
    LogitHistogram,
    channel_argmax,
    fit_mixture,
    make_stats,
    pool_anchors,
)

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


def previous_counts(
    logits: torch.Tensor, labels: torch.Tensor, grid: Grid, num_classes: int, chunk: int
) -> np.ndarray:
    """The histogram update as first written: (N, C) rows, masked gather, one bincount per chunk."""
    c = num_classes
    if logits.dim() == 3:
        logits = logits.reshape(c, -1).T
    labels = labels.reshape(-1)
    keep = (labels != 255) & (labels < c)
    logits, labels = logits[keep], labels[keep].long()
    offsets = torch.arange(c) * grid.bins
    total = torch.zeros(c * c * grid.bins, dtype=torch.int64)
    for start in range(0, labels.numel(), chunk):
        z = logits[start : start + chunk].float()
        y = labels[start : start + chunk]
        bins = ((z - grid.lo) / grid.step).floor().clamp_(0, grid.bins - 1)
        index = (y[:, None] * (c * grid.bins) + offsets[None, :]) + bins.long()
        total += torch.bincount(index.reshape(-1), minlength=total.numel())
    return total.reshape(c, c, grid.bins).numpy()


def edge_heavy_logits(seed: int, grid: Grid, shape: tuple[int, ...]) -> torch.Tensor:
    """Random logits, a third of them exactly on bin edges (top edge included) or outside."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(grid.lo - 2, grid.hi + 2, shape)
    edges = np.concatenate([grid.edges, [grid.hi, grid.lo, grid.hi + 1e-3, grid.lo - 1e-3]])
    pick = rng.random(shape)
    z = np.where(pick < 0.25, rng.choice(edges, shape), z)
    z = np.where(pick > 0.95, rng.choice([grid.hi, 1e6, -1e6, np.inf, -np.inf], shape), z)
    return torch.from_numpy(z.astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "grid", [Grid(-8.0, 10.0, 128), Grid(-3.3, 2.9, 37), Grid.covering(-11.2, 15.7, 4096)]
)
def test_binning_equals_previous_implementation_exactly(grid: Grid, dtype: torch.dtype):
    c = 5
    rng = np.random.default_rng(7)
    z = edge_heavy_logits(11, grid, (c, 23, 31)).to(dtype)
    y = torch.from_numpy(rng.integers(0, c + 3, (23, 31)))  # includes labels >= C
    y[rng.random((23, 31)) < 0.1] = 255
    expected = previous_counts(z, y, grid, c, chunk=1 << 20)
    assert expected.sum() > 0
    for chunk in (1, 7, 100, 23 * 31, 1 << 20):
        image = LogitHistogram(c, grid, chunk_pixels=chunk)
        image.update(z, y)
        np.testing.assert_array_equal(image.counts(), expected)
        rows = LogitHistogram(c, grid, chunk_pixels=chunk)
        rows.update(z.reshape(c, -1).T, y.reshape(-1))
        np.testing.assert_array_equal(rows.counts(), expected)
        assert image.num_pixels == rows.num_pixels == int(((y != 255) & (y < c)).sum())


def test_binning_counts_edges_and_outside_values_where_the_formula_puts_them():
    grid = Grid(0.0, 4.0, 4)  # edges 0, 1, 2, 3, 4
    z = torch.tensor([[-5.0, 0.0, 0.999, 1.0, 2.0, 3.5, 4.0, 9.0, float("inf"), -float("inf")]])
    hist = LogitHistogram(1, grid, chunk_pixels=3)
    hist.update(z.T, torch.zeros(z.shape[1], dtype=torch.long))
    # bin 0: -5, 0, 0.999, -inf; bin 1: 1; bin 2: 2; bin 3: 3.5, 4 (top edge), 9, inf
    np.testing.assert_array_equal(hist.counts()[0, 0], [4, 1, 1, 4])


def test_binning_uint8_labels_with_many_classes():
    c = 300  # labels as uint8 cannot name every class; 255 stays ignore
    grid = Grid(-1.0, 1.0, 4)
    z = torch.zeros(c, 3)
    y = torch.tensor([0, 255, 254], dtype=torch.uint8)
    hist = LogitHistogram(c, grid)
    hist.update(z.T, y)
    counts = hist.counts()
    assert counts[0, :, 2].sum() == c and counts[254, :, 2].sum() == c and counts.sum() == 2 * c
    assert hist.num_pixels == 2


@pytest.mark.parametrize("shape", [(6, 17, 13), (3, 40), (19, 5, 4, 3)])
def test_channel_argmax_equals_torch_argmax(shape: tuple[int, ...]):
    rng = np.random.default_rng(5)
    z = torch.from_numpy(rng.integers(-3, 4, shape).astype(np.float32))  # many ties
    np.testing.assert_array_equal(channel_argmax(z).numpy(), z.argmax(0).numpy())
    z[2].view(-1)[::7] = float("nan")
    z[-1].view(-1)[::5] = float("inf")
    np.testing.assert_array_equal(channel_argmax(z).numpy(), z.argmax(0).numpy())
    assert channel_argmax(z.half()).dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_binning_an_affine_map_equals_binning_the_mapped_logits(dtype: torch.dtype):
    c, grid = 5, Grid(-9.0, 11.0, 64)
    rng = np.random.default_rng(3)
    z = edge_heavy_logits(5, Grid(-6.0, 6.0, 64), (c, 19, 23)).to(dtype)
    y = torch.from_numpy(rng.integers(0, c + 2, (19, 23)))
    scale = torch.tensor([0.5, 1.0, 1.7, 0.9, 1.3])
    bias = torch.tensor([0.25, -1.5, 0.0, 3.0, -0.1])
    mapped = z.float() * scale[:, None, None] + bias[:, None, None]
    expected = LogitHistogram(c, grid)
    expected.update(mapped, y)
    assert expected.counts().sum() > 0
    for chunk in (7, 1 << 20):
        folded = LogitHistogram(c, grid, chunk_pixels=chunk)
        folded.update(z, y, (scale, bias))
        np.testing.assert_array_equal(folded.counts(), expected.counts())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channel_argmax_of_an_affine_map_equals_that_of_the_mapped_logits(dtype: torch.dtype):
    rng = np.random.default_rng(4)
    z = torch.from_numpy(rng.normal(0, 3, (6, 13, 17)).astype(np.float32)).to(dtype)
    z[:, 0, :3] = 1.5  # ties: the first channel wins, as with argmax
    scale = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.8, 1.2])
    bias = torch.tensor([0.0, 0.7, -1.0, 0.0, 0.3, 0.0])
    mapped = z.float() * scale[:, None, None] + bias[:, None, None]
    expected = mapped.argmax(0)
    assert torch.equal(channel_argmax(z, (scale, bias)), expected)
    assert torch.equal(channel_argmax(z.reshape(6, -1), (scale, bias)), expected.reshape(-1))
    assert not torch.equal(expected, z.float().argmax(0))  # the map changes the answer here
