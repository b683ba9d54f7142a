"""Every correction method against a small independent numpy implementation, and properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import fitted_case
from PIL import Image

from blda_posthoc.cli import main
from blda_posthoc.core.align import build_maps, corrected_log_scores
from blda_posthoc.core.correct import correct_image, resize_logits
from blda_posthoc.core.methods import DEFAULT_TAUS, METHODS, Aligned, Plain
from blda_posthoc.io.stats import read_stats, write_stats
from blda_posthoc.io.store import LogitStore, StoreWriter
from blda_posthoc.pipelines.corrections import (
    CorrectionSpec,
    load_correction,
    read_statistics,
    target_priors,
)


def run(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """Source and target stores with their statistics (see conftest.fitted_case)."""
    return fitted_case(tmp_path_factory.mktemp("methods"), tgt_images=8, dtype="float32")


def target_pixels(case) -> tuple[np.ndarray, np.ndarray]:
    """All target pixels: ``(N, C)`` logits and ``(N,)`` labels."""
    with LogitStore([case["tgt"]]) as store:
        records = [store.read(n) for n in store.names]
    z = np.concatenate([r.logits.reshape(r.logits.shape[0], -1).T for r in records])
    y = np.concatenate([r.label.reshape(-1) for r in records])
    return z.astype(np.float64), y


def log_softmax(z: np.ndarray) -> np.ndarray:
    top = z.max(1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(1, keepdims=True))


def corrected(case, method: str, tau: float | None = None) -> np.ndarray:
    """The argmax of ``method`` on every target pixel, through load_correction."""
    with LogitStore([case["tgt"]]) as store:
        spec = CorrectionSpec(method, tau, False, case["tgt_stats"], case["src_stats"])
        ready = load_correction(spec, store.class_names)
    z, _ = target_pixels(case)
    return ready.corrector.log_scores(torch.from_numpy(z).float(), ready.tau).argmax(1).numpy()


@pytest.mark.parametrize(
    "kind,method", [("vector", "vector-scaling"), ("temperature", "temperature"), ("bias", "bias")]
)
def test_calibrations_are_the_stored_affine_maps(case, kind, method):
    src = read_stats(case["src_stats"])
    assert src.extras is not None
    scale, bias = src.extras.calibrations[kind]
    z, _ = target_pixels(case)
    full = 1.0 if method != "temperature" else None  # temperature has no strength
    expected = (z * scale + bias).argmax(1)
    assert (corrected(case, method, full) == expected).mean() > 0.9999
    if full is not None:
        # Applied tau of the way: the log-linear blend of the raw and the mapped logits.
        blend = ((1 - 0.3) * z + 0.3 * (z * scale + bias)).argmax(1)
        assert (corrected(case, method, 0.3) == blend).mean() > 0.9999
        assert (corrected(case, method, 0.0) == z.argmax(1)).all()
    if kind == "temperature":
        assert np.allclose(scale, scale[0]) and np.allclose(bias, 0)
    if kind == "bias":
        assert np.allclose(scale, 1)


def test_vector_scaling_lowers_cross_entropy_on_the_source(case):
    src = read_stats(case["src_stats"])
    assert src.extras is not None
    sample = src.extras.sample
    z, y = sample.logits.astype(np.float64), sample.labels.astype(int)
    scale, bias = src.extras.calibrations["vector"]
    raw = -log_softmax(z)[np.arange(len(y)), y].mean()
    calibrated = -log_softmax(z * scale + bias)[np.arange(len(y)), y].mean()
    assert calibrated < raw


def test_logit_adjust_matches_numpy(case):
    src, tgt = read_stats(case["src_stats"]), read_stats(case["tgt_stats"])
    assert tgt.extras is not None
    c = src.num_classes
    n_src = src.counts[:, 0, :].sum(-1).astype(float)
    pi_src = (n_src + 1) / (n_src.sum() + c)
    n_pred = tgt.extras.predicted.astype(float)
    # predicted shares smoothed towards the source prior, the shift clipped to [-1, 1]
    pi_tgt = (n_pred + 0.1 * n_pred.sum() * pi_src) / (1.1 * n_pred.sum())
    shift = np.clip(np.log(pi_src) - np.log(pi_tgt), -1.0, 1.0)
    z, _ = target_pixels(case)
    for tau in (0.5, 1.0):
        expected = (z + tau * shift).argmax(1)
        assert (corrected(case, "logit-adjust", tau) == expected).mean() > 0.9999


def test_cbst_matches_median_confidence_normalisation(case):
    z, _ = target_pixels(case)
    p = np.exp(log_softmax(z))
    pred = p.argmax(1)
    k = np.array([np.median(p[pred == c, c]) for c in range(p.shape[1])])
    expected = (p / k).argmax(1)
    got = corrected(case, "cbst", 1.0)
    # The thresholds come from 4096-bin log-odds histograms, not exact medians.
    assert (got == expected).mean() > 0.995
    assert (got != pred).any()


def test_target_priors_match_a_direct_em_loop(case):
    """The plain EM estimate ``--tau auto`` and ``diagnose --anchors`` compare shares with."""
    src, tgt = read_stats(case["src_stats"]), read_stats(case["tgt_stats"])
    assert src.extras is not None and tgt.extras is not None
    c = src.num_classes
    n_src = src.counts[:, 0, :].sum(-1).astype(float)
    pi_src = (n_src + 1) / (n_src.sum() + c)
    scale, bias = src.extras.calibrations["vector"]
    probs = np.exp(log_softmax(tgt.extras.sample.logits.astype(np.float64) * scale + bias))
    pi = pi_src.copy()
    for _ in range(5000):
        w = probs * (pi / pi_src)
        w /= w.sum(1, keepdims=True)
        new = w.mean(0)
        if np.abs(new - pi).max() < 1e-10:
            break
        pi = new
    statistics = read_statistics(case["tgt_stats"], case["src_stats"], src.class_names)
    target, source, pre = target_priors(statistics)
    np.testing.assert_allclose(source, pi_src, rtol=1e-12)
    np.testing.assert_allclose(target, pi, atol=1e-6)
    assert pre is not None and np.allclose(pre.scale.numpy(), scale, atol=1e-6)


def test_blda_is_the_plain_alignment(case):
    cond, anchors = read_stats(case["tgt_stats"]), read_stats(case["src_stats"])
    maps = build_maps(cond, anchors, min_pixels=20)
    z, _ = target_pixels(case)
    zt = torch.from_numpy(z).float()
    expected = corrected_log_scores(zt, maps, 0.2).argmax(1).numpy()
    assert (corrected(case, "blda") == expected).all()


def test_calibrated_blda_is_blda_on_a_calibrated_store(case, tmp_path):
    """Calibrate the logits by hand into new stores, fit them, align: the same predictions."""
    src = read_stats(case["src_stats"])
    assert src.extras is not None
    scale, bias = src.extras.calibrations["vector"]
    stores = {}
    for key in ("src", "tgt"):
        folder = tmp_path / key
        with LogitStore([case[key]]) as store:
            for name in store.names:
                r = store.read(name)
                out = folder / "logits" / f"{name}.npy"
                out.parent.mkdir(parents=True, exist_ok=True)
                np.save(
                    out, (r.logits * scale[:, None, None] + bias[:, None, None]).astype(np.float32)
                )
                lab = folder / "labels" / f"{name}.png"
                lab.parent.mkdir(parents=True, exist_ok=True)
                from PIL import Image

                Image.fromarray(r.label).save(lab)
        stores[key] = tmp_path / f"{key}_cal.h5"
        run(
            "import-logits",
            folder / "logits",
            "--labels",
            folder / "labels",
            "--out",
            stores[key],
            "--dtype",
            "float32",
        )
    run(
        "fit-stats",
        stores["src"],
        "--labels",
        "gt",
        "--min-pixels",
        "20",
        "--no-calibrate",
        "--out",
        tmp_path / "s.h5",
    )
    run(
        "fit-stats",
        stores["tgt"],
        "--labels",
        "pseudo",
        "--min-pixels",
        "20",
        "--out",
        tmp_path / "t.h5",
    )
    maps = build_maps(read_stats(tmp_path / "t.h5"), read_stats(tmp_path / "s.h5"), min_pixels=20)
    z, _ = target_pixels(case)
    zc = torch.from_numpy(z * scale + bias).float()
    expected = corrected_log_scores(zc, maps, 0.3).argmax(1).numpy()
    got = corrected(case, "calibrated-blda", 0.3)
    # Grids differ slightly (range of the calibrated store vs the calibrated range of the raw one).
    assert (got == expected).mean() > 0.995


def test_filled_blda_borrows_source_cells_where_pseudo_labels_leave_none(case, tmp_path):
    tgt = read_stats(case["tgt_stats"])
    src = read_stats(case["src_stats"])
    # Empty class 4's row, as if the pseudo-labels never predicted it.
    tgt.counts[4] = 0
    assert tgt.extras is not None
    write_stats(tmp_path / "empty.h5", tgt)
    plain = build_maps(tgt, src, min_pixels=20)
    filled = build_maps(tgt, src, min_pixels=20, fallback=src)
    assert not plain.valid[4].any() and filled.valid[4].all()
    assert torch.equal(plain.table[:4], filled.table[:4])
    # The borrowed map of cell (4, 4) is the source's own map, read on the target's grid.
    own = build_maps(src, src, min_pixels=20)
    x = torch.linspace(-2.0, 6.0, 50, dtype=torch.float64)

    def at(maps, i, j):
        g = torch.arange(maps.table.shape[-1], dtype=torch.float64) * maps.step + maps.lo
        return np.interp(x.numpy(), g.numpy(), maps.table[i, j].double().numpy())

    np.testing.assert_allclose(at(filled, 4, 4), at(own, 4, 4), atol=0.05)
    with LogitStore([case["tgt"]]) as store:
        spec = CorrectionSpec("filled-blda", 0.5, False, tmp_path / "empty.h5", case["src_stats"])
        ready = load_correction(spec, store.class_names)
    assert ready.settings["skipped_cells"] == []


@pytest.mark.parametrize("method", [m for m in METHODS if m in DEFAULT_TAUS])
def test_strength_zero_is_the_plain_argmax_without_calibration(case, method):
    z, _ = target_pixels(case)
    with LogitStore([case["tgt"]]) as store:
        spec = CorrectionSpec(method, 0.0, False, case["tgt_stats"], case["src_stats"])
        ready = load_correction(spec, store.class_names)
    zt = torch.from_numpy(z).float().T.reshape(5, -1, 1)
    pred, _ = correct_image(zt, (zt.shape[1], 1), ready.corrector, 0.0)
    if ready.corrector.is_identity(0.0):
        assert torch.equal(pred.reshape(-1), torch.from_numpy(z).float().argmax(1))
    else:  # calibrated-blda keeps its calibration at tau = 0
        assert method == "calibrated-blda"


def test_results_do_not_depend_on_chunk_size(case):
    with LogitStore([case["tgt"]]) as store:
        record = store.read(store.names[0])
        for method in ("blda", "cbst", "vector-scaling", "em-map", "calibrated-blda"):
            spec = CorrectionSpec(method, None, False, case["tgt_stats"], case["src_stats"])
            ready = load_correction(spec, store.class_names)
            z = torch.from_numpy(record.logits)
            a = correct_image(z, record.size, ready.corrector, ready.tau, chunk_pixels=37)
            b = correct_image(z, record.size, ready.corrector, ready.tau, chunk_pixels=100_000)
            assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)


def test_one_set_of_maps_serves_several_strengths(case):
    cond, anchors = read_stats(case["tgt_stats"]), read_stats(case["src_stats"])
    z = torch.from_numpy(target_pixels(case)[0]).float()
    shared = Aligned(build_maps(cond, anchors, min_pixels=20))
    for tau in (0.2, 0.7, 0.2, 1.0):
        fresh = Aligned(build_maps(cond, anchors, min_pixels=20))
        assert torch.equal(shared.log_scores(z, tau), fresh.log_scores(z, tau))
    assert not torch.equal(shared.log_scores(z, 0.2), shared.log_scores(z, 0.7))


def test_plain_is_log_softmax():
    z = torch.randn(50, 6)
    assert torch.allclose(Plain().log_scores(z, 0.3), torch.log_softmax(z, -1))


def test_tau_auto_picks_the_strength_closest_to_the_em_estimate(case):
    with LogitStore([case["tgt"]]) as store:
        spec = CorrectionSpec("blda", None, True, case["tgt_stats"], case["src_stats"])
        ready = load_correction(spec, store.class_names)
        statistics = read_statistics(case["tgt_stats"], case["src_stats"], store.class_names)
    choice = ready.settings["tau_auto"]
    if choice["trusted"]:
        assert ready.tau == choice["tau"] == choice["grid"][int(np.argmin(choice["distance"]))]
        assert "EM" in choice["criterion"]
    else:
        assert ready.tau == choice["tau"] == DEFAULT_TAUS["blda"]
    assert statistics.cond.extras is not None


def test_version_1_stats_still_work_for_blda_and_say_what_is_missing(case, tmp_path):
    import h5py

    old = tmp_path / "v1.h5"
    old.write_bytes(case["tgt_stats"].read_bytes())
    with h5py.File(old, "a") as f:
        for key in ("predicted", "confidence", "sample", "calibration", "calibrated"):
            if key in f:
                del f[key]
        f.attrs["version"] = 1
    out = tmp_path / "pred"
    run("correct", case["tgt"], "--stats", old, "--anchors", case["src_stats"], "--out-dir", out)
    result = run(
        "correct",
        case["tgt"],
        "--stats",
        old,
        "--method",
        "cbst",
        "--out-dir",
        tmp_path / "p2",
        ok=False,
    )
    assert result.exit_code == 1
    assert "version 1 stats file" in result.stderr and str(old) in result.stderr


@pytest.mark.parametrize("method", ["temperature", "vector-scaling", "bias"])
def test_a_calibration_takes_anchors_alone_as_the_methods_table_says(case, tmp_path, method):
    """docs/methods.md: the calibrations read ``--anchors`` (fitted with ground truth) only."""
    run("correct", case["tgt"], "--anchors", case["src_stats"], "--method", method,
        "--out-dir", tmp_path / "alone")  # fmt: skip
    run("correct", case["tgt"], "--stats", case["tgt_stats"], "--anchors", case["src_stats"],
        "--method", method, "--out-dir", tmp_path / "both")  # fmt: skip
    names = sorted(
        str(p.relative_to(tmp_path / "both")) for p in (tmp_path / "both").rglob("*.png")
    )
    assert names == sorted(
        str(p.relative_to(tmp_path / "alone")) for p in (tmp_path / "alone").rglob("*.png")
    )
    assert len(names) == 8
    for name in names:
        assert (tmp_path / "alone" / name).read_bytes() == (tmp_path / "both" / name).read_bytes()
    missing = run("correct", case["tgt"], "--method", method, "--out-dir", tmp_path / "x", ok=False)
    assert missing.exit_code == 2 and f"--method {method} needs --anchors" in missing.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("method", "kind"), [("vector-scaling", "vector"), ("bias", "bias")])
def test_correct_with_an_affine_calibration_is_the_argmax_of_the_map_end_to_end(
    case, tmp_path, method, kind
):
    """``blda correct`` writes ``argmax(scale * z + bias)`` of the logits at the image size."""
    extras = read_stats(case["src_stats"]).extras
    assert extras is not None
    scale, bias = (np.asarray(v, np.float64) for v in extras.calibrations[kind])
    out = tmp_path / "pred"
    run("correct", case["tgt"], "--anchors", case["src_stats"], "--method", method,
        "--tau", "1", "--out-dir", out)  # fmt: skip
    agree = total = changed = 0
    with LogitStore([case["tgt"]]) as store:
        for name in store.names:
            record = store.read(name)
            z = resize_logits(torch.from_numpy(record.logits).float(), record.size).double()
            mapped = (
                z * torch.from_numpy(scale)[:, None, None] + torch.from_numpy(bias)[:, None, None]
            )
            want = mapped.argmax(0).numpy()
            got = np.asarray(Image.open(out / f"{name}.png"))
            agree += int((got == want).sum())
            total += want.size
            changed += int((want != z.argmax(0).numpy()).sum())
    assert changed > 0  # the calibration moves some pixels off the plain argmax
    assert agree / total > 0.9999  # float32 against float64 ties aside


def test_cbst_gives_a_never_predicted_class_the_largest_boost(tmp_path):
    """A class no pixel is predicted as has no median confidence: it gets the others' largest
    shift ``-log k_c`` (the class most in need of a boost), not the smallest."""
    rng = np.random.default_rng(7)
    names = ["a", "b", "c", "d"]
    store = tmp_path / "t.h5"
    with StoreWriter(store, names, dtype="float32") as writer:
        for i in range(4):
            z = rng.normal(0, 2.0, (4, 20, 24)).astype(np.float32)
            z[1] += 1.5  # confident on b, unsure elsewhere: shifts differ between classes
            z[3] -= 30.0  # d is never the argmax
            writer.write(f"img_{i}", z)
    stats_path = tmp_path / "t_stats.h5"
    run("fit-stats", store, "--label-source", "pseudo", "--out", stats_path)
    with LogitStore([store]) as s:
        ready = load_correction(CorrectionSpec("cbst", 1.0, False, stats_path), s.class_names)
        z = np.concatenate([s.read(n).logits.reshape(4, -1).T for n in s.names]).astype(np.float64)
    shift = ready.corrector.shift.numpy()  # type: ignore[attr-defined]
    p = np.exp(log_softmax(z))
    pred = p.argmax(1)
    assert not (pred == 3).any()
    median = np.array([np.median(p[pred == c, c]) for c in range(3)])
    # Thresholds come from log-odds histograms: close to the exact medians, not equal.
    np.testing.assert_allclose(shift[:3], -np.log(median), atol=0.02)
    assert shift[:3].max() - shift[:3].min() > 0.05  # the largest and smallest differ
    assert shift[3] == pytest.approx(shift[:3].max())


# --- a removed method is refused with why, not as unknown --------------------------------------

REMOVED = (
    "em-prior was removed in this release: its plain EM prior collapses on some data "
    "(demo: -2.7 mIoU); use em-map (EM with a Dirichlet prior)"
)


def stats_args(case) -> list[object]:
    return ["--stats", case["tgt_stats"], "--anchors", case["src_stats"]]


@pytest.mark.parametrize("command", ["correct", "relabel", "evaluate"])
def test_method_em_prior_is_a_usage_error_that_says_why(case, tmp_path, command):
    out = tmp_path / "out"
    where = [] if command == "evaluate" else ["--out-dir", out]
    result = run(command, case["tgt"], *stats_args(case), "--method", "em-prior", *where,
                 ok=False)  # fmt: skip
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: --method {REMOVED}"], result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_compare_methods_em_prior_is_a_usage_error_that_says_why(case, tmp_path):
    result = run("compare", case["tgt"], *stats_args(case), "--methods", "blda,em-prior",
                 "--json", tmp_path / "c.json", ok=False)  # fmt: skip
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: --methods {REMOVED}"], result.stderr
    assert not (tmp_path / "c.json").exists()


def test_a_report_naming_em_prior_is_refused_naming_the_file(case, tmp_path):
    import json

    report = tmp_path / "c.json"
    run("compare", case["tgt"], *stats_args(case), "--methods", "blda", "--tau", "0.2",
        "--json", report)  # fmt: skip
    data = json.loads(report.read_text())
    data["selected"]["method"] = "em-prior"
    report.write_text(json.dumps(data))
    out = tmp_path / "pred"
    result = run("correct", case["tgt"], "--from-compare", report, "--out-dir", out, ok=False)
    assert result.exit_code == 1, result.output
    assert result.stderr == f"error: {report}: selected.method: {REMOVED}\n"
    assert not out.exists()


def test_shards_naming_em_prior_are_refused_by_merge(case, tmp_path):
    import json

    for k in (1, 2):
        run("compare", case["tgt"], *stats_args(case), "--methods", "blda", "--tau", "0.2",
            "--shard", f"{k}/2", "--json", tmp_path / "c.json")  # fmt: skip
    parts = sorted(tmp_path.glob("c-*-of-2.json"))
    assert len(parts) == 2
    for part in parts:
        data = json.loads(part.read_text())
        assert data["partial"]["rows"][1]["method"] == "blda"
        data["partial"]["rows"][1]["method"] = "em-prior"
        part.write_text(json.dumps(data))
    result = run("compare", "--merge", *parts, "--json", tmp_path / "all.json", ok=False)
    assert result.exit_code == 1, result.output
    assert result.stderr == f"error: {parts[0]}: partial.rows[1].method: {REMOVED}\n"


def test_api_load_refuses_em_prior_with_why(case):
    from blda_posthoc import api
    from blda_posthoc.errors import InputError

    with pytest.raises(InputError) as caught:
        api.load(
            "em-prior", stats=read_stats(case["tgt_stats"]), anchors=read_stats(case["src_stats"])
        )
    assert str(caught.value) == f"method {REMOVED}"
    with LogitStore([case["tgt"]]) as store:
        spec = CorrectionSpec("em-prior", None, False, case["tgt_stats"], case["src_stats"])
        with pytest.raises(InputError, match="--method em-prior was removed in this release"):
            load_correction(spec, store.class_names)
