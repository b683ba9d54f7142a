"""What correct and relabel say they changed; scores stores; device errors."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fitted_case
from PIL import Image

from blda_posthoc.cli import main
from blda_posthoc.io.store import LogitStore, StoreWriter

CHANGED = re.compile(
    r"(\d+) of (\d+) pixels \(([\d.]+)%\) changed class vs (.+?)(?:; largest: (.*))?$", re.M
)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return fitted_case(tmp_path_factory.mktemp("changes"), tgt_images=3)


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _maps(folder: Path) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(folder)): np.asarray(Image.open(p))
        for p in sorted(folder.rglob("*.png"))
        if not p.stem.endswith("_color")
    }


def _correct(case, out: Path, tau: str, *extra: object):
    result = run(
        "correct", case["tgt"], "--stats", case["tgt_stats"], "--anchors", case["src_stats"],
        "--method", "blda", "--tau", tau, "--out-dir", out, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


def test_correct_prints_the_changed_pixels_and_largest_flows(case, tmp_path):
    _correct(case, tmp_path / "plain", "0")
    result = _correct(case, tmp_path / "fixed", "0.5")
    plain, fixed = _maps(tmp_path / "plain"), _maps(tmp_path / "fixed")
    assert plain.keys() == fixed.keys() and len(plain) == 3
    flow = np.zeros((5, 5), dtype=np.int64)  # reference: count the two folders' pixels
    for name, before in plain.items():
        np.add.at(flow, (before.reshape(-1), fixed[name].reshape(-1)), 1)
    np.fill_diagonal(flow, 0)
    total = sum(m.size for m in plain.values())
    assert flow.sum() > 0  # the case is biased: the correction changes something
    found = CHANGED.search(result.stderr)
    assert found, result.stderr
    assert int(found[1]) == flow.sum() and int(found[2]) == total
    assert found[4] == "plain argmax"
    names = json.loads((tmp_path / "fixed" / "correct.json").read_text())["class_names"]
    a, b = np.unravel_index(np.argmax(flow), flow.shape)
    first = found[5].split(", ")[0]
    assert first == f"{names[a]}->{names[b]} {flow[a, b]}"
    report = json.loads((tmp_path / "fixed" / "correct.json").read_text())
    assert report["flow"] == flow.tolist() and report["changed_pixels"] == flow.sum()
    assert np.array_equal(np.array(report["pixels_after"]) - report["pixels_before"],
                          flow.sum(0) - flow.sum(1))  # fmt: skip


def test_correct_at_tau_zero_says_nothing_changed(case, tmp_path):
    result = _correct(case, tmp_path / "plain", "0")
    found = CHANGED.search(result.stderr)
    assert found and found[1] == "0" and found[5] is None


def test_relabel_prints_the_changed_pixels_and_largest_flows(case, tmp_path):
    out = tmp_path / "pseudo"
    result = run(
        "relabel", case["tgt"], "--stats", case["tgt_stats"], "--anchors", case["src_stats"],
        "--method", "blda", "--tau", "0.5", "--min-confidence", "0.5", "--out-dir", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    flow = np.array(manifest["changes"]["argmax"]["flow"])
    found = CHANGED.search(result.stderr)
    assert found, result.stderr
    assert int(found[1]) == flow.sum() == manifest["changes"]["argmax"]["changed_pixels"]
    assert int(found[2]) == manifest["num_pixels"]
    labels = manifest["flow_labels"]
    a, b = np.unravel_index(np.argmax(flow), flow.shape)
    assert found[5].split(", ")[0] == f"{labels[a]}->{labels[b]} {flow[a, b]}"
    assert "changed vs argmax" not in result.stderr  # the old fraction-only line is gone


def _confusion(pairs: list[tuple[np.ndarray, np.ndarray]], c: int) -> np.ndarray:
    """Reference: rows true, columns predicted, ignore (255) left out."""
    m = np.zeros((c, c), dtype=np.int64)
    for pred, label in pairs:
        valid = label != 255
        np.add.at(m, (label[valid].astype(np.int64), pred[valid].astype(np.int64)), 1)
    return m


def test_evaluate_json_holds_the_confusion_matrix_and_plots_it(case, tmp_path):
    _correct(case, tmp_path / "plain", "0")
    _correct(case, tmp_path / "fixed", "0.5")
    labels = _maps(case["labels"])
    plain, fixed = _maps(tmp_path / "plain"), _maps(tmp_path / "fixed")
    report_path, picture = tmp_path / "e.json", tmp_path / "cm.png"
    result = run(
        "evaluate", case["tgt"], "--stats", case["tgt_stats"], "--anchors", case["src_stats"],
        "--method", "blda", "--tau", "0.5", "--json", report_path, "--confusion-plot", picture,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    for key, preds in (("before", plain), ("after", fixed)):
        expected = _confusion([(preds[n], labels[n]) for n in labels], 5)
        assert report[key]["confusion"] == expected.tolist(), key
        per_class = list(report[key]["per_class"].values())
        assert expected.sum(1).tolist() == [e["labelled_pixels"] for e in per_class]
        assert expected.sum(0).tolist() == [e["predicted_pixels"] for e in per_class]
    assert f"wrote {picture}" in result.stderr
    image = Image.open(picture)
    assert image.format == "PNG" and image.size[0] > image.size[1]  # before and after


def test_evaluate_pred_dir_confusion_and_its_plot_error_without_matplotlib(
    case, tmp_path, monkeypatch
):
    _correct(case, tmp_path / "fixed", "0.5")
    labels, fixed = _maps(case["labels"]), _maps(tmp_path / "fixed")
    out = tmp_path / "e.json"
    result = run(
        "evaluate", "--pred-dir", tmp_path / "fixed", "--labels", case["labels"],
        "--num-classes", "5", "--json", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = _confusion([(fixed[n], labels[n]) for n in labels], 5)
    assert json.loads(out.read_text())["confusion"] == expected.tolist()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = run(
        "evaluate", "--pred-dir", tmp_path / "fixed", "--labels", case["labels"],
        "--confusion-plot", tmp_path / "cm.png",
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --confusion-plot needs matplotlib")
    assert not (tmp_path / "cm.png").exists()


def test_scores_store_keeps_the_labels_and_evaluates_like_the_correction(case, tmp_path):
    scores = tmp_path / "scores.h5"
    _correct(case, tmp_path / "fixed", "0.5", "--scores-out", scores)
    with LogitStore([case["tgt"]]) as source, LogitStore([scores]) as kept:
        assert kept.names == source.names
        for name in source.names:
            label, copy = source.read(name).label, kept.read(name).label
            assert label is not None and copy is not None and np.array_equal(label, copy)
    out = tmp_path / "e.json"
    result = run("evaluate", scores, "--json", out)
    assert result.exit_code == 0, result.output
    labels, fixed = _maps(case["labels"]), _maps(tmp_path / "fixed")
    expected = _confusion([(fixed[n], labels[n]) for n in labels], 5)
    got = np.array(json.loads(out.read_text())["confusion"])
    assert np.abs(got - expected).sum() <= 0.001 * expected.sum()  # float16 scores: rare ties


def _store_with_names(path: Path, names: list[str]) -> None:
    rng = np.random.default_rng(0)
    with StoreWriter(path, ["a", "b", "c"]) as writer:
        for name in names:
            writer.write(name, rng.normal(size=(3, 4, 5)).astype(np.float32))


@pytest.mark.parametrize("command", ["correct", "relabel"])
def test_name_and_name_color_with_color_are_refused_up_front(tmp_path, command):
    store = tmp_path / "s.h5"
    _store_with_names(store, ["x", "x_color", "y"])
    stats = tmp_path / "stats.h5"
    fitted = run("fit-stats", store, "--out", stats, "--min-pixels", "1")
    assert fitted.exit_code == 0, fitted.output
    out = tmp_path / "out"
    result = run(command, store, "--stats", stats, "--out-dir", out, "--color")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {store}: ")
    assert "'x' and 'x_color'" in result.stderr and "--color" in result.stderr
    assert not out.exists()
    # Without --color the two names do not collide.
    result = run(command, store, "--stats", stats, "--out-dir", out)
    assert result.exit_code == 0, result.output
    assert (out / "x.png").is_file() and (out / "x_color.png").is_file()


@pytest.mark.parametrize("command", ["correct", "relabel"])
@pytest.mark.parametrize("shard", [[], ["--shard", "2/2"]])
def test_a_name_that_is_the_folder_of_another_is_refused_before_any_work(tmp_path, command, shard):
    """``x`` writes x.png, ``x.png/y`` needs x.png as a folder: refused up front, every shard."""
    store = tmp_path / "s.h5"
    _store_with_names(store, ["x", "x.png/y", "z"])
    stats = tmp_path / "stats.h5"
    fitted = run("fit-stats", store, "--out", stats, "--min-pixels", "1")
    assert fitted.exit_code == 0, fitted.output
    out = tmp_path / "out"
    result = run(command, store, "--stats", stats, "--out-dir", out, *shard)
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {store}: ")
    assert "outputs 'x.png' and 'x.png/y.png' clash" in result.stderr
    assert "--resume" not in result.stderr
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_name_of_245_characters_is_written_despite_the_temporary_file(tmp_path):
    """The hidden temporary name is shortened (start + hash) to fit the file system's limit."""
    from blda_posthoc.outputs import NAME_MAX, TEMPORARY, temporary_name

    long = "n" * 245
    store = tmp_path / "s.h5"
    _store_with_names(store, [long, "y"])
    stats = tmp_path / "stats.h5"
    fitted = run("fit-stats", store, "--out", stats, "--min-pixels", "1")
    assert fitted.exit_code == 0, fitted.output
    out = tmp_path / "out"
    result = run("correct", store, "--stats", stats, "--out-dir", out, "--color")
    assert result.exit_code == 0, result.output
    assert (out / f"{long}.png").is_file() and (out / f"{long}_color.png").is_file()
    assert not [p for p in out.iterdir() if TEMPORARY.match(p.name)]
    for name in (long + "_color.png", "é" * 127 + ".png", "short.png"):
        tmp = temporary_name(tmp_path / name)
        assert len(tmp.name.encode()) <= NAME_MAX and TEMPORARY.match(tmp.name), tmp.name
    assert temporary_name(tmp_path / "short.png").name.startswith(".short.png.")
