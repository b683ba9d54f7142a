"""Label-free methods and the label-free default: numpy references, properties, CLI messages.

Each estimator is checked against a small loop written here from its definition (not from the
library code), then for the properties the docs promise: tau = 0 is the plain argmax, results do
not depend on how the pixels are chunked, the default names itself and falls back on its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import fitted_case

from blda_posthoc.cli import main
from blda_posthoc.core.adapt import (
    MAX_SHARE_FACTOR,
    balanced_confident,
    guard_shrink,
    predicted_counts,
    self_calibration,
    share_factors,
)
from blda_posthoc.core.correct import correct_image
from blda_posthoc.core.methods import Blended
from blda_posthoc.core.priors import (
    em_map_iterate,
    em_map_priors,
    em_priors,
    em_step,
    occurrence_priors,
    sinkhorn_offsets,
    smooth_towards,
)
from blda_posthoc.io.stats import read_stats, write_stats
from blda_posthoc.io.store import LogitStore
from blda_posthoc.pipelines.corrections import (
    CorrectionSpec,
    image_mean_probs,
    load_correction,
    read_statistics,
)

NEW_METHODS = ("em-map", "ot-prior", "occurrence-adjust", "self-calibrate")


def run(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    return fitted_case(tmp_path_factory.mktemp("label_free"), tgt_images=6, dtype="float32")


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def random_probs(seed: int, n: int = 400, c: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return softmax(rng.normal(size=(n, c)) * 2 + np.array([1.5, 0.0, -0.5, -2.0])[:c])


# --- estimators against numpy loops ------------------------------------------------------------


def reference_em_map(p: np.ndarray, src: np.ndarray, weight: float, iters: int) -> np.ndarray:
    n = p.shape[0]
    prior = src.copy()
    for _ in range(iters):
        w = p * (prior / src)
        w /= w.sum(1, keepdims=True)
        total = w.sum(0) + weight * n * src
        prior = total / total.sum()
    return prior


def test_em_map_matches_a_numpy_loop_and_keeps_rare_classes():
    p = random_probs(0)
    src = np.array([0.4, 0.3, 0.2, 0.1])
    got, _ = em_map_priors(p, src, weight=0.2, tol=1e-12)
    assert np.allclose(got, reference_em_map(p, src, 0.2, 2000), atol=1e-9)
    # every class keeps at least weight / (1 + weight) of its source prior
    assert (got >= 0.2 / 1.2 * src - 1e-12).all()
    plain, _ = em_priors(p, src, tol=1e-12)
    assert np.allclose(em_map_priors(p, src, weight=0.0, tol=1e-12)[0], plain, atol=1e-9)


def test_em_map_over_chunks_equals_in_memory():
    p = random_probs(1, n=300)
    src = np.array([0.25, 0.25, 0.25, 0.25])
    whole, _ = em_map_priors(p, src, weight=0.1, tol=1e-12)
    chunks = [p[:7], p[7:150], p[150:]]
    chunked, _ = em_map_iterate(
        lambda cur: sum(em_step(c, src, cur) for c in chunks), src, 300, weight=0.1, tol=1e-12
    )
    assert np.allclose(whole, chunked, atol=1e-12)


def reference_sinkhorn(logp: np.ndarray, target: np.ndarray, eps: float, iters: int) -> np.ndarray:
    g = np.zeros(target.size)
    for _ in range(iters):
        soft = softmax((logp + g) / eps).mean(0)
        g = g + eps * (np.log(target) - np.log(soft))
    return g - g.mean()


def test_sinkhorn_offsets_match_numpy_and_move_argmax_shares_to_the_target():
    p = random_probs(2, n=2000)
    logp = np.log(p)
    target = np.array([0.2, 0.3, 0.3, 0.2])
    got = sinkhorn_offsets(logp, target, epsilon=0.5, tol=1e-12, max_iter=5000)
    assert np.allclose(got, reference_sinkhorn(logp, target, 0.5, 5000), atol=1e-6)
    hard = sinkhorn_offsets(logp, target, epsilon=0.02, max_iter=5000)
    shares = np.bincount((logp + hard).argmax(1), minlength=4) / len(p)
    assert np.abs(shares - target).max() < 0.02
    # the pixels' order and a per-pixel constant do not matter
    order = np.random.default_rng(0).permutation(len(p))
    again = sinkhorn_offsets(logp[order] + 3.0, target, epsilon=0.5, tol=1e-12, max_iter=5000)
    assert np.allclose(again, got, atol=1e-6)


def test_occurrence_priors_count_images_above_the_pixel_prior():
    mean_probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.05, 0.45]])
    pixel = np.array([0.5, 0.25, 0.25])
    present = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]]).sum(0)  # strictly above
    assert np.allclose(occurrence_priors(mean_probs, pixel), (present + 1) / (3 + 2))


def test_smooth_towards_keeps_a_share_of_the_prior():
    got = smooth_towards(np.array([90.0, 10.0, 0.0]), np.array([0.5, 0.3, 0.2]), 0.1)
    assert np.allclose(got, (np.array([90, 10, 0]) + 10 * np.array([0.5, 0.3, 0.2])) / 110)


# --- self-calibration ------------------------------------------------------------------------


def test_balanced_confident_keeps_the_top_portion_of_each_predicted_class():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(500, 3)) + np.array([2.0, 0.0, -1.0])
    index, labels = balanced_confident(torch.from_numpy(scores), 0.5)
    p = softmax(scores)
    pred, conf = p.argmax(1), p.max(1)
    expected = []
    for c in range(3):
        mine = np.flatnonzero(pred == c)
        k = int(np.ceil(0.5 * mine.size))
        threshold = np.sort(conf[mine])[::-1][k - 1]
        expected += mine[conf[mine] >= threshold].tolist()
    assert index.tolist() == sorted(expected)
    assert (labels.numpy() == pred[index.numpy()]).all()


def test_self_calibration_guard_shrinks_a_map_that_would_collapse_a_class():
    rng = np.random.default_rng(4)
    z = torch.from_numpy(rng.normal(size=(3000, 3)) * 2)
    # Pseudo-labels that name class 0 almost everywhere, although the raw argmax gives each
    # class a third: the fit alone would shrink classes 1 and 2 many times over.
    scores = z.clone()
    scores[:, 0] += 5
    scale, bias, shrink = self_calibration(z, scores, keep=1.0, max_factor=3.0)
    before = torch.bincount(z.argmax(1), minlength=3).numpy()
    mapped = z * torch.from_numpy(scale) + torch.from_numpy(bias)
    after = torch.bincount(mapped.argmax(1), minlength=3).numpy()
    assert 0 < shrink < 1
    assert share_factors(before, after).max() <= 3.0


def reference_guard(z: np.ndarray, base: np.ndarray, shift: np.ndarray, limit: float) -> float:
    """The guard from its definition: the first of 1, 1/2, ..., 1/128 within ``limit``, else 0."""
    c = z.shape[1]

    def shares(pred: np.ndarray) -> np.ndarray:
        return np.maximum(np.bincount(pred, minlength=c) / len(pred), 1e-3)

    before = shares(z.argmax(1))
    for k in range(8):
        after = shares((base + 0.5**k * shift).argmax(1))
        if np.maximum(after / before, before / after).max() <= limit:
            return 0.5**k
    return 0.0


def test_guard_shrink_engages_on_a_planted_collapse_and_matches_numpy():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(4000, 4)) * 2
    base = z * np.array([1.2, 0.9, 1.0, 1.1]) + np.array([0.1, 0.0, -0.1, 0.2])
    before = predicted_counts(torch.from_numpy(z))

    def shrink_of(shift: np.ndarray, start: np.ndarray = base) -> float:
        based, delta = torch.from_numpy(start), torch.from_numpy(shift)
        return guard_shrink(before, lambda s: based + s * delta)

    # a shift that would remove class 3 (a log-prior shift of about -25)
    collapsed = np.array([0.3, 0.1, -0.2, -25.0])
    shrink = shrink_of(collapsed)
    assert 0 < shrink < 1
    assert shrink == reference_guard(z, base, collapsed, MAX_SHARE_FACTOR)
    after = np.bincount((base + shrink * collapsed).argmax(1), minlength=4)
    assert share_factors(before, after).max() <= MAX_SHARE_FACTOR
    # the full, unguarded shift is the collapse: class 3 is (almost) never predicted
    unguarded = np.bincount((base + collapsed).argmax(1), minlength=4)
    assert share_factors(before, unguarded).max() > MAX_SHARE_FACTOR
    # a mild shift is applied whole
    assert shrink_of(np.array([0.2, -0.1, 0.0, 0.1])) == 1.0
    # a limit no shrink can meet (the map collapses even at shrink 0) leaves no correction
    assert shrink_of(np.array([0.2, -0.1, 0.0, 0.1]), z + 30 * np.eye(4)[0]) == 0.0


def test_share_factors_are_symmetric_and_floored():
    f = share_factors(np.array([100, 0, 900]), np.array([10, 500, 490]))
    assert np.allclose(f, [10.0, 0.5 / 1e-3, 0.9 / 0.49])


def test_blended_is_the_identity_at_zero_and_the_map_at_one():
    z = torch.randn(50, 3)
    b = Blended(torch.tensor([2.0, 0.5, 1.0]), torch.tensor([0.1, -0.2, 0.3]))
    assert torch.equal(b.log_scores(z, 0.0), torch.log_softmax(z, -1))
    ref = torch.log_softmax(z * torch.tensor([2.0, 0.5, 1.0]) + torch.tensor([0.1, -0.2, 0.3]), -1)
    assert torch.allclose(b.log_scores(z, 1.0), ref)


# --- the methods through load_correction ------------------------------------------------------


def load(case, method: str | None, tau: float | None = None):
    with LogitStore([case["tgt"]]) as store:
        names = store.class_names
    spec = CorrectionSpec(method, tau, False, case["tgt_stats"], case["src_stats"])
    return load_correction(spec, names)


def sample_logits(path: Path) -> np.ndarray:
    stats = read_stats(path)
    assert stats.extras is not None
    return stats.extras.sample.logits.astype(np.float64)


@pytest.mark.parametrize("method", ("ot-prior", "occurrence-adjust", "self-calibrate"))
def test_new_methods_are_the_plain_argmax_at_strength_zero(case, method):
    ready = load(case, method, 0.0)
    assert ready.corrector.is_identity(0.0)
    z = torch.randn(200, 5)
    assert torch.equal(ready.corrector.log_scores(z, 0.0).argmax(1), z.argmax(1))


@pytest.mark.parametrize("method", NEW_METHODS)
def test_new_methods_do_not_depend_on_chunk_size(case, method):
    ready = load(case, method)
    with LogitStore([case["tgt"]]) as store:
        record = store.read(store.names[0])
    z = torch.from_numpy(record.logits)
    a = correct_image(z, record.size, ready.corrector, ready.tau, chunk_pixels=37)
    b = correct_image(z, record.size, ready.corrector, ready.tau, chunk_pixels=100_000)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)


def test_occurrence_adjust_matches_numpy(case):
    src, tgt = read_stats(case["src_stats"]), read_stats(case["tgt_stats"])
    assert src.extras is not None and tgt.extras is not None
    c = src.num_classes
    n_src = src.counts[:, 0, :].sum(-1).astype(float)
    pixel = (n_src + 1) / (n_src.sum() + c)

    def occurrence(stats) -> np.ndarray:
        sample = stats.extras.sample
        bounds = np.concatenate([[0], np.cumsum(sample.image_counts)])
        probs = softmax(sample.logits.astype(np.float64))
        means = np.array(
            [probs[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        )
        return ((means > pixel).sum(0) + 1) / (len(means) + 2)

    shift = np.log(occurrence(tgt)) - np.log(occurrence(src))
    ready = load(case, "occurrence-adjust", 0.7)
    z = sample_logits(case["tgt_stats"])
    expected = (z + 0.7 * shift).argmax(1)
    got = ready.corrector.log_scores(torch.from_numpy(z).float(), 0.7).argmax(1).numpy()
    assert (got == expected).mean() > 0.9999


def test_em_map_method_is_the_prior_shift_of_the_map_estimate(case):
    src = read_stats(case["src_stats"])
    assert src.extras is not None
    scale, bias = (np.asarray(a, np.float64) for a in src.extras.calibrations["vector"])
    n_src = src.counts[:, 0, :].sum(-1).astype(float)
    pi_src = (n_src + 1) / (n_src.sum() + src.num_classes)
    z = sample_logits(case["tgt_stats"])
    cal = z * scale + bias
    pi_tgt = reference_em_map(softmax(cal), pi_src, 0.1, 3000)
    expected = (cal + np.log(pi_tgt) - np.log(pi_src)).argmax(1)
    got = load(case, "em-map").corrector.log_scores(torch.from_numpy(z).float(), 1.0)
    assert (got.argmax(1).numpy() == expected).mean() > 0.999


def test_logit_adjust_shift_is_bounded_and_smoothed_towards_the_source(case):
    src, tgt = read_stats(case["src_stats"]), read_stats(case["tgt_stats"])
    assert tgt.extras is not None
    c = src.num_classes
    n_src = src.counts[:, 0, :].sum(-1).astype(float)
    pi_src = (n_src + 1) / (n_src.sum() + c)
    pred = tgt.extras.predicted.astype(float)
    pred[0] = 0  # a class never predicted must not get a huge boost
    pi_tgt = (pred + 0.1 * pred.sum() * pi_src) / (pred.sum() * 1.1)
    shift = np.clip(np.log(pi_src) - np.log(pi_tgt), -1, 1)
    from blda_posthoc.pipelines import corrections

    stats = read_statistics(case["tgt_stats"], case["src_stats"], src.class_names)
    stats.cond.extras.predicted = pred.astype(np.int64)  # type: ignore[union-attr]
    corrector, _ = corrections.build_corrector("logit-adjust", stats, 0.05, None)
    assert np.allclose(corrector.shift.numpy(), shift, atol=1e-6)  # type: ignore[attr-defined]
    assert np.abs(corrector.shift.numpy()).max() <= 1.0 + 1e-6  # type: ignore[attr-defined]


def test_image_counts_are_written_and_old_files_are_still_read(case, tmp_path):
    stats = read_stats(case["tgt_stats"])
    assert stats.extras is not None and stats.extras.sample.image_counts is not None
    assert stats.extras.sample.image_counts.sum() == len(stats.extras.sample.labels)
    assert len(stats.extras.sample.image_counts) == 6
    stats.extras.sample.image_counts = None  # as written before the counts existed
    old = tmp_path / "old.h5"
    write_stats(old, stats)
    again = read_stats(old)
    assert again.extras is not None and again.extras.sample.image_counts is None
    with pytest.raises(Exception, match="which image each pixel came from"):
        image_mean_probs(again, old, "occurrence-adjust")


# --- the default ------------------------------------------------------------------------------


def test_default_is_calibrated_blda_and_says_so(case, tmp_path):
    ready = load(case, None)
    assert (ready.method, ready.tau) == ("calibrated-blda", 0.7)
    assert "label-free default" in ready.settings["default"]["reason"]
    out = tmp_path / "pred"
    result = run("correct", case["tgt"], "--stats", case["tgt_stats"], "--anchors",
                 case["src_stats"], "--out-dir", out)  # fmt: skip
    assert "default: calibrated-blda τ 0.7" in result.output
    explicit = tmp_path / "explicit"
    run("correct", case["tgt"], "--stats", case["tgt_stats"], "--anchors", case["src_stats"],
        "--method", "calibrated-blda", "--tau", "0.7", "--out-dir", explicit)  # fmt: skip
    for png in sorted(out.rglob("*.png")):
        assert png.read_bytes() == (explicit / png.relative_to(out)).read_bytes()


def test_default_falls_back_to_cbst_without_calibrated_statistics(case, tmp_path):
    report = tmp_path / "eval.json"
    result = run("evaluate", case["tgt"], "--stats", case["tgt_stats"], "--json", report)
    # --stats alone (pseudo-labels) holds no calibration: the default falls back to cbst 1
    assert "default: cbst τ 1" in result.output and "fallback" in result.output
    settings = json.loads(report.read_text())["settings"]
    assert settings["method"] == "cbst" and settings["default"]["method"] == "cbst"


def test_blda_at_tau_0_2_is_unchanged_by_the_default(case, tmp_path):
    from blda_posthoc.core.align import build_maps, corrected_log_scores

    out = tmp_path / "blda"
    run("correct", case["tgt"], "--stats", case["tgt_stats"], "--anchors", case["src_stats"],
        "--method", "blda", "--tau", "0.2", "--scores-out", tmp_path / "s.h5",
        "--out-dir", out)  # fmt: skip
    cond, anchors = read_stats(case["tgt_stats"]), read_stats(case["src_stats"])
    maps = build_maps(cond, anchors, min_pixels=20)
    from blda_posthoc.io.images import read_label

    with LogitStore([case["tgt"]]) as store:
        for name in store.names:
            z = torch.from_numpy(store.read(name).logits)
            flat = z.reshape(z.shape[0], -1).T.float()
            pred = corrected_log_scores(flat, maps, 0.2).argmax(1).reshape(z.shape[1:])
            assert np.array_equal(read_label(out / f"{name}.png"), pred.numpy().astype(np.uint8))


def test_correct_warns_when_a_class_share_changes_tenfold(case, tmp_path):
    result = run("correct", case["tgt"], "--stats", case["tgt_stats"], "--anchors",
                 case["src_stats"], "--method", "bias", "--tau", "5",
                 "--out-dir", tmp_path / "p")  # fmt: skip
    lines = [line for line in result.output.splitlines() if "signature of a collapse" in line]
    assert len(lines) == 1 and lines[0].startswith("warning"), result.output
    named = re.findall(r"(class_\d+) (\d+)x", lines[0])
    assert named and all(int(factor) >= 10 for _, factor in named), lines[0]
    calm = run("correct", case["tgt"], "--stats", case["tgt_stats"], "--anchors",
               case["src_stats"], "--method", "bias", "--tau", "0.01",
               "--out-dir", tmp_path / "q")  # fmt: skip
    assert "signature of a collapse" not in calm.output


def planted_files(case, tmp_path: Path) -> tuple[Path, Path]:
    """Stats files whose ``vector-scaling`` removes a rare class and adds a handful of pixels.

    The target sample (10 000 pixels) predicts class_4 on 24 (0.24 %) and class_3 on none,
    class_3 the runner-up by 0.5 on 5 pixels; the anchors' vector scaling is the identity but
    for bias -50 on class_4 and +1 on class_3.
    """
    rng = np.random.default_rng(7)
    n, c = 10_000, 5
    z = rng.normal(size=(n, c)).astype(np.float32)
    top = np.concatenate([np.full(24, 4), rng.integers(0, 3, n - 24)])
    z[np.arange(n), top] += 10.0  # each pixel's class, far ahead
    z[:, 3] = z.max(1) - 3.0  # class_3 never predicted, 3 behind ...
    runners = np.arange(100, 105)
    z[runners, 3] = z[runners].max(1) - 0.5  # ... but 0.5 behind on 5 pixels
    z[:24, 0] = z[:24, 4] - 1.0  # class_4's pixels go to class_0 without it
    tgt, src = read_stats(case["tgt_stats"]), read_stats(case["src_stats"])
    assert tgt.extras is not None and src.extras is not None
    tgt.extras.sample = replace(tgt.extras.sample, logits=z, labels=z.argmax(1).astype(np.uint8),
                                image_counts=None)  # fmt: skip
    bias = np.zeros(c)
    bias[4], bias[3] = -50.0, 1.0
    src.extras.calibrations["vector"] = (np.ones(c), bias)
    paths = tmp_path / "planted_tgt.h5", tmp_path / "planted_src.h5"
    write_stats(paths[0], tgt)
    write_stats(paths[1], src)
    return paths


def test_the_warning_names_a_rare_class_a_correction_removes(case, tmp_path):
    tgt_stats, src_stats = planted_files(case, tmp_path)
    result = run("correct", case["tgt"], "--stats", tgt_stats, "--anchors", src_stats,
                 "--method", "vector-scaling", "--tau", "1",
                 "--out-dir", tmp_path / "p")  # fmt: skip
    lines = [line for line in result.output.splitlines() if "signature of a collapse" in line]
    assert len(lines) == 1 and lines[0].startswith("warning"), result.output
    # 24 pixels -> 0 (the fall counted down to one pixel): 24x; class_3, 0 -> 5 pixels: the rise
    # counted from 0.1 %, 1x, not named
    assert re.findall(r"(class_\d+) (\d+)x", lines[0]) == [("class_4", "24")], lines[0]
    # the guard's floor (0.1 %) saw 2.4x here, and would see class_3 from 0 to 5 pixels as 1x
    z = read_stats(tgt_stats).extras.sample.logits.astype(np.float64)
    before = np.bincount(z.argmax(1), minlength=5)
    after = np.bincount((z + np.array([0, 0, 0, 1.0, -50.0])).argmax(1), minlength=5)
    assert before[4] == 24 and after[4] == 0 and before[3] == 0 and after[3] == 5
    assert np.allclose(share_factors(before, after)[[3, 4]], [1.0, 2.4])
    assert np.allclose(share_factors(before, after, loss_floor=1e-4)[[3, 4]], [1.0, 24.0])


def test_share_factors_count_a_fall_down_to_the_loss_floor_and_a_rise_from_the_floor():
    # 40 000 pixels: a class of 0.24 % removed; one from 1 pixel to 85; one from 0 to 1 134
    before = np.array([96.0, 1.0, 0.0, 39_903.0])
    after = np.array([0.0, 85.0, 1_134.0, 38_781.0])
    f = share_factors(before, after, loss_floor=1 / 40_000)
    assert np.allclose(f, [96.0, 85 / 40_000 / 1e-3, 1_134 / 40_000 / 1e-3, 39_903 / 38_781])
    assert list(np.flatnonzero(f > MAX_SHARE_FACTOR)) == [0, 2]  # removed; and from 0 to 2.8 %
    # without a loss floor both directions use the floor (the guard's use): symmetric
    assert np.allclose(share_factors(after, before), share_factors(before, after))


# --- diagnose without labels ------------------------------------------------------------------


def test_a_collapsed_em_estimate_is_shown_as_such_never_as_a_number(case):
    from blda_posthoc.core.diagnose import diagnose
    from blda_posthoc.pipelines.diagnose import format_table, report_dict

    stats = read_stats(case["tgt_stats"])
    predicted = np.array([400, 300, 200, 90, 10])
    priors = np.array([0.4, 0.3, 0.29, 0.01, 1e-20])  # class_4: predicted, prior collapsed
    result = diagnose(stats, predicted, target_priors=priors)
    collapsed = result.classes[4]
    assert collapsed.em_collapsed and collapsed.estimated_ratio is None
    assert result.classes[3].estimated_ratio == pytest.approx(0.09 / 0.01)
    table = format_table(result)
    row = next(line for line in table.splitlines() if line.startswith("class_4"))
    assert "n/a (EM collapsed)" in row and "e+" not in row
    entry = report_dict(result, stats, case["tgt_stats"], 6)["per_class"]["class_4"]
    assert entry["estimated_ratio"] is None and entry["em_collapsed"] is True


def test_api_load_without_a_method_uses_the_default(case):
    from blda_posthoc import api

    ready = api.load(stats=read_stats(case["tgt_stats"]), anchors=read_stats(case["src_stats"]))
    assert (ready.method, ready.tau) == ("calibrated-blda", 0.7)
    assert ready.settings["default"]["method"] == "calibrated-blda"
    alone = api.load(stats=read_stats(case["tgt_stats"]))  # no calibration: the fallback
    assert (alone.method, alone.tau) == ("cbst", 1.0) and "fallback" in alone.settings["default"][
        "reason"
    ]
