"""Full-size paths: band-by-band resizing, chunked prediction and confidence, the trimmed BLDA
lookups; each bit for bit the whole-image path it replaces."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blda_posthoc.core import correct as core_correct
from blda_posthoc.core.align import build_maps, corrected_log_scores, lookup_tables
from blda_posthoc.core.correct import (
    correct_image,
    image_confidence,
    plain_and_predicted,
    predict_image,
    resize_logits,
    resized_rows,
)
from blda_posthoc.core.fit import Grid, LogitHistogram, channel_argmax, make_stats
from blda_posthoc.core.methods import Affine, Aligned, Plain
from blda_posthoc.core.relabel import confidence_logodds

C = 6
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


def logits(seed: int, h: int, w: int) -> torch.Tensor:
    """``(C, h, w)`` float32 logits of a few wide ranges (values far outside the grid too)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, h, w, generator=g) * 3.0 + torch.linspace(-2, 2, C)[:, None, None]


@pytest.fixture(scope="module")
def maps():
    """BLDA maps fitted on skewed pixels, with the last class's cells too small (no shift)."""
    rng = np.random.default_rng(3)
    labels = rng.choice(C, size=20000, p=[0.4, 0.3, 0.15, 0.1, 0.049, 0.001])
    z = rng.normal(0, 1.5, (20000, C)).astype(np.float32)
    z[np.arange(20000), labels] += 2.5
    hist = LogitHistogram(C, Grid.covering(-6.0, 6.0, 512))
    hist.update(torch.from_numpy(z), torch.from_numpy(labels))
    stats = make_stats(hist, [f"c{i}" for i in range(C)], settings={"min_pixels": 1})
    built = build_maps(stats, stats, min_pixels=100)
    assert not bool(built.valid.all())
    return built


def correctors(maps):
    """Identity, affine, BLDA and calibrated BLDA, with the strength each runs at."""
    affine = Affine(torch.linspace(0.8, 1.3, C), torch.linspace(0.5, -0.5, C))
    return [(Plain(), 0.0), (affine, 0.0), (Aligned(maps), 0.3), (Aligned(maps, affine), 0.5)]


