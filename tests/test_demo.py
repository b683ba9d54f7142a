"""`blda demo` end to end on a handful of scenes (the full-size run is in the README)."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from blda_posthoc.cli import main
from blda_posthoc.demo.run import prepare, write_marker
from blda_posthoc.report.plots import CHANGE_COLORS, change_map, overlay


def test_demo_runs_every_step_and_writes_its_outputs(tmp_path):
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(
        main, ["demo", "--workdir", str(workdir), "--images", "4", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output + str(result.exception)
    assert "| **mIoU**" in result.stdout and "demo finished in" in result.stdout
    log = (workdir / "commands.log").read_text()
    for step in (
        "dump-logits",
        "fit-stats src.h5 --label-source gt",
        "fit-stats tgt.h5 --label-source pseudo",
        "diagnose",
        "correct tgt.h5 --stats tgt_stats.h5 --anchors src_stats.h5",
        "correct tgt.h5 --stats src_stats.h5",
        "evaluate --pred-dir pred_paper",
    ):
        assert f"$ blda {step}" in log
    for key in ("plain", "paper", "source"):
        report = json.loads((workdir / f"eval_{key}.json").read_text())
        assert report["num_images"] == 4
    assert len(list((workdir / "pred_paper").glob("*.png"))) == 4
    assert Image.open(workdir / "iou.png").size[0] > 300
    example = Image.open(workdir / "examples" / "scene_0000.png")
    assert example.mode in ("RGB", "RGBA")
    # Nine 256x128 pictures at 1.5x in three columns, titles and a legend: about 1190 x 900.
    assert 1100 <= example.size[0] <= 1300 and 800 <= example.size[1] <= 1000, example.size
    assert "| **mIoU**" in (workdir / "report.md").read_text()
    first_eval = (workdir / "eval_paper.json").read_bytes()
    # A second run in the demo's own folder replaces its outputs (reusing the generated data)
    # and leaves files it did not write alone.
    (workdir / "notes.txt").write_text("mine")
    (workdir / "pred_paper" / "stale.png").write_bytes(b"old")
    again = CliRunner().invoke(
        main, ["demo", "--workdir", str(workdir), "--images", "4", "--device", "cpu"]
    )
    assert again.exit_code == 0, again.output + str(again.exception)
    assert "reusing the 4 source and 4 target scenes" in again.stderr
    assert (workdir / "notes.txt").read_text() == "mine"
    assert not (workdir / "pred_paper" / "stale.png").exists()
    assert (workdir / "eval_paper.json").read_bytes() == first_eval
    assert (workdir / "commands.log").read_text().count("$ blda dump-logits") == 2  # fresh log


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    workdir = tmp_path / "mine"
    workdir.mkdir()
    (workdir / "src.h5").write_bytes(b"someone else's store")
    result = CliRunner().invoke(main, ["demo", "--workdir", str(workdir), "--images", "4"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {workdir / 'src.h5'}: already exists and ")
    assert "--overwrite" in result.stderr and result.stderr.count("\n") == 1
    assert (workdir / "src.h5").read_bytes() == b"someone else's store"
    assert not (workdir / ".blda-demo.json").exists()


def test_prepare_regenerates_data_made_with_other_settings(tmp_path):
    workdir = tmp_path / "demo"
    assert prepare(workdir, overwrite=False, count=4, seed=0) is False
    (workdir / "data").mkdir()
    write_marker(workdir, 4, 0, data_complete=True)
    assert prepare(workdir, overwrite=False, count=4, seed=0) is True
    assert (workdir / "data").is_dir()
    write_marker(workdir, 4, 0, data_complete=True)
    assert prepare(workdir, overwrite=False, count=5, seed=0) is False
    assert not (workdir / "data").exists()
    (workdir / "data").mkdir()
    write_marker(workdir, 4, 0, data_complete=False)  # killed while generating
    assert prepare(workdir, overwrite=False, count=4, seed=0) is False
    assert not (workdir / "data").exists()


def test_change_map_and_overlay_by_hand():
    before = np.array([[0, 1, 2, 1]], dtype=np.uint8)
    after = np.array([[0, 2, 1, 0]], dtype=np.uint8)
    label = np.array([[0, 2, 1, 255]], dtype=np.uint8)  # fixed, fixed, changed with no label
    picture, counts = change_map(before, after, label)
    assert counts == {
        "fixed (wrong -> right)": 2,
        "broken (right -> wrong)": 0,
        "changed, wrong both times": 0,
        "changed, no label": 1,
    }
    assert tuple(picture[0, 0]) == (255, 255, 255)  # unchanged, no image: white
    assert tuple(picture[0, 1]) == CHANGE_COLORS["fixed (wrong -> right)"]
    assert tuple(picture[0, 3]) == CHANGE_COLORS["changed, no label"]
    _, counts = change_map(after, before, label)  # the way back breaks both
    assert counts["broken (right -> wrong)"] == 2
    _, counts = change_map(before, np.array([[0, 0, 0, 1]], np.uint8), label)
    assert counts["changed, wrong both times"] == 2  # 1 -> 0 under label 2, 2 -> 0 under 1
    palette = np.zeros((256, 3), np.uint8)
    palette[1] = (200, 0, 0)
    image = np.full((1, 2, 3), 100, np.uint8)
    mixed = overlay(image, np.array([[1, 255]], np.uint8), palette, alpha=0.5)
    assert tuple(mixed[0, 0]) == (150, 50, 50) and tuple(mixed[0, 1]) == (100, 100, 100)
