"""``--cityscapes-ids``: NAME_labelIds.png beside the trainId PNGs of correct and relabel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fitted_case, write_case
from PIL import Image

from blda_posthoc.cli import main
from blda_posthoc.core.classes import CITYSCAPES_CLASSES, cityscapes_label_ids
from blda_posthoc.io.store import StoreWriter

# Written out by hand from cityscapesScripts' labels.py (name: id, trainId), not from the code.
TRAIN_TO_ID = {
    0: 7,  # road
    1: 8,  # sidewalk
    2: 11,  # building
    3: 12,  # wall
    4: 13,  # fence
    5: 17,  # pole
    6: 19,  # traffic light
    7: 20,  # traffic sign
    8: 21,  # vegetation
    9: 22,  # terrain
    10: 23,  # sky
    11: 24,  # person
    12: 25,  # rider
    13: 26,  # car
    14: 27,  # truck
    15: 28,  # bus
    16: 31,  # train
    17: 32,  # motorcycle
    18: 33,  # bicycle
    255: 0,  # ignore -> unlabeled
}
ID_TO_TRAIN = {v: k for k, v in TRAIN_TO_ID.items()}


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_label_ids_are_the_cityscapes_table():
    values = np.array(sorted(TRAIN_TO_ID), dtype=np.uint8).reshape(4, 5)
    expected = np.vectorize(TRAIN_TO_ID.get)(values)
    got = cityscapes_label_ids(values)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)


def test_label_ids_are_one_to_one_and_keep_the_shape():
    rng = np.random.default_rng(3)
    train = rng.choice([*range(19), 255], size=(7, 9)).astype(np.uint8)
    ids = cityscapes_label_ids(train)
    assert ids.shape == train.shape
    assert np.array_equal(np.vectorize(ID_TO_TRAIN.get)(ids), train)  # inverts exactly
    assert len(set(cityscapes_label_ids(np.arange(19, dtype=np.uint8)).tolist())) == 19


@pytest.mark.parametrize("value", [19, 200, 254])
def test_label_ids_refuse_values_that_are_no_cityscapes_trainid(value):
    with pytest.raises(ValueError, match=f"value {value} is neither"):
        cityscapes_label_ids(np.array([[0, value]], dtype=np.uint8))


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> dict[str, Path]:
    """A 19-class store named with the Cityscapes classes, and its pseudo-label statistics."""
    root = tmp_path_factory.mktemp("city")
    logits, labels = write_case(root / "case", num_images=4, num_classes=19, size=(20, 24))
    paths = {"store": root / "city.h5", "stats": root / "stats.h5", "labels": labels}
    for args in (
        ["import-logits", logits, "--labels", labels, "--class-names", "cityscapes"]
        + ["--out", paths["store"]],
        ["fit-stats", paths["store"], "--label-source", "pseudo", "--min-pixels", "1"]
        + ["--out", paths["stats"]],
    ):
        result = run(*args)
        assert result.exit_code == 0, result.output
    return paths


def _pngs(folder: Path, suffix: str = "") -> dict[str, np.ndarray]:
    """``{name: pixels}`` of ``NAME<suffix>.png`` under ``folder`` (previews left out)."""
    out = {}
    for path in sorted(folder.rglob(f"*{suffix}.png")):
        name = str(path.relative_to(folder).with_suffix(""))
        if suffix:
            name = name[: -len(suffix)]
        elif name.endswith(("_color", "_labelIds")):
            continue
        out[name] = np.asarray(Image.open(path))
    return out


def _check_ids(folder: Path) -> dict[str, np.ndarray]:
    """Every NAME_labelIds.png is uint8 and maps back (hand table) to NAME.png."""
    train, ids = _pngs(folder), _pngs(folder, "_labelIds")
    assert train and train.keys() == ids.keys()
    for name, label_ids in ids.items():
        assert Image.open(folder / f"{name}_labelIds.png").mode == "L"
        assert label_ids.dtype == np.uint8 and label_ids.shape == train[name].shape
        assert np.array_equal(np.vectorize(ID_TO_TRAIN.get)(label_ids), train[name]), name
    return ids


def test_correct_writes_label_ids_that_map_back_to_the_predictions(city, tmp_path):
    out = tmp_path / "pred"
    result = run(
        "correct", city["store"], "--stats", city["stats"], "--tau", "0.5",
        "--out-dir", out, "--cityscapes-ids", "--color",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ids = _check_ids(out)
    assert len(ids) == 4 and len(_pngs(out, "_color")) == 4
    report = json.loads((out / "correct.json").read_text())
    assert report["settings"]["stores"] == [str(city["store"])]
    # Without the option: trainIds only, and the same trainIds.
    plain = tmp_path / "plain"
    result = run(
        "correct", city["store"], "--stats", city["stats"], "--tau", "0.5", "--out-dir", plain
    )
    assert result.exit_code == 0, result.output
    assert not list(plain.rglob("*_labelIds.png"))
    assert all(np.array_equal(a, _pngs(out)[n]) for n, a in _pngs(plain).items())
    # evaluate --pred-dir skips the extra files, says so, and scores the same as without them.
    scores = []
    for folder in (out, plain):
        report = tmp_path / f"{folder.name}.json"
        result = run("evaluate", "--pred-dir", folder, "--labels", city["labels"],
                     "--class-names", "cityscapes", "--json", report)  # fmt: skip
        assert result.exit_code == 0, result.output
        assert ("skipped 8 NAME_color.png / NAME_labelIds.png" in result.stderr) == (folder == out)
        scores.append(json.loads(report.read_text())["confusion"])
    assert scores[0] == scores[1]


def test_relabel_writes_label_ids_with_ignore_as_unlabeled(city, tmp_path):
    out = tmp_path / "pseudo"
    result = run(
        "relabel", city["store"], "--stats", city["stats"], "--min-confidence", "0.6",
        "--out-dir", out, "--cityscapes-ids",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ids = _check_ids(out)
    train = _pngs(out)
    assert any((t == 255).any() for t in train.values())  # some ignore to map
    for name, label_ids in ids.items():
        assert np.array_equal(label_ids == 0, train[name] == 255)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["cityscapes_ids"] is True


@pytest.mark.parametrize("command", ["correct", "relabel"])
def test_other_class_names_are_refused_in_one_line_before_any_work(tmp_path, command):
    case = fitted_case(tmp_path / "five", tgt_images=2)
    out = tmp_path / "out"
    result = run(command, case["tgt"], "--stats", case["tgt_stats"], "--anchors",
                 case["src_stats"], "--out-dir", out, "--cityscapes-ids")  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {case['tgt']}: ")
    assert "--cityscapes-ids needs the 19 Cityscapes classes" in result.stderr
    assert "class_0, class_1, class_2, class_3, ..." in result.stderr
    assert not out.exists() and not Path(f"{out}.partial").exists()


@pytest.mark.parametrize("command", ["correct", "relabel"])
def test_name_and_name_label_ids_are_refused_with_the_option(tmp_path, command):
    store, stats = tmp_path / "s.h5", tmp_path / "stats.h5"
    rng = np.random.default_rng(0)
    with StoreWriter(store, list(CITYSCAPES_CLASSES)) as writer:
        for name in ("x", "x_labelIds", "y"):
            writer.write(name, rng.normal(size=(19, 4, 5)).astype(np.float32))
    assert run("fit-stats", store, "--out", stats, "--min-pixels", "1").exit_code == 0
    out = tmp_path / "out"
    result = run(command, store, "--stats", stats, "--out-dir", out, "--cityscapes-ids")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "'x' and 'x_labelIds'" in result.stderr and "--cityscapes-ids" in result.stderr
    assert not out.exists()


def test_resume_completes_missing_label_ids_and_keeps_the_rest(city, tmp_path):
    out = tmp_path / "pred"
    base = ["correct", city["store"], "--stats", city["stats"], "--out-dir", out]
    assert run(*base, "--cityscapes-ids").exit_code == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*.png"))}
    missing = sorted(out.rglob("*_labelIds.png"))[1]
    missing.unlink()
    kept = sorted(out.rglob("*_labelIds.png"))[0]
    stamp = kept.stat().st_mtime_ns
    result = run(*base, "--cityscapes-ids", "--resume")
    assert result.exit_code == 0, result.output
    assert "kept 3 existing" in result.stderr
    assert {p: p.read_bytes() for p in sorted(out.rglob("*.png"))} == before
    assert kept.stat().st_mtime_ns == stamp  # untouched
    _check_ids(out)
    # The option is part of the settings: resuming without it is refused.
    result = run(*base, "--resume")
    assert result.exit_code == 1
    assert "cityscapes_ids" in result.stderr and "cannot resume" in result.stderr.lower()


def test_shards_write_the_same_label_ids_as_one_process(city, tmp_path):
    whole, shared = tmp_path / "whole", tmp_path / "shared"
    base = ["correct", city["store"], "--stats", city["stats"], "--cityscapes-ids"]
    assert run(*base, "--out-dir", whole).exit_code == 0
    for k in (1, 2):
        result = run(*base, "--out-dir", shared, "--shard", f"{k}/2")
        assert result.exit_code == 0, result.output
    ids = _check_ids(shared)
    assert ids.keys() == _pngs(whole, "_labelIds").keys()
    assert all(np.array_equal(a, _pngs(whole, "_labelIds")[n]) for n, a in ids.items())


def test_evaluate_pred_dir_skips_extra_files_only_when_they_are_not_images(tmp_path):
    preds, labels = tmp_path / "pred", tmp_path / "labels"
    preds.mkdir(), labels.mkdir()
    maps = {"x": [[0, 1]], "x_color": [[1, 1]], "y": [[1, 0]], "y_labelIds": [[7, 8]]}
    for name, pixels in maps.items():
        Image.fromarray(np.array(pixels, dtype=np.uint8)).save(preds / f"{name}.png")
    for name in ("x", "x_color", "y"):  # images x, x_color and y; y_labelIds is an extra file
        Image.fromarray(np.array([[0, 1]], dtype=np.uint8)).save(labels / f"{name}.png")
    report = tmp_path / "e.json"
    result = run("evaluate", "--pred-dir", preds, "--labels", labels, "--num-classes", 2,
                 "--json", report)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "note: skipped 1 NAME_color.png / NAME_labelIds.png files beside NAME.png" in (
        result.stderr
    )
    scored = json.loads(report.read_text())
    assert scored["num_images"] == 3 and scored["num_unlabelled_predictions"] == 0
    # Rows true 0, 1: x predicts 0, 1; x_color 1, 1; y 1, 0.
    assert scored["confusion"] == [[1, 2], [1, 2]]


def test_the_table_in_the_formats_doc_is_the_mapping():
    text = (Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text()
    rows = {
        cells[0]: cells[1:]
        for line in text.splitlines()
        if line.strip().startswith(("| trainId", "| labelId"))
        for cells in [[c.strip() for c in line.strip().strip("|").split("|")]]
    }
    table = dict(zip(map(int, rows["trainId"]), map(int, rows["labelId"]), strict=True))
    assert table == TRAIN_TO_ID


def test_the_rename_hint_is_given_only_to_nineteen_classes():
    from blda_posthoc.errors import InputError
    from blda_posthoc.pipelines.correct import check_cityscapes_ids

    with pytest.raises(InputError, match="rename-classes cityscapes") as nineteen:
        check_cityscapes_ids([f"c{i}" for i in range(19)], "s.h5")
    assert str(nineteen.value).startswith("s.h5: --cityscapes-ids needs")
    with pytest.raises(InputError) as five:
        check_cityscapes_ids([f"c{i}" for i in range(5)], "s.h5")
    assert "rename-classes" not in str(five.value)
    check_cityscapes_ids(list(CITYSCAPES_CLASSES), "s.h5")  # the Cityscapes classes pass
