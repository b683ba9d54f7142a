"""compare's shared-work row predictions equal the row-by-row evaluation they replace."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import fitted_case

from blda_posthoc.core import rows as rows_module
from blda_posthoc.core.align import AlignmentMaps, corrected_log_scores
from blda_posthoc.core.correct import (
    correct_image,
    predict_image,
    resize_logits,
    sample_logits,
    sample_positions,
)
from blda_posthoc.core.evaluate import ConfusionMatrix
from blda_posthoc.core.fit import last_argmax
from blda_posthoc.core.methods import Aligned, Blended, Plain, Shift
from blda_posthoc.core.rows import RowPredictor, pixel_counts
from blda_posthoc.io.store import LogitStore
from blda_posthoc.pipelines.compare import DEFAULT_TAU_GRID, Row, build_rows
from blda_posthoc.pipelines.corrections import CorrectionSpec, read_statistics

TAUS = (*DEFAULT_TAU_GRID, 1.5)


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> tuple[list[Row], list[torch.Tensor]]:
    """Every method's rows (default grid and tau 1.5) and three target images' logits."""
    case = fitted_case(tmp_path_factory.mktemp("rows"), tgt_images=3, dtype="float32")
    with LogitStore([case["tgt"]]) as store:
        names = store.class_names
        statistics = read_statistics(case["tgt_stats"], case["src_stats"], names)
        spec = CorrectionSpec("blda", None, False, case["tgt_stats"], case["src_stats"], 0.01, None)
        methods = ["none", "blda", "calibrated-blda", "filled-blda", "temperature"]
        methods += ["vector-scaling", "bias", "cbst", "em-map", "logit-adjust"]
        rows, _, skipped = build_rows(methods, TAUS, spec, statistics, names, "cpu")
        images = [z for _, z in store.iter_images()]
    assert not skipped and len(rows) > 40
    # BLDA maps with cells that get no shift (too few pixels), for the skipped-cell term.
    maps = next(r.corrector.maps for r in rows if isinstance(r.corrector, Aligned))
    valid = maps.valid.clone()
    valid[0, 1] = valid[2, 2] = valid[3, 0] = False
    holes = Aligned(AlignmentMaps(maps.lo, maps.step, maps.table, valid, maps.clamp, 100))
    rows += [Row("blda", tau, holes) for tau in (0.2, 0.5, 1.0)]
    # ... and maps where every hypothesis has such a cell (the term on every column).
    c = valid.shape[0]
    every = maps.valid.clone()
    every[torch.arange(c), (torch.arange(c) + 1) % c] = False
    spread = Aligned(AlignmentMaps(maps.lo, maps.step, maps.table, every, maps.clamp, 100))
    rows += [Row("blda", tau, spread) for tau in (0.3, 0.7)]
    return rows, images


def row_by_row(rows: list[Row], z: torch.Tensor) -> torch.Tensor:
    """``(R, N)``: each row's own ``correct_image`` prediction (what compare used to do)."""
    size = (int(z.shape[1]), int(z.shape[2]))
    return torch.stack([row.predict(z, size).reshape(-1) for row in rows])


def flat(z: torch.Tensor) -> torch.Tensor:
    return z.reshape(z.shape[0], -1).T


def test_every_row_equals_its_own_evaluation(grid):
    rows, images = grid
    predictor = RowPredictor([(r.corrector, r.tau or 0.0) for r in rows])
    kinds = {g.kind for g in predictor.groups}
    assert kinds == {"plain", "aligned", "linear", "own"}, kinds
    for z in images:
        assert torch.equal(predictor.predict(flat(z)), row_by_row(rows, z))


