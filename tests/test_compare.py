"""``blda compare`` end to end: rows equal separate runs, one pass, honest selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import fitted_case

from blda_posthoc.cli import main
from blda_posthoc.core.defaults import COMPARE_DEFAULT
from blda_posthoc.io.store import LogitStore
from blda_posthoc.pipelines.compare import select_row


def run(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result


def assert_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """Source and target stores with their statistics (see conftest.fitted_case)."""
    return fitted_case(tmp_path_factory.mktemp("compare"), tgt_images=12, dtype="float16")


def compare(case, out: Path, *extra) -> dict:
    result = run(
        "compare",
        case["tgt"],
        "--stats",
        case["tgt_stats"],
        "--anchors",
        case["src_stats"],
        "--tau",
        "0.2,0.5,1",
        "--json",
        out,
        *extra,
    )
    assert "figures on" in result.stdout and "*" in result.stdout
    return json.loads(out.read_text())


def test_rows_equal_separate_evaluate_runs(case, tmp_path):
    named = {
        "none",
        "blda",
        "calibrated-blda",
        "filled-blda",
        "temperature",
        "vector-scaling",
        "bias",
        "cbst",
        "em-map",
        "ot-prior",
        "self-calibrate",
        "logit-adjust",
    }
    report = compare(case, tmp_path / "c.json", "--methods", ",".join(sorted(named)))
    assert report["format"] == "blda-compare" and report["version"] == 1
    assert report["rows"][0]["method"] == "none" and report["rows"][0]["tau"] is None
    assert {r["method"] for r in report["rows"]} == named
    assert report["skipped_methods"] == {}
    checked = 0
    for row in report["rows"]:
        if row["method"] == "none" or (row["tau"] not in (None, 0.5) and not row["auto"]):
            continue
        out = tmp_path / f"e{checked}.json"
        tau = [] if row["tau"] is None else ["--tau", f"{row['tau']}"]
        run(
            "evaluate",
            case["tgt"],
            "--method",
            row["method"],
            *tau,
            "--stats",
            case["tgt_stats"],
            "--anchors",
            case["src_stats"],
            "--json",
            out,
        )
        after = json.loads(out.read_text())["after"]
        assert after["miou"] == row["miou"], row
        assert after["per_class"]["class_1"]["iou"] == row["per_class"]["class_1"]["iou"]
        checked += 1
    assert checked >= 10
    plain = tmp_path / "plain.json"
    run("evaluate", case["tgt"], "--json", plain)
    assert json.loads(plain.read_text())["miou"] == report["rows"][0]["miou"]


def test_one_pass_over_the_images(case, tmp_path, monkeypatch):
    reads: list[str] = []
    original = LogitStore.read

    def counting(self, name, *, with_label=True):
        reads.append(name)
        return original(self, name, with_label=with_label)

    monkeypatch.setattr(LogitStore, "read", counting)
    report = compare(case, tmp_path / "c.json")
    assert len(report["rows"]) > 15
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 12


def test_select_on_reports_held_out_figures(case, tmp_path):
    report = compare(case, tmp_path / "c.json", "--select-on", "4", "--seed", "3")
    split = report["split"]
    assert len(split["select"]) == 4 and len(split["held_out"]) == 8
    assert not set(split["select"]) & set(split["held_out"])
    assert report["evaluated_on"] == "held-out images"
    selected = report["selected"]
    row = next(
        r
        for r in report["rows"]
        if (r["method"], r["tau"], r["auto"])
        == (selected["method"], selected["tau"], selected["auto"])
    )
    assert selected["miou"] == row["miou"]
    none = report["rows"][0]
    assert selected["method"] == "none" or row["selection_miou"] > none["selection_miou"]
    best_select = max(r["selection_miou"] for r in report["rows"])
    assert row["selection_miou"] == best_select or selected["method"] == "none"
    # The held-out figures equal an evaluation of the held-out images alone.
    labels = tmp_path / "held_labels"
    for name in split["held_out"]:
        src = case["labels"] / f"{name}.png"
        dst = labels / f"{name}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    out = tmp_path / "held.json"
    run("evaluate", case["tgt"], "--labels", labels, "--allow-missing", "--json", out)
    assert json.loads(out.read_text())["miou"] == none["miou"]
    # docs/formats.md documents every key of the report, its rows, selection and tau_auto.
    text = (Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text()
    start = text.index("## Compare report")
    documented = text[start : text.index("\n## ", start + 1)]
    assert report["tau_auto"]
    keys = [*report, *report["rows"][0], *selected, *next(iter(report["tau_auto"].values()))]
    for key in keys:
        assert f'"{key}"' in documented or f"`{key}`" in documented, f"compare key {key!r}"
    # The same seed gives the same split; another seed another one.
    again = compare(case, tmp_path / "c2.json", "--select-on", "0.33", "--seed", "3")
    assert again["split"] == split
    other = compare(case, tmp_path / "c3.json", "--select-on", "4", "--seed", "4")
    assert other["split"] != split


def test_from_compare_applies_the_selection(case, tmp_path):
    report = compare(case, tmp_path / "c.json", "--select-on", "4", "--plot", tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    # Without --methods: the default grid (the benchmark's winners and the defaults).
    assert [*dict.fromkeys(r["method"] for r in report["rows"])] == list(COMPARE_DEFAULT)
    out = tmp_path / "pred"
    run("correct", case["tgt"], "--from-compare", tmp_path / "c.json", "--out-dir", out)
    settings = json.loads((out / "correct.json").read_text())["settings"]
    assert settings["method"] == report["selected"]["method"]
    assert settings["tau"] == report["selected"]["tau"]
    assert settings["stats"] == str(case["tgt_stats"])
    usage = run(
        "correct",
        case["tgt"],
        "--from-compare",
        tmp_path / "c.json",
        "--tau",
        "0.1",
        "--out-dir",
        tmp_path / "p2",
        ok=False,
    )
    assert usage.exit_code == 2 and "--from-compare" in usage.stderr


@pytest.mark.parametrize(
    ("where", "value", "fragment"),
    [
        ("selected.tau", -5, "selected.tau: -5 is below 0"),
        ("selected.tau", True, "selected.tau: must be a number, not a boolean"),
        ("selected.tau", "0.5", "selected.tau: must be a number, not a string"),
        ("selected.tau", 1e400, "not JSON"),  # json.dumps writes Infinity
        ("selected.tau", float("nan"), "not JSON"),  # json.dumps writes NaN
        ("selected.method", "rm -rf", 'selected.method: "rm -rf" is not one of'),
        ("version", "2", "version must be an integer, not a string"),
        ("settings.stats", 3, "settings.stats: must be a string"),
        ("settings.stats_fingerprint", ["x"], "settings.stats_fingerprint: must be a string"),
    ],
)
def test_from_compare_refuses_a_forged_report(case, tmp_path, where, value, fragment):
    """``selected``, the version and the recorded statistics are checked before any work."""
    compare(case, tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    node = data
    *head, last = where.split(".")
    for key in head:
        node = node[key]
    node[last] = value
    if where == "selected.tau":  # a method with a strength, so that tau is used
        data["selected"]["method"] = "blda"
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(data))
    out = tmp_path / "pred"
    result = run("correct", case["tgt"], "--from-compare", forged, "--out-dir", out, ok=False)
    assert_error(result, "forged.json", fragment)
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "pred.partial").exists()


def test_from_compare_checks_fingerprints_and_resolves_paths_beside_the_report(
    case, tmp_path, monkeypatch
):
    """Recorded statistics are found relative to the report; refitted ones are refused."""
    compare(case, tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    assert Path(data["settings"]["stats"]).is_absolute()  # compare records absolute paths
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "t.h5").write_bytes(case["tgt_stats"].read_bytes())
    (moved / "s.h5").write_bytes(case["src_stats"].read_bytes())
    data["settings"].update(stats="t.h5", anchors="s.h5")
    data["selected"].update(method="blda", tau=0.5)
    (moved / "c.json").write_text(json.dumps(data))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the report's folder, not the working directory
    run("correct", case["tgt"], "--from-compare", moved / "c.json", "--out-dir", tmp_path / "ok")
    settings = json.loads((tmp_path / "ok" / "correct.json").read_text())["settings"]
    assert settings["stats"] == str(moved / "t.h5") and settings["tau"] == 0.5
    # Statistics refitted (here: replaced) after compare chose are refused, naming both.
    (moved / "t.h5").write_bytes(case["src_stats"].read_bytes())
    out = tmp_path / "refused"
    result = run(
        "correct", case["tgt"], "--from-compare", moved / "c.json", "--out-dir", out, ok=False
    )
    recorded = data["settings"]["stats_fingerprint"]
    assert_error(result, "t.h5: fingerprint", f"differs from {recorded} recorded in")
    assert not out.exists()
    # Given explicitly, --stats is the user's choice: not held to the report's fingerprint.
    run(
        "correct",
        case["tgt"],
        "--from-compare",
        moved / "c.json",
        "--stats",
        case["tgt_stats"],
        "--anchors",
        case["src_stats"],
        "--out-dir",
        tmp_path / "explicit",
    )


def test_compare_errors(case, tmp_path):
    out = tmp_path / "c.json"
    base = ["compare", case["tgt"], "--stats", case["tgt_stats"], "--json", out]
    assert run(*base, "--select-on", "0", ok=False).exit_code == 2
    assert run(*base, "--select-on", "2.5", ok=False).exit_code == 2
    assert_error(run(*base, "--select-on", "12", ok=False), "no held-out image")
    unknown = run(*base, "--methods", "blda,magic", ok=False)  # a usage error (exit 2)
    assert unknown.exit_code == 2 and "unknown magic" in unknown.output
    assert_error(run(*base, "--tau", "0.2,nan", ok=False), "nan")
    assert_error(
        run("compare", case["tgt"], "--stats", tmp_path / "none.h5", "--json", out, ok=False),
        "none.h5",
    )
    usage = run("compare", case["tgt"], "--json", out, ok=False)
    assert usage.exit_code == 2 and "--stats" in usage.stderr
    assert not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert_error(
        run("correct", case["tgt"], "--from-compare", bad, "--out-dir", tmp_path / "p", ok=False),
        "bad.json",
    )


def test_methods_the_statistics_cannot_support_are_left_out_with_a_reason(case, tmp_path):
    out = tmp_path / "c.json"
    # Target statistics alone: no calibration, so the calibration methods are left out.
    result = run(
        "compare", case["tgt"], "--stats", case["tgt_stats"], "--tau", "0.5", "--json", out,
        "--methods", "all,vector-scaling,logit-adjust",
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert "vector-scaling" in report["skipped_methods"]
    assert "vector-scaling left out" in result.stderr
    assert {r["method"] for r in report["rows"]} >= {"none", "blda", "cbst", "logit-adjust"}


def test_option_errors_on_correct(case, tmp_path):
    out = tmp_path / "p"
    for bad in ("nan", "-1", "inf", "x"):
        result = run(
            "correct",
            case["tgt"],
            "--stats",
            case["tgt_stats"],
            "--tau",
            bad,
            "--out-dir",
            out,
            ok=False,
        )
        assert result.exit_code == 2 and "--tau" in result.stderr, bad
    result = run(
        "correct",
        case["tgt"],
        "--method",
        "vector-scaling",
        "--stats",
        case["tgt_stats"],
        "--out-dir",
        out,
        ok=False,
    )
    assert_error(result, "calibration")
    assert not out.exists()
    result = run(
        "correct",
        case["tgt"],
        "--method",
        "temperature",
        "--tau",
        "0.3",
        "--stats",
        case["tgt_stats"],
        "--anchors",
        case["src_stats"],
        "--out-dir",
        out,
    )
    assert "--tau is ignored: temperature has no strength" in result.stderr


def test_a_store_without_labels_names_compare_options_only(case, tmp_path, monkeypatch):
    """No ``--allow-missing`` hint (compare has no such option), and compare's progress bar."""
    unlabelled = tmp_path / "nolabels.h5"
    run("import-logits", case["labels"].parent / "logits", "--out", unlabelled)
    out = tmp_path / "c.json"
    result = run("compare", unlabelled, "--stats", case["tgt_stats"], "--json", out, ok=False)
    assert_error(result, "nolabels.h5", "--labels DIR")
    assert "--allow-missing" not in result.stderr and not out.exists()
    # evaluate, which has the option, still suggests it.
    result = run("evaluate", unlabelled, "--json", tmp_path / "e.json", ok=False)
    assert_error(result, "--allow-missing")
    # The progress bar says which command runs.
    import blda_posthoc.pipelines.evaluate as evaluate_module

    bars: list[str] = []

    def recording(iterable, total, desc, unit="img"):
        bars.append(desc)
        return iterable

    monkeypatch.setattr(evaluate_module, "progress", recording)
    compare(case, out)
    assert bars == ["compare"]


