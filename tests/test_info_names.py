"""`blda info`, `--rename-classes`, the `--class-names` forms and the missing-suffix hints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_case
from PIL import Image

from blda_posthoc.cli import main
from blda_posthoc.core.classes import CITYSCAPES_CLASSES
from blda_posthoc.errors import InputError
from blda_posthoc.io.images import find_files, suffix_hint, suggest_suffix
from blda_posthoc.io.names import read_class_names
from blda_posthoc.io.stats import read_stats
from blda_posthoc.io.store import LogitStore


def run(*args: object, exit_code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == exit_code, result.output + str(result.exception)
    return result


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    logits, labels = write_case(tmp_path / "case", num_images=4, bias_scale=1.0)
    store, stats = tmp_path / "tgt.h5", tmp_path / "tgt_stats.h5"
    run("import-logits", logits, "--labels", labels, "--out", store)
    run("fit-stats", store, "--labels", "pseudo", "--out", stats)
    return {"store": store, "stats": stats, "logits": logits, "labels": labels}


# --class-names -------------------------------------------------------------------------------


def test_class_names_preset_list_text_and_json(tmp_path: Path) -> None:
    assert read_class_names("Cityscapes") == list(CITYSCAPES_CLASSES)
    assert read_class_names(" a, b ,c") == ["a", "b", "c"]
    text = tmp_path / "names.txt"
    text.write_text("road\n\nside walk\n  car  \n")
    assert read_class_names(str(text)) == ["road", "side walk", "car"]
    obj = tmp_path / "classes.json"
    obj.write_text(json.dumps({"classes": ["road", "sky"], "palette": [[1, 2, 3], [4, 5, 6]]}))
    assert read_class_names(str(obj)) == ["road", "sky"]
    plain_list = tmp_path / "list.json"
    plain_list.write_text('["x", "y", "z"]')
    assert read_class_names(str(plain_list)) == ["x", "y", "z"]
    # JSON recognised by its content even without the extension.
    no_ext = tmp_path / "classes"
    no_ext.write_text('{"class_names": ["p", "q"]}')
    assert read_class_names(str(no_ext)) == ["p", "q"]


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ('{"names": ["a", "b"]}', ["'classes'", "found keys ['names']"]),
        ('{"classes": "a,b"}', ["expected a JSON list", "str", '"a,b"']),
        ('["a", 3]', ["must be strings", "got 3", "2 entries"]),
        ('["a", "b", "a"]', ["not unique", "'a' repeated", "3 names: 'a', 'b', 'a'"]),
        ('["a", ""]', ["class 1 has an empty name", "2 names: 'a', ''"]),
        ("{not json", ["not valid JSON"]),
    ],
)
def test_bad_class_names_files_show_what_was_parsed(tmp_path, content, fragments) -> None:
    path = tmp_path / "classes.json"
    path.write_text(content)
    with pytest.raises(InputError) as info:
        read_class_names(str(path))
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message, message


def test_bad_class_names_specs() -> None:
    with pytest.raises(InputError, match="not a preset \\(cityscapes\\), a file, or a comma"):
        read_class_names("road")
    with pytest.raises(InputError, match="missing.json: no such class-names file"):
        read_class_names("missing.json")
    with pytest.raises(InputError, match="not unique .*'a' repeated.*parsed 3 names"):
        read_class_names("a,b,a")
    with pytest.raises(InputError, match="at most 255 classes"):
        read_class_names(",".join(f"c{i}" for i in range(256)))
    # 255 classes (ids 0..254, 255 = ignore) fit in uint8 trainIds: the limit itself is fine.
    most = [f"c{i}" for i in range(255)]
    assert read_class_names(",".join(most)) == most


def test_class_names_json_file_on_the_command_line(tmp_path, npy_case) -> None:
    logits_dir, _ = npy_case
    names = tmp_path / "classes.json"
    names.write_text(json.dumps({"classes": ["road", "sky", "car", "person"]}))
    result = run("import-logits", logits_dir, "--out", tmp_path / "s.h5", "--class-names", names)
    assert "note:" not in result.stderr
    with LogitStore([tmp_path / "s.h5"]) as store:
        assert store.class_names == ["road", "sky", "car", "person"]


def test_import_without_class_names_says_so_and_how_to_fix_it(tmp_path, npy_case) -> None:
    logits_dir, _ = npy_case
    out = tmp_path / "s.h5"
    result = run("import-logits", logits_dir, "--out", out)
    assert "note: no --class-names: the 4 classes are named class_0..class_3" in result.stderr
    assert f"blda info --rename-classes NAMES {out}" in result.stderr
    assert result.stdout == ""


# suffix hints --------------------------------------------------------------------------------


def test_suggest_suffix_votes_for_the_common_ending() -> None:
    stems = ["a/x_1_gtFine_labelTrainIds", "a/x_1_gtFine_color", "a/x_2_gtFine_labelTrainIds"]
    assert suggest_suffix(["a/x_1", "a/x_2"], stems) == "_gtFine_labelTrainIds"
    # One vote each: the shorter suffix wins, deterministically.
    assert suggest_suffix(["a/x_1"], stems) == "_gtFine_color"
    assert suggest_suffix(["b/x_1"], stems) is None
    assert suggest_suffix(["a/x_1"], ["a/x_1"]) is None  # same name: no suffix to suggest
    assert suggest_suffix([], stems) is None


def test_import_suggests_the_forgotten_label_suffix(tmp_path, npy_case) -> None:
    logits_dir, labels_dir = npy_case
    for png in sorted(labels_dir.rglob("*.png")):
        png.rename(png.with_name(png.stem + "_gtFine_labelTrainIds.png"))
    result = run(
        "import-logits", logits_dir, "--labels", labels_dir, "--out", tmp_path / "a.h5", exit_code=1
    )
    line = one_line_error(result)
    assert "no label for 6 image(s), e.g. 'city_a/img_000'" in line
    assert "the folder holds 'img_000_gtFine_labelTrainIds.png'" in line
    assert line.endswith("try --label-suffix _gtFine_labelTrainIds")
    # A wrong suffix gets the right one suggested; the right one works.
    wrong = run(
        "import-logits",
        logits_dir,
        "--labels",
        labels_dir,
        "--label-suffix",
        "_labelTrainIds",
        "--out",
        tmp_path / "b.h5",
        exit_code=1,
    )
    assert one_line_error(wrong).endswith("try --label-suffix _gtFine_labelTrainIds")
    run(
        "import-logits",
        logits_dir,
        "--labels",
        labels_dir,
        "--label-suffix",
        "_gtFine_labelTrainIds",
        "--out",
        tmp_path / "c.h5",
    )


def test_no_hint_when_nothing_matches(tmp_path, npy_case) -> None:
    logits_dir, labels_dir = npy_case
    (labels_dir / "city_a" / "img_000.png").rename(labels_dir / "city_a" / "other.png")
    assert suffix_hint(["city_a/img_000"], find_files(labels_dir, (".png",))) == ""
    result = run(
        "import-logits", logits_dir, "--labels", labels_dir, "--out", tmp_path / "a.h5", exit_code=1
    )
    assert one_line_error(result).endswith("no label for 1 image(s), e.g. 'city_a/img_000'")


def test_dump_logits_suggests_the_forgotten_label_suffix(tmp_path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    for folder in (images, labels):
        folder.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / f"tar_{i}.png")
        label = labels / f"tar_{i}_gtFine_labelTrainIds.png"
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(label)
    result = run(
        "dump-logits",
        "--model",
        "tiny_models:build",
        "--images",
        images,
        "--labels",
        labels,
        "--out",
        tmp_path / "x.h5",
        exit_code=1,
    )
    line = one_line_error(result)
    assert "no label tar_0.png" in line and "(and 1 more image(s))" in line
    assert line.endswith("try --label-suffix _gtFine_labelTrainIds")


# blda info -----------------------------------------------------------------------------------


def test_info_describes_a_store_as_text_and_json(files) -> None:
    text = run("info", files["store"]).stdout
    assert text.startswith(f"{files['store']}: logits store\n")
    assert "blda-logits version 1" in text
    assert "4 names: 'class_0', 'class_1', 'class_2', 'class_3'" in text
    assert "4 complete, 4 with a label" in text and "24x32 (4)" in text and "float16" in text
    doc = json.loads(run("info", files["store"], "--json").stdout)
    assert doc["format"] == "blda-info" and doc["version"] == 1
    (d,) = doc["files"]
    assert d["kind"] == "logits store" and d["format"] == "blda-logits" and d["version"] == 1
    assert d["num_classes"] == 4 and d["class_names"][0] == "class_0"
    assert d["images"] == 4 and d["labelled_images"] == 4 and d["incomplete_images"] == 0
    assert d["image_sizes"] == {"24x32": 4} and d["logit_sizes"] == {"24x32": 4}
    assert d["dtype"] == "float16" and d["shard"] is None and d["content"] is None
    with LogitStore([files["store"]]) as store:
        assert d["logit_range"] == list(store.logit_range())


def test_info_describes_a_stats_file(files) -> None:
    doc = json.loads(run("info", files["stats"], files["store"], "--json").stdout)
    d, s = doc["files"]
    stats = read_stats(files["stats"])
    assert d["kind"] == "stats file" and d["estimator"] == "hist" and d["labels"] == "pseudo"
    assert d["fingerprint"] == stats.fingerprint == d["fingerprint_attribute"]
    assert d["grid"] == {"lo": stats.grid.lo, "hi": stats.grid.hi, "bins": stats.grid.bins}
    assert d["sources"] == [str(files["store"])] and d["num_images"] == 4
    assert d["min_pixels"] == 100
    assert d["cells_below_min_pixels"] == int((stats.cell_pixels < 100).sum())
    assert d["anchor_pixels"]["positive"] == int(stats.anchor_counts[0].sum())
    assert s["kind"] == "logits store"
    assert stats.extras is not None and d["sample_pixels"] == stats.extras.sample.labels.shape[0]
    assert d["calibrations"] == [] and d["calibrated"] is None  # pseudo labels: no calibration
    text = run("info", files["stats"]).stdout
    assert "hist" in text and "4096 bins" in text and stats.fingerprint in text


def test_info_describes_calibrations_of_gt_statistics(tmp_path, files) -> None:
    gt = tmp_path / "gt_stats.h5"
    run("fit-stats", files["store"], "--labels", "gt", "--out", gt)
    d = json.loads(run("info", gt, "--json").stdout)["files"][0]
    stats = read_stats(gt)
    assert stats.extras is not None and stats.extras.calibrated is not None
    assert d["labels"] == "gt" and d["calibrations"] == sorted(stats.extras.calibrations)
    assert d["calibrated"] == stats.extras.calibrated.settings["calibration"]
    assert d["calibrated"]["kind"] == "vector"
    assert "calibrations" in run("info", gt).stdout
    # Renaming reaches the statistics of calibrated logits too, and keeps everything else.
    run("info", "--rename-classes", "a,b,c,d", gt)
    renamed = read_stats(gt)
    assert renamed.class_names == ["a", "b", "c", "d"]
    assert renamed.extras is not None and renamed.extras.calibrated is not None
    assert renamed.extras.calibrated.class_names == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(renamed.extras.sample.logits, stats.extras.sample.logits)
    assert sorted(renamed.extras.calibrations) == sorted(stats.extras.calibrations)
    np.testing.assert_array_equal(renamed.extras.calibrated.counts, stats.extras.calibrated.counts)


def test_info_counts_incomplete_images_and_shards(tmp_path, files) -> None:
    with h5py.File(files["store"], "a") as f:
        first = next(iter(f["images"].values()))
        first.attrs["complete"] = False
        f.attrs["shard"] = "2/3"
    d = json.loads(run("info", files["store"], "--json").stdout)["files"][0]
    assert d["images"] == 3 and d["incomplete_images"] == 1 and d["shard"] == "2/3"
    text = run("info", files["store"]).stdout
    assert "1 images (not read by commands)" in text and "2/3" in text


def test_info_errors_name_the_file(tmp_path, files) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["format"] = "something-else"
    line = one_line_error(run("info", files["store"], other, exit_code=1))
    assert line.startswith(f"error: {other}: not a logits store or stats file")
    assert "'something-else'" in line
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    assert one_line_error(run("info", junk, exit_code=1)).startswith(
        f"error: {junk}: not a readable HDF5 file"
    )
    missing = tmp_path / "missing.h5"
    assert one_line_error(run("info", missing, exit_code=1)) == f"error: {missing}: no such file"
    with h5py.File(files["store"], "a") as f:
        f.attrs["version"] = 7
    line = one_line_error(run("info", files["store"], exit_code=1))
    assert "version 7 is not supported" in line


def test_rename_classes_of_a_store_and_its_stats_lets_correct_run(tmp_path, files) -> None:
    # A store imported without names and real-named anchors: correct refuses until renamed.
    real = "road,sky,car,person"
    named_logits = tmp_path / "named.h5"
    run(
        "import-logits",
        files["logits"],
        "--labels",
        files["labels"],
        "--out",
        named_logits,
        "--class-names",
        real,
    )
    run("fit-stats", named_logits, "--out", tmp_path / "named_stats.h5")
    refused = run(
        "correct",
        files["store"],
        "--stats",
        files["stats"],
        "--anchors",
        tmp_path / "named_stats.h5",
        "--out-dir",
        tmp_path / "p0",
        exit_code=1,
    )
    line = one_line_error(refused)
    assert "class names" in line and "blda info --rename-classes NAMES" in line
    before = read_stats(files["stats"])
    result = run("info", "--rename-classes", real, files["store"], files["stats"])
    assert f"{files['store']}: renamed 4 classes (class_0 -> road, class_1 -> sky" in result.stderr
    assert "4 names: 'road', 'sky', 'car', 'person'" in result.stdout
    with LogitStore([files["store"]]) as store:
        assert store.class_names == ["road", "sky", "car", "person"]
    after = read_stats(files["stats"])
    assert after.class_names == ["road", "sky", "car", "person"]
    np.testing.assert_array_equal(after.counts, before.counts)
    assert after.settings == before.settings
    with h5py.File(files["stats"]) as f:
        assert f.attrs["fingerprint"] == after.fingerprint != before.fingerprint
    run(
        "correct",
        files["store"],
        "--stats",
        files["stats"],
        "--anchors",
        tmp_path / "named_stats.h5",
        "--out-dir",
        tmp_path / "p1",
    )
    assert not list(tmp_path.glob(".*.tmp"))
    again = run("info", "--rename-classes", real, files["store"])
    assert "class names unchanged" in again.stderr


def test_rename_classes_refuses_another_count_and_leaves_the_file(tmp_path, files) -> None:
    stamp = files["store"].stat().st_mtime_ns
    line = one_line_error(run("info", "--rename-classes", "a,b,c", files["store"], exit_code=1))
    assert f"{files['store']}: --rename-classes gives 3 names: 'a', 'b', 'c'" in line
    assert "the file has 4 classes" in line
    assert files["store"].stat().st_mtime_ns == stamp
    line = one_line_error(run("info", "--rename-classes", "a,b,a,c", files["store"], exit_code=1))
    assert "not unique" in line
    with LogitStore([files["store"]]) as store:
        assert store.class_names[0] == "class_0"


@pytest.mark.parametrize("kind", ["store", "stats"])
@pytest.mark.parametrize("names", ["road,sky", '["road", 3]', '["road"]', "{}"])
def test_rename_classes_of_a_file_whose_names_are_damaged(files, kind, names) -> None:
    with h5py.File(files[kind], "a") as f:
        f.attrs["class_names"] = names
    before = files[kind].read_bytes()
    line = one_line_error(run("info", "--rename-classes", "a,b,c,d", files[kind], exit_code=1))
    assert line.startswith(f"error: {files[kind]}: "), line
    assert "class names" in line or "damaged" in line, line
    assert files[kind].read_bytes() == before


def test_one_class_is_refused_wherever_names_are_given(tmp_path, npy_case) -> None:
    (tmp_path / "one.txt").write_text("road\n")
    with pytest.raises(InputError, match="class names give only 1 name: 'road'; a segmentation"):
        read_class_names(str(tmp_path / "one.txt"))
    logits = tmp_path / "one"
    logits.mkdir()
    np.save(logits / "x.npy", np.zeros((1, 4, 4), np.float32))
    line = one_line_error(run("import-logits", logits, "--out", tmp_path / "o.h5", exit_code=1))
    assert "x.npy" in line and "2 to 255 classes" in line
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "o.h5.partial").exists()


def test_rename_classes_failure_leaves_the_original(tmp_path, files, monkeypatch) -> None:
    import blda_posthoc.pipelines.info as info_module

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(info_module.os, "replace", broken_replace)
    line = one_line_error(run("info", "--rename-classes", "a,b,c,d", files["stats"], exit_code=1))
    assert "cannot rename its classes (disk full)" in line
    assert read_stats(files["stats"]).class_names[0] == "class_0"
    assert not [p for p in os.listdir(files["stats"].parent) if p.endswith(".tmp")]


# evaluate: --ignore-pred-ignore and the suffix hint ----------------------------------------


def write_pngs(folder: Path, maps: dict[str, np.ndarray]) -> Path:
    for name, array in maps.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.astype(np.uint8)).save(folder / f"{name}.png")
    return folder


def test_evaluate_prediction_of_255_counts_as_wrong_or_is_left_out(tmp_path) -> None:
    # Two images; a pseudo-label set that leaves pixels unlabelled (255).
    labels = write_pngs(
        tmp_path / "labels",
        {"a": np.array([[0, 0], [1, 1]]), "b": np.array([[1, 1], [0, 255]])},
    )
    preds = write_pngs(
        tmp_path / "pred",
        {"a": np.array([[0, 255], [1, 0]]), "b": np.array([[1, 255], [255, 1]])},
    )
    wrong, skip = tmp_path / "wrong.json", tmp_path / "skip.json"
    base = ("evaluate", "--pred-dir", preds, "--labels", labels, "--num-classes", 2)
    counted = run(*base, "--json", wrong)
    assert "3 labelled pixels were predicted with ids outside 0..1" in counted.stderr
    assert "--ignore-pred-ignore leaves those pixels out" in counted.stderr
    left_out = run(*base, "--ignore-pred-ignore", "--json", skip)
    assert "note: 3 labelled pixels predicted as 255 (ignore) are left out" in left_out.stderr
    assert "outside 0..1" not in left_out.stderr
    a, b = json.loads(wrong.read_text()), json.loads(skip.read_text())
    # Counted as wrong: 7 labelled pixels, 3 right (a: 0,1; b: 1); 255 is a miss.
    assert a["num_pixels"] == 7 and a["out_of_range_pixels"] == 3
    assert a["pixel_acc"] == pytest.approx(100 * 3 / 7, abs=1e-3)
    assert a["ignored_pred_pixels"] == 0 and a["settings"]["ignore_pred_ignore"] is False
    # Left out: 4 scored pixels (a: 0->0, 1->1, 1->0; b: 1->1), 3 right.
    assert b["num_pixels"] == 4 and b["out_of_range_pixels"] == 0
    assert b["pixel_acc"] == pytest.approx(75.0)
    assert b["per_class"]["class_0"]["iou"] == pytest.approx(50.0)  # TP 1, FP 1, FN 0
    assert b["per_class"]["class_1"]["iou"] == pytest.approx(200 / 3, abs=1e-3)  # TP 2, FN 1
    assert b["ignored_pred_pixels"] == 3 and b["settings"]["ignore_pred_ignore"] is True


def test_ignore_pred_ignore_is_for_pred_dir_only(files) -> None:
    result = run("evaluate", files["store"], "--ignore-pred-ignore", exit_code=2)
    assert "--ignore-pred-ignore is for --pred-dir" in result.stderr


def test_evaluate_suggests_the_forgotten_label_suffix(tmp_path, files) -> None:
    labels = tmp_path / "gt"
    for png in sorted(files["labels"].rglob("*.png")):
        target = labels / png.relative_to(files["labels"]).parent
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{png.stem}_gtFine_labelTrainIds.png").write_bytes(png.read_bytes())
    store_run = run("evaluate", files["store"], "--labels", labels, exit_code=1)
    line = one_line_error(store_run)
    assert line.startswith(f"error: {labels}: no label for 4 image(s), e.g. 'city_a/img_000'")
    assert "the folder holds 'img_000_gtFine_labelTrainIds.png'" in line
    assert line.endswith("try --label-suffix _gtFine_labelTrainIds")
    preds = write_pngs(
        tmp_path / "pred",
        {"city_a/img_000": np.zeros((24, 32)), "city_b/img_001": np.zeros((24, 32))},
    )
    pred_run = run("evaluate", "--pred-dir", preds, "--labels", labels, exit_code=1)
    assert one_line_error(pred_run).endswith("try --label-suffix _gtFine_labelTrainIds")
    wrong = run(
        "evaluate", "--pred-dir", preds, "--labels", labels, "--label-suffix", "_labelIds",
        exit_code=1,
    )  # fmt: skip
    line = one_line_error(wrong)
    assert "no label PNG (with suffix '_labelIds') found" in line
    assert line.endswith("try --label-suffix _gtFine_labelTrainIds")
    fixed = run(
        "evaluate", files["store"], "--labels", labels, "--label-suffix", "_gtFine_labelTrainIds"
    )
    assert "mIoU" in fixed.stdout


def test_relabel_quality_and_evaluate_ignore_pred_ignore_give_one_number(tmp_path, files) -> None:
    out = tmp_path / "pl"
    run("relabel", files["store"], "--stats", files["stats"], "--keep-portion", "0.5",
        "--out-dir", out)  # fmt: skip
    quality = json.loads((out / "manifest.json").read_text())["quality"]["relabelled"]
    base = ("evaluate", "--pred-dir", out, "--labels", files["labels"], "--num-classes", 4)
    skip, wrong = tmp_path / "skip.json", tmp_path / "wrong.json"
    run(*base, "--ignore-pred-ignore", "--json", skip)
    run(*base, "--json", wrong)
    skipped, counted = json.loads(skip.read_text()), json.loads(wrong.read_text())
    assert skipped["miou"] == pytest.approx(quality["miou"], abs=1e-3)
    assert skipped["pixel_acc"] == pytest.approx(quality["pixel_acc"], abs=1e-3)
    assert skipped["num_pixels"] == quality["scored_pixels"]
    assert skipped["ignored_pred_pixels"] > 0
    assert counted["pixel_acc"] < skipped["pixel_acc"]  # 255 counted as wrong
