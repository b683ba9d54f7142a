"""The label-free strength choice and the few-label selection rules (core/select.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blda_posthoc.core import align
from blda_posthoc.core.align import AlignmentMaps
from blda_posthoc.core.methods import Affine, Aligned, Shift
from blda_posthoc.core.select import (
    AUTO_GRID,
    auto_tau,
    em_collapsed,
    grid_shares,
    pick_best,
    predicted_shares,
    split_names,
)


def test_auto_tau_finds_the_strength_that_produced_the_target_shares():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 5, generator=gen)
    corrector = Shift(torch.tensor([1.0, -0.5, 0.3, 0.0, -1.2]))
    target = predicted_shares(corrector, z, 0.6)
    choice = auto_tau(corrector, z, target, fallback=0.2)
    assert choice["trusted"] and choice["tau"] == pytest.approx(0.6)
    assert choice["distance"][AUTO_GRID.index(0.6)] == 0.0
    # An independent count of the shares.
    pred = (z + 0.6 * corrector.shift).argmax(1).numpy()
    np.testing.assert_allclose(target, np.bincount(pred, minlength=5) / len(pred))


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("cache_tables", [None, 3])
def test_grid_shares_are_each_strengths_own_shares(monkeypatch, calibrated, cache_tables):
    gen = torch.Generator().manual_seed(4)
    c, g = 6, 65
    x = -8.0 + 0.25 * torch.arange(g)
    table = x + 0.8 * torch.randn(c, c, 1, generator=gen) + 0.3 * torch.sin(x * torch.rand(c, c, 1))
    valid = torch.rand(c, c, generator=gen) > 0.1
    maps = AlignmentMaps(-8.0, 0.25, table.float(), valid, 0.01, 100)
    pre = Affine(1 + 0.2 * torch.randn(c, generator=gen), torch.randn(c, generator=gen))
    corrector = Aligned(maps, pre if calibrated else None)
    z = 3 * torch.randn(5_000, c, generator=gen)
    z[:50] *= 4  # some logits beyond the grid
    if cache_tables is not None:  # strengths in batches of cache_tables
        monkeypatch.setattr(align, "CACHE_BYTES", cache_tables * 4 * table.numel())
    got = grid_shares(corrector, z, AUTO_GRID)
    for t, shares in zip(AUTO_GRID, got, strict=True):
        assert np.array_equal(shares, predicted_shares(corrector, z, t)), t


def test_auto_tau_keeps_the_fallback_when_the_estimate_has_collapsed():
    z = torch.randn(5_000, 4, generator=torch.Generator().manual_seed(1))
    corrector = Shift(torch.zeros(4))
    collapsed = np.array([1.0, 0.0, 0.0, 0.0])
    plain = predicted_shares(corrector, z, 0.0)
    assert em_collapsed(plain, collapsed)
    assert not em_collapsed(plain, plain) and not em_collapsed(plain, plain * 3 / plain.sum())
    choice = auto_tau(corrector, z, collapsed, fallback=0.2)
    assert not choice["trusted"] and choice["tau"] == 0.2 and "collapsed" in choice["criterion"]


def test_split_is_seeded_disjoint_and_sized():
    names = [f"img_{i:02d}" for i in range(20)]
    select, held = split_names(names, 5, seed=0)
    assert len(select) == 5 and len(held) == 15 and not set(select) & set(held)
    assert split_names(names, 5, seed=0) == (select, held)
    assert split_names(names[::-1], 5, seed=0) == (select, held)  # order of the input ignored
    assert split_names(names, 0.25, seed=0) == (select, held)
    assert split_names(names, 5, seed=1) != (select, held)
    for bad in (20, 0.0, 25):
        with pytest.raises(ValueError, match="held-out"):
            split_names(names, bad, seed=0)


def test_pick_best_never_chooses_below_the_baseline():
    assert pick_best([50.0, 49.0, 48.0], baseline=0) == 0
    assert pick_best([50.0, 52.0, 51.0], baseline=0) == 1
    assert pick_best([50.0, None, 50.5], baseline=0) == 2
    assert pick_best([50.0, 50.0], baseline=0) == 0  # a tie does not beat the baseline
    assert pick_best([None, 60.0], baseline=0) == 0