@pytest.mark.parametrize("metric", ["miou", "macc"])
def test_the_choice_is_made_on_the_selection_images_not_the_held_out_ones(metric):
    """Where the best row on the selection images and the best held-out row differ, the
    selection images decide (choosing on held-out figures would inflate the reported gain)."""

    def row(selection: float, held: float, excluded: object = None) -> dict:
        return {
            "excluded": excluded,
            metric: held,
            f"selection_{metric}": selection,
            # The other metric points the other way: it must not decide either.
            ("macc" if metric == "miou" else "miou"): -held,
            "selection_" + ("macc" if metric == "miou" else "miou"): -selection,
        }

    rows = [row(50.0, 50.0), row(53.0, 51.0), row(52.0, 56.0), row(60.0, 40.0, {"class": "x"})]
    assert select_row(rows, with_split=True, metric=metric) == 1  # not 2, the held-out best
    assert select_row(rows, with_split=False, metric=metric) == 2  # no split: one set of images
    # No row beats none on the selection images: none, whatever the held-out figures say.
    assert select_row([row(50.0, 50.0), row(49.0, 70.0)], with_split=True, metric=metric) == 0


def test_pixel_stride(case, tmp_path):
    full = compare(case, tmp_path / "full.json")
    one = compare(case, tmp_path / "one.json", "--pixel-stride", "1")
    assert one["rows"] == full["rows"] and one["selected"] == full["selected"]
    assert full["pixel_stride"] == 1 and full["pixels"] == "every pixel"
    strided = compare(case, tmp_path / "s2.json", "--pixel-stride", "2")
    assert strided["pixel_stride"] == 2 and strided["settings"]["pixel_stride"] == 2
    assert strided["pixels"] == "every 2th pixel of each axis (1/4 of the pixels)"
    assert [(r["method"], r["tau"]) for r in strided["rows"]] == [
        (r["method"], r["tau"]) for r in full["rows"]
    ]
    assert strided["rows"] != full["rows"]  # a quarter of the pixels: other figures
    assert strided["selected"]["method"] == full["selected"]["method"]
    # Figures on a regular quarter of the pixels stay near the full ones (small images here).
    for a, b in zip(strided["rows"], full["rows"], strict=True):
        assert abs(a["miou"] - b["miou"]) < 3, (a["method"], a["tau"])
    result = run(
        "compare", case["tgt"], "--stats", case["tgt_stats"], "--pixel-stride", "0",
        "--json", tmp_path / "bad.json", ok=False,
    )  # fmt: skip
    assert result.exit_code == 2 and "--pixel-stride" in result.output