def test_logits_beyond_the_grid_and_chunk_sizes(grid):
    rows, images = grid
    z = images[0].clone()
    maps = next(r.corrector.maps for r in rows if isinstance(r.corrector, Aligned))
    top = maps.lo + maps.step * (maps.table.shape[-1] - 1)
    z[0, :3, :] = top + 4.0  # far above the grid
    z[1, 3:5, :] = maps.lo - 6.0  # far below it
    z[2, 5, :7] = top + maps.step / 3  # just above the top grid point
    expected = row_by_row(rows, z)
    for chunk in (1, 37, 1 << 20):
        predictor = RowPredictor([(r.corrector, r.tau or 0.0) for r in rows], chunk_pixels=chunk)
        assert torch.equal(predictor.predict(flat(z)), expected), chunk


def test_batched_blda_scores_equal_each_strength_alone_bit_for_bit(grid):
    """Not only the argmax: every score of a group's strengths is corrected_log_scores' value
    (predictions rarely show a change of rounding; the scores do)."""
    rows, images = grid
    z = flat(images[1]).contiguous()
    seen = 0
    for row in rows:
        if not (isinstance(row.corrector, Aligned) and row.tau):
            continue
        maps = row.corrector.maps
        top = maps.lo + maps.step * (maps.table.shape[-1] - 1)
        base = z if row.corrector.pre is None else row.corrector.pre.apply(z)
        base = base.clamp(maps.lo, top).contiguous()  # beyond the grid: scored one by one
        predictor = RowPredictor([(row.corrector, t) for t in (row.tau, 0.05, 0.9)])
        group = next(g for g in predictor.groups if g.kind == "aligned")
        scores = predictor.aligned_scores(group, maps, base)
        for slot, tau in enumerate(group.taus):
            assert torch.equal(scores[:, slot], corrected_log_scores(base, maps, tau)), tau
        seen += 1
    assert seen >= 10


