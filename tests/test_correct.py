import numpy as np
import pytest
import torch
from reference_blda import (
    collect_cells,
    confusion,
    miou,
    reference_scores_hist,
    reference_scores_raw,
)

from blda_posthoc.core import align
from blda_posthoc.core.align import build_maps, corrected_log_scores
from blda_posthoc.core.correct import correct_image, resize_logits
from blda_posthoc.core.fit import Grid, LogitHistogram, LogitStats, make_stats
from blda_posthoc.core.methods import Aligned

C = 5
NAMES = [f"c{i}" for i in range(C)]


def biased_pixels(seed: int, n: int, bias: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixels whose logits favour the last classes by ``bias``; labels skewed to class 0."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(C, size=n, p=[0.4, 0.25, 0.15, 0.12, 0.08])
    z = rng.normal(0, 1.2, (n, C)).astype(np.float32)
    z[np.arange(n), labels] += rng.uniform(1.0, 3.0, n).astype(np.float32)
    z += np.linspace(-bias, bias, C, dtype=np.float32)
    return z, labels


def fit(z: np.ndarray, labels: np.ndarray, bins: int = 2048, **kw) -> LogitStats:
    hist = LogitHistogram(C, Grid.covering(float(z.min()), float(z.max()), bins))
    hist.update(torch.from_numpy(z), torch.from_numpy(labels))
    return make_stats(hist, NAMES, settings={"min_pixels": 1}, **kw)


@pytest.fixture(scope="module")
def case():
    src_z, src_y = biased_pixels(0, 20000, bias=0.0)
    tgt_z, tgt_y = biased_pixels(1, 6000, bias=0.8)
    return src_z, src_y, tgt_z, tgt_y


def test_matches_pointwise_histogram_reference(case):
    src_z, src_y, tgt_z, _ = case
    stats = fit(src_z, src_y)
    maps = build_maps(stats, stats, clamp=0.01)
    ours = corrected_log_scores(torch.from_numpy(tgt_z), maps, tau=0.5).numpy()
    ref = reference_scores_hist(
        tgt_z, stats.grid.edges, stats.counts, stats.anchor_counts, tau=0.5, clamp=0.01
    )
    # Tabulating T_ij on the grid and interpolating costs at most a few thousandths.
    err = np.abs(ours - ref)
    assert err.max() < 1e-2 and np.quantile(err, 0.99) < 1e-3
    assert (ours.argmax(1) == ref.argmax(1)).mean() > 0.999


def test_agrees_with_raw_sample_reference_on_conditionals_from_pseudo_labels(case):
    src_z, src_y, tgt_z, tgt_y = case
    pseudo = tgt_z.argmax(1)
    cond, anchors = fit(tgt_z, pseudo), fit(src_z, src_y)
    maps = build_maps(cond, anchors, clamp=0.01)
    ours = corrected_log_scores(torch.from_numpy(tgt_z), maps, tau=0.2).numpy().argmax(1)
    ref = reference_scores_raw(
        tgt_z, collect_cells(tgt_z, pseudo, C), collect_cells(src_z, src_y, C), tau=0.2
    ).argmax(1)
    assert (ours == ref).mean() >= 0.98
    assert abs(miou(confusion(ours, tgt_y, C)) - miou(confusion(ref, tgt_y, C))) < 1.0
    # The correction does something on this biased case.
    assert (ours != tgt_z.argmax(1)).mean() > 0.002


def test_gmm_estimator_agrees_with_histogram_on_gaussian_cells(case):
    src_z, src_y, tgt_z, _ = case
    hist_stats, gmm_stats = fit(src_z, src_y), fit(src_z, src_y, estimator="gmm", components=5)
    z = torch.from_numpy(tgt_z)
    a = corrected_log_scores(z, build_maps(hist_stats, hist_stats), 0.5).argmax(1)
    b = corrected_log_scores(z, build_maps(gmm_stats, gmm_stats), 0.5).argmax(1)
    assert (a == b).float().mean() > 0.97


def test_tau_zero_is_the_plain_argmax(case):
    src_z, src_y, tgt_z, _ = case
    stats = fit(src_z, src_y)
    maps = build_maps(stats, stats)
    logits = torch.from_numpy(tgt_z.T.reshape(C, 60, 100).copy())
    pred, scores = correct_image(logits, (60, 100), Aligned(maps), tau=0.0)
    assert torch.equal(pred, logits.argmax(0))
    torch.testing.assert_close(scores, torch.log_softmax(logits, 0))


def test_tiny_tau_is_close_to_identity(case):
    # The general path (no short-cut) with a vanishing tau changes (almost) nothing.
    src_z, src_y, tgt_z, _ = case
    stats = fit(src_z, src_y)
    z = torch.from_numpy(tgt_z)
    s = corrected_log_scores(z, build_maps(stats, stats), tau=1e-6)
    torch.testing.assert_close(s, torch.log_softmax(z, -1), atol=1e-4, rtol=0)


def test_identical_conditionals_and_anchors_give_no_shift():
    # Every positive cell equals P+ and every negative cell equals P-: T_ij is the identity.
    rng = np.random.default_rng(7)
    pos, neg = rng.integers(1, 50, 400), rng.integers(1, 50, 400)
    counts = np.where(np.eye(C, dtype=bool)[..., None], pos, neg).astype(np.int64)
    grid = Grid(-10, 10, 400)
    stats = LogitStats(NAMES, grid, counts, np.stack([pos * C, neg * C * (C - 1)]))
    maps = build_maps(stats, stats, clamp=0.0)
    z = torch.from_numpy(rng.uniform(-9.9, 9.9, (1000, C)).astype(np.float32))
    s = corrected_log_scores(z, maps, tau=1.0)
    torch.testing.assert_close(s, torch.log_softmax(z, -1), atol=1e-3, rtol=0)


def test_result_does_not_depend_on_chunk_size(case):
    src_z, src_y, tgt_z, _ = case
    stats = fit(src_z, src_y)
    maps = build_maps(stats, stats)
    logits = torch.from_numpy(tgt_z.T.reshape(C, 60, 100).copy())
    p1, s1 = correct_image(logits, (60, 100), Aligned(maps), tau=0.3, chunk_pixels=6000)
    p2, s2 = correct_image(logits, (60, 100), Aligned(maps), tau=0.3, chunk_pixels=77)
    assert torch.equal(p1, p2)
    torch.testing.assert_close(s1, s2, atol=1e-6, rtol=0)


def test_small_cells_get_no_shift():
    src_z, src_y = biased_pixels(2, 3000, bias=0.0)
    src_y[src_y == 4] = 3  # class 4 never labelled: its row of cells is empty
    stats = fit(src_z, src_y)
    maps = build_maps(stats, stats, min_pixels=1)
    assert not maps.valid[4].any() and maps.valid[:4].all()
    assert (4, 4) in maps.skipped and (4, 0) in maps.skipped
    z = torch.from_numpy(src_z)
    s = corrected_log_scores(z, maps, tau=0.7)
    torch.testing.assert_close(s[:, 4], torch.log_softmax(z, -1)[:, 4])
    assert not torch.allclose(s[:, 0], torch.log_softmax(z, -1)[:, 0])


def test_anchors_with_too_few_pixels_are_refused():
    z, y = biased_pixels(3, 50, bias=0.0)
    stats = fit(z, y)
    with pytest.raises(ValueError, match="anchors hold too few pixels"):
        build_maps(stats, stats, min_pixels=100)


def test_correction_raises_an_under_predicted_class():
    # Target logits are biased against class 0: the source-statistics correction (anchors and
    # conditionals from the *target-like* model behaviour on labelled data) must predict class 0
    # more often than the plain argmax, and get closer to its true frequency.
    z, y = biased_pixels(4, 20000, bias=0.8)
    stats = fit(z, y)
    s = corrected_log_scores(torch.from_numpy(z), build_maps(stats, stats), tau=0.5)
    before = (z.argmax(1) == 0).mean()
    after = (s.argmax(1).numpy() == 0).mean()
    truth = (y == 0).mean()
    assert before < truth and abs(after - truth) < abs(before - truth)


def test_resize_logits_is_bilinear_and_noop_at_same_size():
    x = torch.arange(2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2)
    assert resize_logits(x, (2, 2)) is x
    up = resize_logits(x, (4, 4))
    assert up.shape == (2, 4, 4)
    torch.testing.assert_close(up.mean((1, 2)), x.mean((1, 2)))


def test_logits_outside_the_grid_and_skipped_cells_match_reference(case):
    src_z, src_y, tgt_z, _ = case
    stats = fit(src_z, src_y)
    # Every cell of a row holds the pixels of one class: the rarest class's row is skipped.
    threshold = int(stats.cell_pixels.min()) + 1
    maps = build_maps(stats, stats, min_pixels=threshold)
    assert len(maps.skipped) == C
    wide = (tgt_z[:500] * 3.0).astype(np.float32)  # far beyond the fitted logit range
    assert wide.max() > stats.grid.hi and wide.min() < stats.grid.lo
    ours = corrected_log_scores(torch.from_numpy(wide), maps, tau=0.5).numpy()
    ref = reference_scores_hist(
        wide, stats.grid.edges, stats.counts, stats.anchor_counts, tau=0.5, min_pixels=threshold
    )
    np.testing.assert_allclose(ours, ref, atol=1e-2)


def test_too_large_tau_is_refused(case):
    src_z, src_y, tgt_z, _ = case
    stats = fit(src_z, src_y)
    with pytest.raises(ValueError, match="too large"):
        corrected_log_scores(torch.from_numpy(tgt_z), build_maps(stats, stats), tau=1000.0)


def test_logits_just_above_the_grid_top_match_reference_tightly(case):
    """Within one grid step above the top, T is the constant at the top (no extrapolation).

    A coarse grid and a large tau make a map clamped one step too high, or an exponential
    interpolated past the top, visible; every channel lies in ``(hi, hi + step)``, where the
    reference is exact, so the tolerance can be tight.
    """
    src_z, src_y, _, _ = case
    stats = fit(src_z, src_y, bins=16)
    hi, step = stats.grid.hi, (stats.grid.hi - stats.grid.lo) / stats.grid.bins
    rng = np.random.default_rng(5)
    above = (hi + step * rng.uniform(0.05, 0.95, (300, C))).astype(np.float32)
    maps = build_maps(stats, stats, clamp=0.01)
    for tau in (0.5, 1.0):
        ours = corrected_log_scores(torch.from_numpy(above), maps, tau=tau).numpy()
        ref = reference_scores_hist(
            above, stats.grid.edges, stats.counts, stats.anchor_counts, tau=tau, clamp=0.01
        )
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_background_writer_runs_every_write_in_order_and_raises_errors():
    from blda_posthoc.pipelines.correct import BackgroundWriter

    done: list[int] = []
    with BackgroundWriter() as writer:
        for i in range(5):
            writer.submit(done.append, i)
    assert done == [0, 1, 2, 3, 4]

    def fail(i: int) -> None:
        if i == 1:
            raise OSError("disk full")
        done.append(i)

    done.clear()
    with pytest.raises(OSError, match="disk full"), BackgroundWriter() as writer:
        for i in range(4):
            writer.submit(fail, i)
    assert done[:1] == [0] and 1 not in done  # writes after the failure may not all run


# --------------------------------------------------------------------- memory of the tables


@pytest.mark.parametrize("estimator", ["hist", "gmm"])
def test_tables_do_not_depend_on_the_build_chunks(case, monkeypatch, estimator):
    src_z, src_y, tgt_z, _ = case
    cond = fit(tgt_z, tgt_z.argmax(1), bins=256, estimator=estimator)
    anchors = fit(src_z, src_y, bins=256, estimator=estimator)
    tables = {}
    for chunk in (1, 1 << 30):  # one hypothesis row per step, or the whole table at once
        monkeypatch.setattr(align, "BUILD_CHUNK_VALUES", chunk)
        maps = build_maps(cond, anchors, min_pixels=400, fallback=anchors)
        tables[chunk] = (maps.table, align.lookup_tables(maps, 0.7))
    (t1, l1), (t2, l2) = tables[1], tables[1 << 30]
    assert torch.equal(t1, t2)
    assert torch.equal(l1.exp_shift, l2.exp_shift) and torch.equal(l1.own, l2.own)
    assert l1.offset == l2.offset and torch.equal(l1.skipped, l2.skipped)


def test_coarser_table_is_the_same_maps_at_fewer_points(case):
    src_z, src_y, tgt_z, _ = case
    cond, anchors = fit(tgt_z, tgt_z.argmax(1), bins=512), fit(src_z, src_y, bins=512)
    full = build_maps(cond, anchors)
    assert torch.equal(build_maps(cond, anchors, points=513).table, full.table)
    coarse = build_maps(cond, anchors, points=257)  # every other edge of the full grid
    assert coarse.table.shape == (C, C, 257) and coarse.lo == full.lo
    assert coarse.step == pytest.approx(2 * full.step)
    np.testing.assert_allclose(coarse.table, full.table[..., ::2], atol=1e-4)
    z = torch.from_numpy(tgt_z)
    close = corrected_log_scores(z, coarse, 0.5).argmax(1) == corrected_log_scores(
        z, full, 0.5
    ).argmax(1)
    assert float(close.float().mean()) > 0.995


def test_table_memory_estimate_and_the_largest_grid_that_fits():
    # 128 classes at 4096 bins: 8 bytes per value held (0.5 GiB) plus one build step.
    assert align.table_memory(128, 4097) == 8 * 128 * 128 * 4097 + 160 * align.BUILD_CHUNK_VALUES
    assert align.table_points(128, 4097, 4 * 2**30) == 4097
    fits = align.table_points(255, 4097, 1 * 2**30)
    assert fits is not None and align.MIN_TABLE_POINTS <= fits < 4097
    assert align.table_memory(255, fits) <= 2**30 < align.table_memory(255, fits + 1)
    assert align.table_points(255, 4097, 10 * 2**20) is None


def test_correction_memory_counts_statistics_tables_and_the_process():
    c, b = 160, 4096
    array = 4 * c * c * (b + 1)  # one float32 (C, C, G) table: maps or lookup
    stats = 8 * c * c * b
    none = align.Tables()
    assert align.correction_memory(c, b, groups=0, tables=none) == align.PROCESS_BYTES
    assert align.correction_memory(c, b, groups=3, tables=none) == align.PROCESS_BYTES + 3 * stats
    one = align.correction_memory(c, b, groups=3)
    assert one == align.PROCESS_BYTES + 3 * stats + align.table_memory(c, b + 1)
    # more maps and arrays add their tables, not another build step's temporaries
    two = align.correction_memory(c, b, groups=3, tables=align.Tables((1, 1), extra=3))
    assert two == one + 5 * array
    # a large table caches one lookup table whatever the strengths tried ...
    auto = align.correction_memory(c, b, groups=3, tables=align.Tables((20,)))
    assert auto == one
    # ... small ones up to CACHE_BYTES
    small = align.Tables((20,)).memory(16, b + 1) - align.ONE_CORRECTION.memory(16, b + 1)
    assert small == 19 * 4 * 16 * 16 * (b + 1) <= align.CACHE_BYTES


@pytest.mark.parametrize(
    "c, groups, tables",
    [
        (176, 3, align.ONE_CORRECTION),
        (255, 2, align.Tables((7, 20), 7)),
        (19, 1, align.Tables((1,))),
    ],
)
def test_the_suggested_bins_are_the_most_that_fit(c, groups, tables):
    budget = 4 * 2**30
    bins = align.fitting_bins(c, groups=groups, tables=tables, budget=budget)
    assert bins is not None and bins % align.BINS_STEP == 0
    assert align.correction_memory(c, bins, groups=groups, tables=tables) <= budget
    bigger = bins + align.BINS_STEP
    assert bigger > 1 << 16 or (
        align.correction_memory(c, bigger, groups=groups, tables=tables) > budget
    )
    assert align.fitting_bins(c, groups=groups, tables=tables, budget=align.PROCESS_BYTES) is None


MEASURE = """
import resource, sys
import numpy as np
from blda_posthoc.core import align
from blda_posthoc.core.fit import Grid, LogitStats, pool_anchors
c, b = int(sys.argv[1]), int(sys.argv[2])
counts = np.full((c, c, b), 0, np.int64)  # written: resident before the baseline
for i in range(c):
    counts[i, :, (b // 3 + 7 * i) % b : (b // 3 + 7 * i) % b + 40] = 3
    counts[i, i, b // 2 : b // 2 + 80] = 5
stats = LogitStats([f"k{i}" for i in range(c)], Grid(-8.0, 8.0, b), counts, pool_anchors(counts))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
maps = align.build_maps(stats, stats, min_pixels=1)
align.lookup_tables(maps, 0.5)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, align.table_memory(c, b + 1))
"""


def test_building_the_tables_stays_within_the_estimate():
    """Peak memory of building 48-class tables at 4096 bins, measured in a fresh process.

    Whole-array temporaries (the previous way) took about 190 bytes per grid value, 1.7 GiB
    here; the estimate is 8 bytes per value plus one build step (0.11 GiB).
    """
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", MEASURE, "48", "4096"], capture_output=True, text=True, check=True
    )
    grown, estimate = map(int, out.stdout.split())
    assert estimate < 0.12 * 2**30
    assert grown <= 1.2 * estimate, (grown, estimate)