# (logit size, output size): powers of two (banded), width only, equal, and whole-image sizes.
# Outputs narrower than BAND_MIN_WIDTH are never banded (torch's kernel depends on H + W).
SIZES = [
    ((16, 40), (64, 160)),
    ((9, 33), (72, 264)),
    ((40, 50), (40, 256)),
    ((40, 140), (40, 140)),
    ((11, 40), (33, 130)),
    ((16, 24), (64, 96)),
    ((13, 50), (40, 201)),
    ((40, 300), (20, 150)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("small", "size"), SIZES)
def test_bands_are_the_whole_resize_bit_for_bit(small, size, device):
    z = logits(0, *small).to(device)
    whole = resize_logits(z, size)
    for limit in (1, size[1] * 3, size[1] * 8 + 5, 10**9, None):
        parts = list(resized_rows(z, size, limit))
        assert [row for row, _ in parts] == sorted({row for row, _ in parts})
        assert parts[0][0] == 0
        assert torch.equal(torch.cat([band for _, band in parts], dim=1), whole)
    bands = [band for _, band in resized_rows(z, size, 1)]
    factor = size[0] // small[0]
    banded = size[0] % small[0] == 0 and factor in (1, 2, 4, 8) and size[1] >= 128
    assert (len(bands) > 1) == banded
    assert all(band[0].numel() % 128 == 0 for band in bands[:-1])  # aligned (PIXEL_ALIGN)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("small", "size"), SIZES[:6])
def test_predictions_equal_the_whole_image_path(maps, small, size, device, monkeypatch):
    monkeypatch.setattr(core_correct, "SLAB_PIXELS", size[1] * 2)  # several bands
    z = logits(1, *small).to(device)
    full = resize_logits(z, size)
    for corrector, tau in correctors(maps.to(device) if device != "cpu" else maps):
        corrector = corrector.to(device)
        want_pred, scores = correct_image(z, size, corrector, tau)
        want_conf = confidence_logodds(scores)
        for chunk in (37, 1024, None):
            plain, pred = plain_and_predicted(z, size, corrector, tau, chunk)
            assert torch.equal(pred, want_pred)
            assert plain is not None and torch.equal(plain, full.argmax(0))
            assert torch.equal(predict_image(z, size, corrector, tau, chunk), want_pred)
            plain2, pred2, logodds = image_confidence(z, size, corrector, tau, chunk)
            assert plain2 is not None and torch.equal(plain2, plain)
            assert torch.equal(pred2, want_conf[0])
            if chunk == 37 or device != "cpu":
                # Unaligned chunks: the last pixels of each may round otherwise; on CUDA the
                # reduction's order depends on the tensor's shape (the labels above are exact).
                torch.testing.assert_close(logodds, want_conf[1], atol=2e-6, rtol=1e-6)
            else:  # aligned chunks (the default) on CPU: bit for bit, not merely close
                assert torch.equal(logodds, want_conf[1])
        # Full-size logits are taken as they are.
        assert torch.equal(plain_and_predicted(full, size, corrector, tau, 53)[1], want_pred)


def test_without_plain_nothing_extra_is_returned(maps):
    z = logits(2, 8, 8)
    aligned = Aligned(maps)
    assert plain_and_predicted(z, (32, 32), aligned, 0.2, plain=False)[0] is None
    plain, pred, logodds = image_confidence(z, (32, 32), aligned, 0.2, plain=False)
    assert plain is None and pred.shape == logodds.shape == (32, 32)


def test_nan_logits_are_placed_as_argmax_places_them():
    z = logits(4, 8, 8)
    z[2, 3, 3] = float("nan")
    plain, pred = plain_and_predicted(z, (32, 32), Plain(), 0.0)
    assert plain is not None and torch.equal(plain, pred)
    assert torch.equal(pred, channel_argmax(resize_logits(z, (32, 32))))


def old_log_scores(z, maps, tau):
    """``corrected_log_scores`` as it was before the in-grid and all-valid short cuts."""
    tables = lookup_tables(maps, tau)
    c, g = z.shape[1], tables.own.shape[1]
    inside = z.clamp(maps.lo, maps.lo + maps.step * (g - 1))
    pos = (inside - maps.lo) / maps.step
    k = pos.floor().clamp_(max=g - 2)
    frac = pos - k
    top = z.amax(1, keepdim=True)
    weight = torch.exp(z - top)
    shifted_weight = weight * torch.exp(-tau * (z - inside))
    rows = k.long() + torch.arange(c, device=z.device) * g
    bag = F.embedding_bag(
        rows, tables.exp_shift, per_sample_weights=shifted_weight * (1 - frac), mode="sum"
    ) + F.embedding_bag(
        rows + 1, tables.exp_shift, per_sample_weights=shifted_weight * frac, mode="sum"
    )
    log_total = torch.log(bag) + tables.offset
    if not bool(maps.valid.all()):
        log_total = torch.logaddexp(log_total, torch.log(weight @ tables.skipped))
    own = tables.own.reshape(-1)
    t0, t1 = own.take(rows), own.take(rows + 1)
    own_shift = (t0 + frac * (t1 - t0) - z) * maps.valid.diagonal()
    return z + tau * own_shift - top - log_total


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("skipped", ["one hypothesis", "none", "every hypothesis"])
def test_lookups_equal_the_untrimmed_formula_bit_for_bit(maps, skipped, device):
    table = type(maps)(**{**vars(maps), "cache": {}})
    if skipped == "none":
        table.valid = torch.ones_like(maps.valid)
    elif skipped == "every hypothesis":
        table.valid = maps.valid.clone()
        table.valid[:, 1] = False  # every hypothesis i has cell (i, 1) without a shift
    table = table.to(device)
    partial = lookup_tables(table, 0.2).skip_columns
    assert (partial is not None) == (skipped == "one hypothesis")
    z = logits(5, 50, 80).reshape(C, -1).T.contiguous().to(device)
    inside = z.clamp(-5.9, 5.9)  # every pixel inside the grid: the factor is skipped
    edge = inside.clone()
    edge[7, 2] = table.lo + table.step * (table.table.shape[-1] - 1)  # on the top edge
    for pixels in (inside, z * 2.0, edge):
        for tau in (0.2, 0.9):
            got = corrected_log_scores(pixels, table, tau)
            assert torch.equal(got, old_log_scores(pixels, table, tau))
