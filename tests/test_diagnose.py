"""``blda diagnose``: label-free score, verdict rule with labels, CLI end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_labels, make_logits

from blda_posthoc.cli import main
from blda_posthoc.core.diagnose import (
    SCORE_THRESHOLD,
    balanced_anchor,
    positive_dominance,
    spearman,
)
from blda_posthoc.io.stats import write_stats
from blda_posthoc.io.store import LogitStore, StoreWriter
from blda_posthoc.pipelines.fit_stats import FitOptions, fit_store

C = 5
NAMES = ["road", "wall", "pole", "sky", "car"]
FORMATS = Path(__file__).resolve().parents[1] / "docs" / "formats.md"


def format_section(title: str) -> str:
    """The section of docs/formats.md whose heading starts with ``title``."""
    text = FORMATS.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def write_store(path: Path, bias: np.ndarray, labels: bool, seed: int = 3) -> None:
    rng = np.random.default_rng(seed)
    with StoreWriter(path, NAMES, dtype="float32") as writer:
        for i in range(5):
            label = make_labels(rng, C, 32, 40)
            logits = make_logits(rng, label, C, bias)
            writer.write(f"img_{i}", logits, label if labels else None)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diagnose")
    bias = np.array([-1.5, -0.6, 0.0, 0.7, 1.5], dtype=np.float32)
    write_store(root / "labelled.h5", bias, labels=True)
    write_store(root / "unlabelled.h5", bias, labels=False)
    # class 2 can never win: its logit is pushed far down
    write_store(root / "never.h5", np.array([0, 0, -30, 0, 0], np.float32), labels=False)
    return {"root": root, **{k: root / f"{k}.h5" for k in ("labelled", "unlabelled", "never")}}


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["diagnose", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def diagnose_json(tmp_path: Path, *args: object) -> dict:
    out = tmp_path / "d.json"
    code, stdout, stderr = run(*args, "--json", out)
    assert code == 0, stderr
    assert "verdict" in stdout
    return json.loads(out.read_text())


def argmax_and_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with LogitStore([path]) as store:
        recs = [store.read(n) for n in store.names]
    pred = np.concatenate([r.logits.argmax(0).ravel() for r in recs])
    label = np.concatenate([r.label.ravel() for r in recs])
    return pred, label


def test_labelled_verdicts_follow_the_ratio_rule(stores, tmp_path):
    report = diagnose_json(tmp_path, stores["labelled"])
    pred, label = argmax_and_labels(stores["labelled"])
    valid = label != 255
    predicted = np.bincount(pred[valid], minlength=C)
    labelled = np.bincount(label[valid], minlength=C)
    rates = np.zeros((C, C))
    for c in range(C):
        rates[c] = np.bincount(pred[valid & (label == c)], minlength=C) / labelled[c]
    bias = 100 * (rates.sum(0) / C - 1 / C)
    verdicts = set()
    for k, name in enumerate(NAMES):
        entry = report["per_class"][name]
        ratio = predicted[k] / labelled[k]
        assert entry["pred_true_ratio"] == pytest.approx(ratio, abs=1e-5)
        assert entry["bias"] == pytest.approx(bias[k], abs=1e-4)
        assert entry["pred_share"] == pytest.approx(np.mean(pred == k), abs=1e-6)
        assert entry["decided_by"] == "labels"
        expected = (
            "under-predicted" if ratio < 0.7 else "over-predicted" if ratio > 1.3 else "balanced"
        )
        assert entry["verdict"] == expected
        verdicts.add(expected)
    assert {"under-predicted", "over-predicted"} <= verdicts  # the case exercises both sides
    assert report["has_labels"] is True
    scores = np.array([report["per_class"][n]["score"] for n in NAMES])
    rank_diff = np.argsort(np.argsort(scores)) - np.argsort(np.argsort(bias))
    rho = 1 - 6 * (rank_diff**2).sum() / (C * (C * C - 1))
    assert report["rank_correlation"] == pytest.approx(rho, abs=1e-6)
    assert report["statistics"]["labels"] == "pseudo" and report["statistics"]["path"] is None


def test_unlabelled_verdicts_follow_the_score(stores, tmp_path):
    report = diagnose_json(tmp_path, stores["unlabelled"])
    assert report["has_labels"] is False and report["rank_correlation"] is None
    scores = []
    for entry in report["per_class"].values():
        assert entry["bias"] is None and entry["pred_true_ratio"] is None
        s = entry["score"]
        scores.append(s)
        expected = (
            "over-predicted"
            if s >= SCORE_THRESHOLD
            else "under-predicted"
            if s <= -SCORE_THRESHOLD
            else "balanced"
        )
        assert entry["verdict"] == expected and entry["decided_by"] == "label-free"
    assert abs(sum(scores)) < 0.1  # scores against the class-balanced anchor are centred


def test_never_predicted_class_is_flagged_with_null_score(stores, tmp_path):
    report = diagnose_json(tmp_path, stores["never"])
    entry = report["per_class"]["pole"]
    assert entry["never_predicted"] is True and entry["pred_share"] == 0.0
    assert entry["score"] is None and entry["verdict"] == "unknown"
    assert entry["decided_by"] is None
    assert not report["per_class"]["road"]["never_predicted"]


def test_stats_option_uses_the_given_file_and_checks_class_names(stores, tmp_path):
    with LogitStore([stores["labelled"]]) as store:
        stats = fit_store(store, FitOptions(labels="gt"))
    write_stats(tmp_path / "gt.h5", stats)
    report = diagnose_json(tmp_path, stores["unlabelled"], "--stats", tmp_path / "gt.h5")
    assert report["statistics"]["fingerprint"] == stats.fingerprint
    assert report["statistics"]["labels"] == "gt"
    other = tmp_path / "other.h5"
    with StoreWriter(other, ["a", "b", "c", "d", "e"]) as w:
        w.write("x", np.zeros((C, 4, 4), np.float32))
    with LogitStore([other]) as store:
        write_stats(tmp_path / "o.h5", fit_store(store, FitOptions(labels="pseudo")))
    code, _, err = run(stores["unlabelled"], "--stats", tmp_path / "o.h5")
    assert code == 1 and err.startswith("error:") and "class names" in err
    assert err.count("\n") == 1


def test_json_refuses_overwrite_and_plot_is_written(stores, tmp_path):
    (tmp_path / "d.json").write_text("{}")
    code, _, err = run(stores["never"], "--json", tmp_path / "d.json")
    assert code == 1 and "already exists" in err and err.count("\n") == 1
    code, _, err = run(stores["never"], "--plot", tmp_path / "d.png")
    assert code == 0, err
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_is_a_clear_error(stores, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run(stores["never"], "--plot", tmp_path / "p.png")
    assert code == 1 and err.startswith("error:") and "matplotlib" in err
    assert not (tmp_path / "p.png").exists()


def test_positive_dominance_matches_pairwise_counting():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 12, size=(3, 200))  # bin indices of three classes
    y = rng.integers(2, 14, size=300)
    cells = np.stack([np.bincount(r, minlength=16) for r in x])
    anchor = np.bincount(y, minlength=16)
    ours = positive_dominance(cells, anchor)
    for k in range(3):
        diff = np.sign(x[k][:, None] - y[None, :])
        assert ours[k] == pytest.approx(diff.mean(), abs=1e-12)
    assert np.isnan(positive_dominance(np.zeros((1, 16)), anchor))[0]


def test_balanced_anchor_scores_sum_to_zero():
    rng = np.random.default_rng(1)
    cells = np.stack(
        [np.bincount(rng.integers(k, 10 + k, 50 * (k + 1)), minlength=20) for k in range(4)]
    )
    scores = positive_dominance(cells, balanced_anchor(cells))
    assert abs(scores.sum()) < 1e-12
    assert (np.diff(scores) > 0).all()  # shifted further right, larger score


def test_spearman_matches_the_textbook_formula():
    x = np.array([3.0, 1.0, 4.0, 1.5, 5.0, 9.0])
    y = np.array([2.0, 7.0, 1.0, 8.0, 2.5, 8.5])
    d = np.argsort(np.argsort(x)) - np.argsort(np.argsort(y))
    n = x.size
    assert spearman(x, y) == pytest.approx(1 - 6 * (d**2).sum() / (n * (n * n - 1)))
    assert spearman(np.array([1.0, 2.0, 2.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(
        np.corrcoef([1, 2.5, 2.5], [1, 2, 3])[0, 1]
    )
    assert spearman(np.array([1.0, 2.0]), np.array([2.0, 1.0])) is None
    assert spearman(np.ones(4), np.arange(4.0)) is None


def test_estimated_verdict_needs_the_ratio_and_the_score_to_agree():
    from blda_posthoc.core.diagnose import UNCERTAIN, estimate_verdict

    assert estimate_verdict(2.0, 0.4) == "over-predicted"
    assert estimate_verdict(0.3, -0.4) == "under-predicted"
    assert estimate_verdict(1.0, 0.0) == "balanced"
    assert estimate_verdict(2.0, -0.4) == UNCERTAIN  # they disagree
    assert estimate_verdict(1.0, 0.4) == UNCERTAIN  # balanced by ratio, over by score
    assert estimate_verdict(0.72, -0.4) == UNCERTAIN  # within 10 % of the 0.7 cut
    assert estimate_verdict(1.35, 0.4) == UNCERTAIN  # within 10 % of the 1.3 cut
    assert estimate_verdict(None, 0.4) == "over-predicted"  # no estimate: the score alone


def test_anchors_give_estimated_ratios_and_label_free_verdicts(stores, tmp_path):
    with LogitStore([stores["labelled"]]) as store:
        write_stats(tmp_path / "src.h5", fit_store(store, FitOptions(labels="gt")))
        write_stats(tmp_path / "tgt.h5", fit_store(store, FitOptions(labels="pseudo")))
    report = diagnose_json(
        tmp_path,
        stores["labelled"],
        "--stats",
        tmp_path / "tgt.h5",
        "--anchors",
        tmp_path / "src.h5",
    )
    entries = report["per_class"].values()
    assert all(e["decided_by"] == "labels" for e in entries if e["verdict"] != "unknown")
    assert any(e["estimated_ratio"] is not None for e in entries)
    for e in entries:
        assert e["label_free_verdict"] in (
            "over-predicted",
            "under-predicted",
            "balanced",
            "uncertain",
            "unknown",
        )
    # docs/formats.md documents every key of the report.
    documented = format_section("Diagnose report")
    for key in (*report, *next(iter(entries))):
        assert f'"{key}"' in documented, f"docs/formats.md: diagnose key {key!r} undocumented"
    code, _, err = run(stores["labelled"], "--anchors", tmp_path / "src.h5")
    assert code == 2 and "--anchors needs --stats" in err
    code, _, err = run(
        stores["labelled"], "--stats", tmp_path / "tgt.h5", "--anchors", tmp_path / "tgt.h5"
    )
    assert code == 1 and err.startswith("error:") and "calibration" in err