def test_last_argmax_is_argmax_with_ties_and_nan():
    x = torch.tensor(
        [[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [0.0, float("nan"), 5.0], [float("nan")] * 3]
    )
    x = torch.cat([x, torch.randn(500, 3).round()])  # many ties
    assert torch.equal(last_argmax(x), x.argmax(-1))
    wide = torch.randn(64, 7, 19).round()
    assert torch.equal(last_argmax(wide), wide.argmax(-1))


def test_lookup_tables_are_built_once_per_strength_when_the_cache_holds_one(grid, monkeypatch):
    """Many classes make each table large, so the maps' cache keeps one: the predictor must not
    ask it again for every chunk (that rebuilt every strength's table per chunk)."""
    import blda_posthoc.core.align as align

    rows, images = grid
    maps = next(r.corrector.maps for r in rows if isinstance(r.corrector, Aligned))
    fresh = Aligned(AlignmentMaps(maps.lo, maps.step, maps.table, maps.valid, maps.clamp, 100))
    monkeypatch.setattr(align, "CACHE_BYTES", 1)  # the cache keeps one table
    built = []

    def counting_lookup(maps_, tau):
        if (float(tau), str(maps_.table.device)) not in maps_.cache:
            built.append(tau)
        return lookup(maps_, tau)

    lookup = rows_module.lookup_tables
    monkeypatch.setattr(rows_module, "lookup_tables", counting_lookup)
    taus = (0.2, 0.5, 1.0)
    predictor = RowPredictor([(fresh, t) for t in taus], chunk_pixels=37)
    pred = predictor.predict(flat(images[0]))
    assert sorted(built) == sorted(taus)  # once each, whatever the number of chunks
    expected = row_by_row([Row("blda", t, fresh) for t in taus], images[0])
    assert torch.equal(pred, expected)


def test_equal_corrections_and_strengths_are_evaluated_once(grid):
    rows, images = grid
    aligned = next(r for r in rows if isinstance(r.corrector, Aligned) and r.tau)
    maps = aligned.corrector.maps
    twin = Aligned(
        AlignmentMaps(maps.lo, maps.step, maps.table.clone(), maps.valid.clone(), 0.01, 100),
        aligned.corrector.pre,
    )
    linear = [r for r in rows if isinstance(r.corrector, (Shift, Blended))]
    assert {type(r.corrector) for r in linear} == {Shift, Blended}
    copies = [
        Row(r.method, r.tau, Shift(r.corrector.shift.clone()))
        if isinstance(r.corrector, Shift)
        else Row(r.method, r.tau, Blended(r.corrector.scale.clone(), r.corrector.bias.clone()))
        for r in linear[:: max(1, len(linear) // 4)]
    ]
    extra = [Row(aligned.method, aligned.tau, twin), Row(aligned.method, 0.45, twin), *copies]
    mine = rows + extra
    predictor = RowPredictor([(r.corrector, r.tau or 0.0) for r in mine])
    group_of = {row: g for g in predictor.groups for row in g.rows}
    assert group_of[len(rows)] is group_of[rows.index(aligned)]  # the twin joins the group
    assert group_of[len(rows) + 1] is group_of[rows.index(aligned)]
    for k, copy in enumerate(copies):
        original = next(
            i for i, r in enumerate(rows) if r.tau == copy.tau and r.method == copy.method
        )
        assert group_of[len(rows) + 2 + k] is group_of[original]
    for group in predictor.groups:
        assert len(set(group.taus)) == len(group.taus)  # each strength evaluated once
    for z in images[:2]:
        assert torch.equal(predictor.predict(flat(z)), row_by_row(mine, z))


def test_linear_rows_near_ties_large_logits_and_the_shortcut(monkeypatch):
    """Shift and Blended rows: the end-point shortcut and the full path, both exact."""
    g = torch.Generator().manual_seed(3)
    c = 19
    z = torch.randn(6000, c, generator=g) * 3
    z[:500, 1] = z[:500, 4]  # exact ties
    z[500:1000, 2] = z[500:1000, 0] + 1e-6  # near ties
    z[1000:1500] *= 1e3  # large logits
    # 18 channels at 0.25 and one a float step above: log_softmax merges the two top scores,
    # so its argmax is channel 0 where the argmax of the logits is channel 5
    z[1500:1600] = 0.25
    z[1500:1600, 5] = torch.nextafter(torch.tensor(0.25), torch.tensor(1.0))
    zero = Shift(torch.zeros(c))
    assert int(zero.log_scores(z[1500:1501], 0.5).argmax()) == 0 != int(z[1500].argmax())
    shift = Shift(torch.randn(c, generator=g))
    blend = Blended(1 + 0.3 * torch.randn(c, generator=g), 0.5 * torch.randn(c, generator=g))
    taus = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
    rows = [(corrector, t) for corrector in (zero, shift, blend) for t in taus]
    expected = torch.stack([corrector.log_scores(z, t).argmax(-1) for corrector, t in rows])
    exact = rows_module._linear_exact
    evaluated = []

    def counted(corrector, pixels, strengths):
        evaluated.append(pixels.shape[0])
        return exact(corrector, pixels, strengths)

    monkeypatch.setattr(rows_module, "_linear_exact", counted)
    predictor = RowPredictor(rows, chunk_pixels=777)
    assert [g.kind for g in predictor.groups] == ["linear"] * 3
    assert torch.equal(predictor.predict(z), expected)
    # both paths taken: most pixels by the end points, the close calls at every strength
    assert 100 * 3 <= sum(evaluated) < z.shape[0] * 3 // 2


@dataclass(frozen=True)
class Reversed:
    """A correction this module does not know: it must go through its own log_scores."""

    def log_scores(self, z: torch.Tensor, tau: float) -> torch.Tensor:
        return torch.log_softmax(-z * (1 + tau), dim=-1)

    def is_identity(self, tau: float) -> bool:
        return False

    def to(self, device: torch.device | str) -> Reversed:
        return self


def test_unknown_corrections_use_their_own_scores():
    z = torch.randn(500, 4, generator=torch.Generator().manual_seed(1))
    predictor = RowPredictor([(Plain(), 0.0), (Reversed(), 0.5), (Reversed(), 2.0)])
    assert [g.kind for g in predictor.groups] == ["plain", "own", "own"]
    got = predictor.predict(z)
    assert torch.equal(got[0], z.argmax(-1))
    assert torch.equal(got[1], z.argmin(-1)) and torch.equal(got[2], z.argmin(-1))


def test_counts_equal_a_confusion_matrix_per_row(grid):
    rows, images = grid
    # Rows asked twice share a strength of their group: counted once, given to both rows.
    twice = [r for r in rows if isinstance(r.corrector, (Aligned, Shift)) and r.tau][::3]
    rows = [*rows[:5], *twice, *rows[5:]]
    predictor = RowPredictor([(r.corrector, r.tau or 0.0) for r in rows], chunk_pixels=100)
    assert any(len(set(g.slots)) < len(g.slots) for g in predictor.groups)
    z = images[1]
    c = z.shape[0]
    rng = np.random.default_rng(0)
    label = torch.from_numpy(rng.integers(0, c, z.shape[1:]).astype(np.uint8))
    label[:2] = 255  # whole steps of ignored pixels
    label[torch.from_numpy(rng.random(z.shape[1:]) < 0.3)] = 255  # and scattered ones
    counts = predictor.counts(flat(z), label.reshape(-1), c)
    for row, count in zip(rows, counts, strict=True):
        cm = ConfusionMatrix(c)
        cm.update(row.predict(z, tuple(z.shape[1:])), label)
        assert np.array_equal(cm.matrix, count.numpy())


def test_counts_refuse_a_label_beyond_the_classes():
    with pytest.raises(ValueError, match="label value 7 is outside 0..2"):
        pixel_counts(torch.zeros((1, 3), dtype=torch.long), torch.tensor([0, 7, 255]), 3)


@pytest.mark.parametrize("size", [(64, 128), (100, 90), (37, 203)])
def test_sampled_logits_are_the_resized_logits_at_those_pixels(size):
    z = torch.randn(5, 16, 32, generator=torch.Generator().manual_seed(2)) * 4
    full = resize_logits(z, size)
    same, rows, cols = sample_logits(z, size, 1)
    assert torch.equal(same, full) and len(rows) == size[0] and len(cols) == size[1]
    for stride in (2, 3, 4, 8):
        sampled, rows, cols = sample_logits(z, size, stride)
        assert torch.equal(rows, sample_positions(size[0], stride))
        assert torch.equal(cols, torch.arange(stride // 2, size[1], stride))
        expected = full[:, rows][:, :, cols]
        # The same neighbours and weights; only float rounding may differ.
        assert torch.allclose(sampled, expected, rtol=1e-5, atol=1e-5)
        assert (sampled - expected).abs().max() < 1e-4


def test_the_grid_covers_cells_without_a_shift(grid):
    rows, _ = grid
    valid = [bool(r.corrector.maps.valid.all()) for r in rows if isinstance(r.corrector, Aligned)]
    assert False in valid  # the skipped-cell term of corrected_log_scores is exercised too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rows_on_cuda_equal_their_own_evaluation_there_and_nearly_cpu(grid):
    rows, images = grid
    on_gpu = [Row(r.method, r.tau, r.corrector.to("cuda"), r.auto) for r in rows]
    predictor = RowPredictor([(r.corrector, r.tau or 0.0) for r in on_gpu])
    for z in images:
        got = predictor.predict(flat(z.cuda()))
        assert torch.equal(got, row_by_row(on_gpu, z.cuda()))
        assert (got.cpu() != row_by_row(rows, z)).float().mean() < 1e-3
        sampled, _, _ = sample_logits(z.cuda(), (50, 70), 3)
        expected, _, _ = sample_logits(z, (50, 70), 3)
        assert torch.allclose(sampled.cpu(), expected, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_predict_image_equals_correct_image(grid, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    rows, images = grid
    z = images[2].to(device)
    for row in rows[::5]:
        corrector = row.corrector.to(device)
        pred = predict_image(z, (40, 52), corrector, row.tau or 0.0, chunk_pixels=97)
        assert torch.equal(pred, correct_image(z, (40, 52), corrector, row.tau or 0.0)[0])