def test_plot_draws_the_selection_metric(monkeypatch):
    import blda_posthoc.report.plots as plots
    from blda_posthoc.pipelines.compare import plot_compare

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    per_class = {"a": {"iou": 50.0}, "b": {"iou": 40.0}}
    rows = [
        {"method": "none", "tau": None, "auto": False, "miou": 45.0, "macc": 60.0,
         "per_class": per_class},
        *({"method": "blda", "tau": t, "auto": False, "miou": 46.0 + t, "macc": 70.0 + t,
           "per_class": per_class} for t in (0.2, 0.5)),
    ]  # fmt: skip
    selected = {"method": "blda", "tau": 0.5, "auto": False, "metric": "macc"}
    plot_compare(Path("unused.png"), {"rows": rows, "selected": selected, "evaluated_on": "x"})
    left = figures[0].axes[0]
    assert left.get_ylabel().startswith("mAcc") and left.get_title() == "mAcc against strength"
    blda = next(line for line in left.get_lines() if line.get_label() == "blda")
    assert list(blda.get_ydata()) == [70.2, 70.5]
    none = next(line for line in left.get_lines() if line.get_label() == "none")
    assert list(none.get_ydata()) == [60.0, 60.0]


def test_a_plot_the_disk_refuses_is_reported_as_it_is(monkeypatch, tmp_path):
    """The atomic write's own error (an InputError, so a ValueError) is not wrapped again."""
    import contextlib

    import blda_posthoc.report.plots as plots
    from blda_posthoc import outputs
    from blda_posthoc.errors import InputError

    @contextlib.contextmanager
    def full(path):
        raise InputError(f"{path}: disk full")
        yield

    monkeypatch.setattr(outputs, "atomic_file", full)
    path = tmp_path / "p.png"
    with pytest.raises(InputError) as caught:
        plots.plot_iou_series(path, ["a", "b"], [("IoU", [50.0, 40.0], 45.0)])
    assert str(caught.value) == f"{path}: disk full"
