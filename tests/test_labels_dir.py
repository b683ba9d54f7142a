"""``diagnose`` and ``relabel`` take ``--labels DIR`` as evaluate does, with the same results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fitted_case
from PIL import Image

from blda_posthoc.cli import main
from blda_posthoc.io.store import LogitStore

SUFFIX = "_gtFine_labelTrainIds"


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """The labelled target store, the same logits without labels, and labels with a suffix."""
    root = tmp_path_factory.mktemp("labels_dir")
    paths = fitted_case(root, tgt_images=3)
    paths["bare"] = root / "bare.h5"
    result = run("import-logits", root / "tgt" / "logits", "--out", paths["bare"])
    assert result.exit_code == 0, result.output
    with LogitStore([paths["bare"]]) as store:
        assert not store.has_labels()
    paths["suffixed"] = root / "suffixed"
    for png in sorted(paths["labels"].rglob("*.png")):
        target = paths["suffixed"] / png.relative_to(paths["labels"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, target.with_name(f"{png.stem}{SUFFIX}.png"))
    return paths


def _diagnose(case, out: Path, store: Path, *extra: object) -> dict:
    result = run("diagnose", store, "--stats", case["tgt_stats"], "--json", out, *extra)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_diagnose_with_labels_dir_equals_diagnose_with_stored_labels(case, tmp_path):
    stored = _diagnose(case, tmp_path / "a.json", case["tgt"])
    from_dir = _diagnose(case, tmp_path / "b.json", case["bare"], "--labels", case["labels"])
    suffixed = _diagnose(case, tmp_path / "c.json", case["bare"],
                         "--labels", case["suffixed"], "--label-suffix", SUFFIX)  # fmt: skip
    bare = _diagnose(case, tmp_path / "d.json", case["bare"])
    assert stored["has_labels"] and not bare["has_labels"]
    assert from_dir == stored and suffixed == stored
    assert any(c["decided_by"] == "labels" for c in from_dir["per_class"].values())


def test_diagnose_labels_dir_replaces_the_stored_labels(case, tmp_path):
    zeros = tmp_path / "zeros"
    for png in sorted(case["labels"].rglob("*.png")):
        target = zeros / png.relative_to(case["labels"])
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros_like(np.asarray(Image.open(png)))).save(target)
    stored = _diagnose(case, tmp_path / "a.json", case["tgt"])
    replaced = _diagnose(case, tmp_path / "b.json", case["tgt"], "--labels", zeros)
    # Every true pixel is class 0: only class 0 has a ratio, and it is below 1.
    ratios = {n: c["pred_true_ratio"] for n, c in replaced["per_class"].items()}
    assert ratios["class_0"] is not None and ratios["class_0"] < 1
    assert all(r is None for n, r in ratios.items() if n != "class_0")
    assert replaced != stored


def _manifest(case, out: Path, store: Path, *extra: object) -> dict:
    result = run("relabel", store, "--stats", case["tgt_stats"], "--anchors", case["src_stats"],
                 "--min-confidence", "0.7", "--out-dir", out, *extra)  # fmt: skip
    assert result.exit_code == 0, result.output
    labelled = store != case["bare"] or "--labels" in extra
    assert ("labels: relabelled mIoU" in result.stderr) == labelled, result.stderr
    return json.loads((out / "manifest.json").read_text())


def test_relabel_with_labels_dir_scores_as_with_stored_labels(case, tmp_path):
    stored = _manifest(case, tmp_path / "a", case["tgt"])
    from_dir = _manifest(case, tmp_path / "b", case["bare"], "--labels", case["labels"])
    suffixed = _manifest(case, tmp_path / "c", case["bare"],
                         "--labels", case["suffixed"], "--label-suffix", SUFFIX)  # fmt: skip
    bare = _manifest(case, tmp_path / "d", case["bare"])
    assert stored["quality"] is not None and bare["quality"] is None
    for manifest in (from_dir, suffixed):
        assert manifest["quality"] == stored["quality"]
        assert manifest["pixels"] == stored["pixels"]
    for name in ("city_a/img_000", "city_b/img_001"):
        a = np.asarray(Image.open(tmp_path / "a" / f"{name}.png"))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "b" / f"{name}.png")))


def test_relabel_resume_with_labels_dir_scores_the_kept_images_too(case, tmp_path):
    out = tmp_path / "r"
    full = _manifest(case, out, case["bare"], "--labels", case["labels"])
    (out / "city_a" / "img_000.png").unlink()
    result = run("relabel", case["bare"], "--stats", case["tgt_stats"], "--anchors",
                 case["src_stats"], "--min-confidence", "0.7", "--out-dir", out,
                 "--labels", case["labels"], "--resume")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "kept 2 existing" in result.stderr
    assert json.loads((out / "manifest.json").read_text())["quality"] == full["quality"]


@pytest.mark.parametrize("command", ["diagnose", "relabel", "evaluate"])
def test_a_forgotten_label_suffix_is_suggested_as_evaluate_does(case, tmp_path, command):
    args = [command, case["bare"], "--stats", case["tgt_stats"], "--labels", case["suffixed"]]
    if command == "relabel":
        args += ["--out-dir", tmp_path / "out"]
    result = run(*args)
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert f"try --label-suffix {SUFFIX}" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["diagnose", "relabel"])
def test_an_image_without_label_in_the_folder_is_one_line_error(case, tmp_path, command):
    partial = tmp_path / "partial"
    shutil.copytree(case["labels"], partial)
    (partial / "city_b" / "img_001.png").unlink()
    args = [command, case["bare"], "--stats", case["tgt_stats"], "--labels", partial]
    if command == "relabel":
        args += ["--out-dir", tmp_path / "out"]
    result = run(*args)
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"error: {partial}: no label for 1 of 3 image(s), e.g. 'city_b/img_001' "
        f"(expected {partial / 'city_b' / 'img_001'}.png)\n"
    )


def test_diagnose_merge_takes_no_labels(case, tmp_path):
    result = run("diagnose", tmp_path / "d-1-of-2.json", "--merge", "--labels", case["labels"])
    assert result.exit_code == 2
    assert "without --stats, --anchors, --labels or --shard" in result.output


def test_relabel_with_labels_dir_and_evaluate_of_its_folder_give_one_number(case, tmp_path):
    out = tmp_path / "pl"
    manifest = _manifest(case, out, case["bare"], "--labels", case["labels"], "--color")
    quality = manifest["quality"]["relabelled"]
    assert manifest["ignore_fraction"] > 0
    report = tmp_path / "e.json"
    result = run("evaluate", "--pred-dir", out, "--labels", case["labels"], "--num-classes", 5,
                 "--ignore-pred-ignore", "--json", report)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "skipped 3 NAME_color.png" in result.stderr  # the previews are not predictions
    scored = json.loads(report.read_text())
    assert scored["num_images"] == 3 and scored["num_unlabelled_predictions"] == 0
    assert scored["miou"] == pytest.approx(quality["miou"], abs=1e-3)
    assert scored["num_pixels"] == quality["scored_pixels"]


def test_relabel_shards_with_labels_dir_merge_to_the_stored_labels_quality(case, tmp_path):
    stored = _manifest(case, tmp_path / "one", case["tgt"])
    out = tmp_path / "shards"
    for k in (1, 2):
        result = run("relabel", case["bare"], "--stats", case["tgt_stats"], "--anchors",
                     case["src_stats"], "--min-confidence", "0.7", "--out-dir", out,
                     "--labels", case["labels"], "--shard", f"{k}/2")  # fmt: skip
        assert result.exit_code == 0, result.output
    merged = run("relabel", "--merge", out / "manifest-*-of-2.json")
    assert merged.exit_code == 0, merged.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quality"] == stored["quality"] and manifest["pixels"] == stored["pixels"]
    refused = run("relabel", "--merge", out / "manifest-*-of-2.json", "--labels", case["labels"])
    assert refused.exit_code == 2 and "--labels" in refused.output
