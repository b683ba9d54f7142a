"""``compare`` and ``evaluate``: how far to trust a gain (intervals, metric, class loss)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fitted_case

from blda_posthoc.cli import main
from blda_posthoc.core.bootstrap import includes_zero, paired_bootstrap
from blda_posthoc.pipelines.compare import grid_edge


def run(*args: object, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output + str(result.exception)
    return result


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """Source and target stores with their statistics (see conftest.fitted_case)."""
    return fitted_case(tmp_path_factory.mktemp("intervals"), tgt_images=12, dtype="float16")


def run_on_case(command: str, case, out: Path, *extra: object, code: int = 0):
    """``blda COMMAND`` on the case's target store with its statistics, JSON to ``out``."""
    args = ("--stats", case["tgt_stats"], "--anchors", case["src_stats"], "--json", out)
    return run(command, case["tgt"], *args, *extra, code=code)


compare = functools.partial(run_on_case, "compare")
evaluate = functools.partial(run_on_case, "evaluate")


def report_names(parts: list[dict]) -> list[str]:
    return [n for part in parts for n in part["partial"]["names"]]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def per_image(parts: list[dict], names: list[str]) -> list[np.ndarray]:
    """Each row's ``(I, 3, C)`` counts of ``names``, gathered from shards' partial blocks."""
    counts: dict[tuple[int, str], list[list[int]]] = {}
    for part in parts:
        for i, row in enumerate(part["partial"]["rows"]):
            counts.update(
                ((i, n), c) for n, c in zip(part["partial"]["names"], row["images"], strict=True)
            )
    rows = len(parts[0]["partial"]["rows"])
    return [np.asarray([counts[i, n] for n in names]) for i in range(rows)]


@pytest.mark.parametrize("select", [[], ["--select-on", "4"]])
def test_every_row_has_its_paired_interval(case, tmp_path, select):
    args = ["--methods", "blda,calibrated-blda,cbst", "--tau", "0.2,1", "--seed", "3", *select]
    result = compare(case, tmp_path / "c.json", *args)
    report = load(tmp_path / "c.json")
    assert report["settings"]["bootstrap"] == 1000 and report["settings"]["metric"] == "miou"
    none = report["rows"][0]
    assert none["gain"] == 0 and none["gain_ci95"] == [0, 0]
    for row in report["rows"]:
        lo, hi = row["gain_ci95"]
        assert lo <= row["gain"] <= hi, row
        assert row["gain"] == pytest.approx(row["miou"] - none["miou"], abs=2e-4)
        assert row["excluded"] is None
    assert "95% interval" in result.stdout
    # The same intervals from the per-image counts a one-shard run writes, on the held-out
    # images when a split is drawn (where the figures come from).
    for k in (1, 2):
        compare(case, tmp_path / "s.json", *args, "--shard", f"{k}/2")
    parts = [load(tmp_path / f"s-{k}-of-2.json") for k in (1, 2)]
    names = report["split"]["held_out"] if select else sorted(report_names(parts))
    counts = per_image(parts, names)
    for row, mine in zip(report["rows"], counts, strict=True):
        want = paired_bootstrap(mine, counts[0], n=1000, seed=3)
        assert want is not None
        np.testing.assert_allclose(row["gain_ci95"], want, atol=1e-4)
    assert report["selected"]["gain_ci95"] == next(
        r["gain_ci95"]
        for r in report["rows"]
        if (r["method"], r["tau"], r["auto"])
        == tuple(report["selected"][k] for k in ("method", "tau", "auto"))
    )


def test_bootstrap_zero_is_off_and_the_seed_is_kept(case, tmp_path):
    result = compare(case, tmp_path / "c.json", "--methods", "bias", "--bootstrap", "0")
    report = load(tmp_path / "c.json")
    assert all(r["gain_ci95"] is None for r in report["rows"])
    assert report["selected"]["gain_ci95"] is None and report["settings"]["bootstrap"] == 0
    assert "95% interval" not in result.stderr and "includes 0" not in result.stderr
    compare(case, tmp_path / "a.json", "--methods", "bias", "--bootstrap", "300", "--seed", "1")
    compare(case, tmp_path / "b.json", "--methods", "bias", "--bootstrap", "300", "--seed", "1")
    assert load(tmp_path / "a.json") == load(tmp_path / "b.json")


def test_a_selection_whose_interval_includes_zero_says_so(case, tmp_path):
    # cbst at tau 1 gains a little on 4 selection images; on the 8 others its gain is noise.
    weak = compare(case, tmp_path / "w.json", "--methods", "cbst", "--tau", "1", "--select-on", "4")
    report = load(tmp_path / "w.json")
    assert report["selected"]["method"] == "cbst"
    assert includes_zero(report["selected"]["gain_ci95"])
    assert "95% interval of this gain includes 0: on these 8 images" in weak.stderr
    strong = compare(case, tmp_path / "s.json", "--methods", "bias", "--select-on", "4")
    chosen = load(tmp_path / "s.json")["selected"]
    assert chosen["method"] == "bias" and chosen["gain_ci95"][0] > 0
    assert "includes 0" not in strong.stderr and "95% interval [+" in strong.stderr


def test_metric_decides_the_selection(case, tmp_path):
    compare(case, tmp_path / "m.json", "--tau", "0.2,1", "--metric", "macc")
    report = load(tmp_path / "m.json")
    assert report["settings"]["metric"] == "macc" and report["selected"]["metric"] == "macc"
    none = report["rows"][0]
    best = max(report["rows"], key=lambda r: r["macc"])
    assert report["selected"]["macc"] == best["macc"] > none["macc"]
    for row in report["rows"]:
        assert row["gain"] == pytest.approx(row["macc"] - none["macc"], abs=2e-4)
        assert row["gain_ci95"][0] <= row["gain"] <= row["gain_ci95"][1]
    assert report["selected"]["gain_over_none"] == best["gain"]


def test_max_class_loss_drops_rows_that_cost_a_class(case, tmp_path):
    result = compare(case, tmp_path / "l.json", "--tau", "0.2,0.5,1", "--max-class-loss", "5")
    report = load(tmp_path / "l.json")
    assert report["settings"]["max_class_loss"] == 5
    none = report["rows"][0]["per_class"]
    excluded = 0
    for row in report["rows"][1:]:
        losses = {
            name: none[name]["iou"] - v["iou"]
            for name, v in row["per_class"].items()
            if v["iou"] is not None and none[name]["iou"] is not None
        }
        worst = max(losses, key=losses.__getitem__)
        if losses[worst] > 5 + 1e-3:
            assert row["excluded"]["class"] == worst, row
            assert row["excluded"]["iou_loss"] == pytest.approx(losses[worst], abs=1e-3)
            assert "more than 5" in row["excluded"]["reason"]
            excluded += 1
        elif losses[worst] < 5 - 1e-3:
            assert row["excluded"] is None, row
    assert excluded >= 1  # em-map at tau 0.5 and 1 costs class_1 more than 5 points here
    chosen = report["selected"]
    row = next(
        r for r in report["rows"] if (r["method"], r["tau"]) == (chosen["method"], chosen["tau"])
    )
    assert row["excluded"] is None
    assert f"--max-class-loss 5: {excluded} row(s) left out" in result.stderr
    assert "\nx " in result.stdout
    # Without it (the default) no row is left out.
    compare(case, tmp_path / "d.json", "--tau", "0.2,0.5,1")
    default = load(tmp_path / "d.json")
    assert default["settings"]["max_class_loss"] is None
    assert all(r["excluded"] is None for r in default["rows"])


def test_a_strength_at_the_edge_of_the_grid_is_flagged():
    rows = [
        {"method": "none", "tau": None, "auto": False},
        *({"method": "blda", "tau": t, "auto": False} for t in (0.2, 0.5, 1.0)),
        {"method": "blda", "tau": 0.35, "auto": True},
        {"method": "bias", "tau": None, "auto": False},
    ]
    assert grid_edge(rows, rows[3]) == {"side": "top", "next_tau": 2.0}
    assert grid_edge(rows, rows[1]) == {"side": "bottom", "next_tau": 0.1}
    assert grid_edge(rows, rows[2]) is None
    assert grid_edge(rows, rows[4]) is None  # --tau auto has its own grid
    assert grid_edge(rows, rows[5]) is None and grid_edge(rows, rows[0]) is None


def test_edge_in_the_report_and_summary(case, tmp_path):
    result = compare(case, tmp_path / "e.json", "--methods", "logit-adjust", "--tau", "0.5,1")
    chosen = load(tmp_path / "e.json")["selected"]
    assert chosen["method"] == "logit-adjust" and not chosen["auto"]
    side = "top" if chosen["tau"] == 1 else "bottom"
    assert chosen["edge"] == {"side": side, "next_tau": 2 if side == "top" else 0.25}
    assert f"try --tau {chosen['edge']['next_tau']:g} too" in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--bootstrap", "-1"], "--bootstrap"),
        (["--bootstrap", "many"], "--bootstrap"),
        (["--metric", "pixel_acc"], "--metric"),
        (["--max-class-loss", "-2"], "--max-class-loss"),
    ],
)
def test_bad_values_are_usage_errors(case, tmp_path, args, fragment):
    result = compare(case, tmp_path / "x.json", *args, code=2)
    assert fragment in result.output and not (tmp_path / "x.json").exists()


def test_shards_merged_give_the_intervals_of_one_pass(case, tmp_path):
    args = ["--methods", "blda,bias", "--tau", "0.5", "--select-on", "5", "--metric", "macc"]
    compare(case, tmp_path / "one.json", *args, "--bootstrap", "200", "--seed", "2")
    expected = load(tmp_path / "one.json")
    assert all(r["gain_ci95"] is not None for r in expected["rows"])
    for k in (1, 2):
        compare(
            case,
            tmp_path / "c.json",
            *args,
            "--bootstrap",
            "200",
            "--seed",
            "2",
            "--shard",
            f"{k}/2",
        )
    parts = [tmp_path / f"c-{k}-of-2.json" for k in (1, 2)]
    run("compare", "--merge", *parts, "--json", tmp_path / "all.json")
    assert load(tmp_path / "all.json") == expected
    # The merge takes the shards' settings: giving them again is a usage error.
    again = run(
        "compare", "--merge", *parts, "--json", tmp_path / "y.json", "--bootstrap", "5", code=2
    )
    assert "--bootstrap" in again.output and "shards" in again.output
    # Per-image counts that do not add up to the row's totals are refused.
    damaged = load(parts[0])
    damaged["partial"]["rows"][1]["images"][0][0][0] += 1
    broken = tmp_path / "broken" / parts[0].name
    broken.parent.mkdir()
    broken.write_text(json.dumps(damaged))
    refused = run("compare", "--merge", broken, parts[1], "--json", tmp_path / "z.json", code=1)
    assert "row 1 images do not add up" in refused.output
    assert not (tmp_path / "z.json").exists()


def test_evaluate_before_after_has_the_interval_compare_gives(case, tmp_path):
    result = evaluate(
        case, tmp_path / "e.json", "--method", "bias", "--tau", "1", "--markdown", tmp_path / "e.md"
    )
    report = load(tmp_path / "e.json")
    lo, hi = report["gain_ci95"]
    assert lo - 2e-4 <= report["delta"]["miou"] <= hi + 2e-4 and lo > 0
    assert report["settings"]["bootstrap"] == 1000 and report["settings"]["seed"] == 0
    assert "mIoU gain 95%" in result.stdout and "includes 0" not in result.stderr
    assert "mIoU gain 95%" in (tmp_path / "e.md").read_text()
    # The same images, resamples and seed as compare's row of the same correction.
    compare(case, tmp_path / "c.json", "--methods", "bias", "--tau", "1")
    row = load(tmp_path / "c.json")["rows"][1]
    assert row["method"] == "bias" and row["gain_ci95"] == report["gain_ci95"]
    # Another seed, other resamples; --bootstrap 0 turns it off.
    evaluate(case, tmp_path / "s.json", "--method", "bias", "--tau", "1", "--seed", "7")
    assert load(tmp_path / "s.json")["gain_ci95"] != report["gain_ci95"]
    off = evaluate(case, tmp_path / "o.json", "--method", "bias", "--tau", "1", "--bootstrap", "0")
    assert load(tmp_path / "o.json")["gain_ci95"] is None
    assert "mIoU gain 95%" not in off.stdout


def test_evaluate_says_when_the_interval_includes_zero(case, tmp_path):
    result = evaluate(case, tmp_path / "w.json", "--method", "cbst", "--tau", "0.2")
    report = load(tmp_path / "w.json")
    assert includes_zero(report["gain_ci95"]), report["gain_ci95"]
    assert "95% interval of the mIoU gain includes 0: on these 12 images" in result.stderr


def test_evaluate_bootstrap_usage_errors(case, tmp_path):
    plain = run("evaluate", case["tgt"], "--bootstrap", "10", code=2)
    assert "--bootstrap" in plain.output and "--stats" in plain.output
    bad = evaluate(case, tmp_path / "x.json", "--method", "bias", "--bootstrap", "-3", code=2)
    assert "--bootstrap" in bad.output and not (tmp_path / "x.json").exists()
    run("evaluate", case["tgt"], "--json", tmp_path / "p.json")
    assert "gain_ci95" not in load(tmp_path / "p.json")  # no correction, no gain
    for k in (1, 2):
        evaluate(case, tmp_path / "s.json", "--method", "bias", "--shard", f"{k}/2")
    parts = [tmp_path / f"s-{k}-of-2.json" for k in (1, 2)]
    again = run("evaluate", "--merge", *parts, "--seed", "3", code=2)
    assert "--seed" in again.output and "shards" in again.output
    merged = run("evaluate", "--merge", *parts, "--json", tmp_path / "m.json")
    evaluate(case, tmp_path / "one.json", "--method", "bias")
    assert load(tmp_path / "m.json") == load(tmp_path / "one.json")
    assert "mIoU gain 95%" in merged.stdout


def test_bootstrap_over_the_memory_budget_is_turned_off_with_a_warning(case, tmp_path, monkeypatch):
    import blda_posthoc.pipelines.compare as command  # the command imports it when it runs

    # 2 rows x 12 images x 3 x 5 classes x 8 bytes = 2880 bytes of per-image counts.
    monkeypatch.setattr(command, "BOOTSTRAP_MEMORY", 2000)
    result = compare(case, tmp_path / "m.json", "--methods", "bias", "--tau", "1")
    report = load(tmp_path / "m.json")
    assert "--bootstrap turned off: the per-image counts of 2 rows x 12 images" in result.stderr
    assert report["settings"]["bootstrap"] == 0
    assert all(r["gain_ci95"] is None for r in report["rows"])
    monkeypatch.setattr(command, "BOOTSTRAP_MEMORY", 2880)  # just fits
    compare(case, tmp_path / "k.json", "--methods", "bias", "--tau", "1")
    assert load(tmp_path / "k.json")["rows"][1]["gain_ci95"] is not None
