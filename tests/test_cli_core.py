"""End-to-end tests of import-logits, fit-stats and correct through click's CliRunner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_case
from PIL import Image

from blda_posthoc.cli import main
from blda_posthoc.io.stats import read_stats, stats_size
from blda_posthoc.io.store import LogitStore


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result


def assert_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def stores(tmp_path: Path) -> dict[str, Path]:
    src_logits, src_labels = write_case(tmp_path / "src", num_images=6, seed=1, bias_scale=0.0)
    tgt_logits, tgt_labels = write_case(tmp_path / "tgt", num_images=6, seed=2, bias_scale=1.2)
    paths = {
        "src": tmp_path / "src.h5",
        "tgt": tmp_path / "tgt.h5",
        "tgt_logits": tgt_logits,
        "tgt_labels": tgt_labels,
    }
    run("import-logits", src_logits, "--labels", src_labels, "--out", paths["src"])
    run("import-logits", tgt_logits, "--labels", tgt_labels, "--out", paths["tgt"])
    return paths


def test_import_keeps_names_sizes_and_labels(stores):
    with LogitStore([stores["tgt"]]) as store:
        assert store.names[0] == "city_a/img_000" and len(store) == 6
        assert store.class_names == ["class_0", "class_1", "class_2", "class_3"]
        record = store.read("city_b/img_001")
    raw = np.load(stores["tgt_logits"] / "city_b" / "img_001.npy")
    np.testing.assert_allclose(record.logits, raw, atol=2e-2)  # float16 storage
    label = np.asarray(Image.open(stores["tgt_labels"] / "city_b" / "img_001.png"))
    np.testing.assert_array_equal(record.label, label)
    assert record.size == label.shape


def test_import_class_names_and_float32(tmp_path, npy_case):
    logits_dir, _ = npy_case
    out = tmp_path / "s.h5"
    run("import-logits", logits_dir, "--out", out, "--class-names", "a,b,c,d", "--dtype", "float32")
    with LogitStore([out]) as store:
        assert store.class_names == ["a", "b", "c", "d"]
        raw = np.load(logits_dir / "city_a" / "img_000.npy")
        np.testing.assert_array_equal(store.read("city_a/img_000").logits, raw)
    with h5py.File(out) as f:
        assert f.attrs["format"] == "blda-logits" and f.attrs["version"] == 1


def test_import_errors(tmp_path, npy_case):
    logits_dir, labels_dir = npy_case
    assert_error(
        run(
            "import-logits",
            logits_dir,
            "--out",
            tmp_path / "a.h5",
            "--class-names",
            "x,y",
            ok=False,
        ),
        "4 channels but 2 class names",
    )
    (labels_dir / "city_a" / "img_000.png").unlink()
    assert_error(
        run(
            "import-logits",
            logits_dir,
            "--labels",
            labels_dir,
            "--out",
            tmp_path / "b.h5",
            ok=False,
        ),
        str(labels_dir),
        "city_a/img_000",
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.npy").write_bytes(b"not numpy")
    assert_error(run("import-logits", bad, "--out", tmp_path / "c.h5", ok=False), "x.npy")
    assert not (tmp_path / "c.h5").exists()


def test_bad_label_value_is_reported(tmp_path, npy_case):
    logits_dir, labels_dir = npy_case
    label_path = labels_dir / "city_b" / "img_003.png"
    label = np.asarray(Image.open(label_path)).copy()
    label[0, 0] = 9
    Image.fromarray(label).save(label_path)
    result = run(
        "import-logits", logits_dir, "--labels", labels_dir, "--out", tmp_path / "s.h5", ok=False
    )
    assert_error(result, "img_003.png", "label value 9")


@pytest.mark.parametrize(
    ("logits_size", "label_size"),
    [
        ((24, 32), (32, 24)),  # transposed
        ((24, 32), (240, 32)),  # ten times taller
        ((24, 32), (12, 16)),  # smaller than the logits
        ((12, 16), (24, 40)),  # stretched along one axis
    ],
)
def test_import_refuses_a_label_of_another_shape(tmp_path, logits_size, label_size):
    rng = np.random.default_rng(0)
    (tmp_path / "logits").mkdir()
    (tmp_path / "labels").mkdir()
    np.save(tmp_path / "logits" / "x.npy", rng.normal(size=(3, *logits_size)).astype(np.float32))
    label = rng.integers(0, 3, label_size).astype(np.uint8)
    Image.fromarray(label).save(tmp_path / "labels" / "x.png")
    out = tmp_path / "s.h5"
    result = run("import-logits", tmp_path / "logits", "--labels", tmp_path / "labels", "--out",
                 out, ok=False)  # fmt: skip
    assert_error(
        result,
        f"{tmp_path / 'labels' / 'x.png'}: label is {label_size[0]}x{label_size[1]}",
        f"{logits_size[0]}x{logits_size[1]}",
        "aspect ratio",
    )
    assert not out.exists() and not Path(f"{out}.partial").exists()


@pytest.mark.parametrize(
    ("logits_size", "label_size"), [((24, 32), (96, 128)), ((9, 13), (65, 97))]
)
def test_import_accepts_logits_at_a_reduced_stride(tmp_path, logits_size, label_size):
    rng = np.random.default_rng(0)
    (tmp_path / "logits").mkdir()
    (tmp_path / "labels").mkdir()
    np.save(tmp_path / "logits" / "x.npy", rng.normal(size=(3, *logits_size)).astype(np.float32))
    Image.fromarray(rng.integers(0, 3, label_size).astype(np.uint8)).save(
        tmp_path / "labels" / "x.png"
    )
    run("import-logits", tmp_path / "logits", "--labels", tmp_path / "labels", "--out",
        tmp_path / "s.h5")  # fmt: skip
    with LogitStore([tmp_path / "s.h5"]) as store:
        assert store.size("x") == label_size


def test_store_labels_beyond_the_classes_are_refused_by_every_reader(tmp_path, stores):
    with h5py.File(stores["src"], "a") as f:
        label = f["images/city_b%2Fimg_003/label"]
        values = label[()]
        values[0, :3] = [4, 7, 255]
        label[...] = values
    for args in (
        ("fit-stats", stores["src"], "--label-source", "gt", "--out", tmp_path / "s.h5"),
        ("evaluate", stores["src"]),
    ):
        assert_error(
            run(*args, ok=False),
            f"{stores['src']}: image 'city_b/img_003': label value 7 is neither a class id "
            "(0..3) nor the ignore value 255 (2 pixels)",
        )
    assert not (tmp_path / "s.h5").exists()


def test_existing_outputs_are_not_damaged(tmp_path, stores):
    before = stores["src"].read_bytes()
    result = run("import-logits", stores["tgt_logits"], "--out", stores["src"], ok=False)
    assert_error(result, str(stores["src"]), "already exists")
    assert stores["src"].read_bytes() == before
    stats = tmp_path / "s.h5"
    stats.write_text("keep me")
    assert_error(run("fit-stats", stores["src"], "--out", stats, ok=False), "already exists")
    assert stats.read_text() == "keep me"


def test_fit_stats_defaults_to_gt_and_records_settings(tmp_path, stores):
    out = tmp_path / "s.h5"
    result = run("fit-stats", stores["src"], "--out", out, "--min-pixels", "50")
    assert "labels: gt" in result.stderr
    stats = read_stats(out)
    assert stats.settings["labels"] == "gt" and stats.settings["min_pixels"] == 50
    assert stats.settings["num_images"] == 6
    assert stats.counts.sum() == stats.settings["num_pixels"] * 4
    with h5py.File(out) as f:
        assert f.attrs["format"] == "blda-stats" and f.attrs["version"] == 2
        assert f["cells/pixels"].shape == (4, 4)


def test_fit_stats_is_deterministic(tmp_path, stores):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    run("fit-stats", stores["src"], "--out", a, "--estimator", "gmm")
    run("fit-stats", stores["src"], "--out", b, "--estimator", "gmm")
    assert a.read_bytes() == b.read_bytes()


def test_two_stores_fit_like_one(tmp_path):
    logits_dir, labels_dir = write_case(tmp_path / "all", num_images=6, seed=3)
    run("import-logits", logits_dir, "--labels", labels_dir, "--out", tmp_path / "all.h5")
    for city in ("city_a", "city_b"):
        run(
            "import-logits",
            logits_dir / city,
            "--labels",
            labels_dir / city,
            "--out",
            tmp_path / f"{city}.h5",
        )
    run("fit-stats", tmp_path / "all.h5", "--labels", "gt", "--out", tmp_path / "one.h5")
    run("fit-stats", tmp_path / "city_*.h5", "--labels", "gt", "--out", tmp_path / "two.h5")
    one, two = read_stats(tmp_path / "one.h5"), read_stats(tmp_path / "two.h5")
    np.testing.assert_array_equal(one.counts, two.counts)
    assert one.grid == two.grid
    # The image names differ ("city_a/x" against "x"), so the seeded pixel samples differ;
    # everything counted over all pixels is the same.
    assert one.extras is not None and two.extras is not None
    np.testing.assert_array_equal(one.extras.predicted, two.extras.predicted)
    np.testing.assert_array_equal(one.extras.confidence, two.extras.confidence)


def test_duplicate_names_across_stores_are_refused(stores, tmp_path):
    result = run(
        "fit-stats",
        stores["tgt"],
        stores["tgt"].with_name("tgt_copy.h5"),
        "--out",
        tmp_path / "x.h5",
        ok=False,
    )
    assert_error(result, "tgt_copy.h5", "no such logits store")
    stores["tgt"].with_name("tgt_copy.h5").write_bytes(stores["tgt"].read_bytes())
    result = run(
        "fit-stats",
        stores["tgt"],
        stores["tgt"].with_name("tgt_copy.h5"),
        "--out",
        tmp_path / "x.h5",
        ok=False,
    )
    assert_error(result, "is also in")


def test_correct_tau_zero_is_plain_argmax(tmp_path, stores):
    run("fit-stats", stores["src"], "--out", tmp_path / "s.h5")
    run(
        "correct",
        stores["tgt"],
        "--stats",
        tmp_path / "s.h5",
        "--method",
        "blda",
        "--tau",
        "0",
        "--out-dir",
        tmp_path / "pred",
    )
    with LogitStore([stores["tgt"]]) as store:
        for name in store.names:
            pred = np.asarray(Image.open(tmp_path / "pred" / f"{name}.png"))
            np.testing.assert_array_equal(pred, store.read(name).logits.argmax(0))


def test_correct_pipeline_writes_pngs_manifest_and_previews(tmp_path, stores):
    run("fit-stats", stores["src"], "--labels", "gt", "--out", tmp_path / "src_stats.h5")
    run(
        "fit-stats",
        stores["tgt"],
        "--labels",
        "pseudo",
        "--out",
        tmp_path / "tgt_stats.h5",
        "--estimator",
        "gmm",
    )
    out = tmp_path / "pred"
    result = run(
        "correct",
        stores["tgt"],
        "--stats",
        tmp_path / "tgt_stats.h5",
        "--anchors",
        tmp_path / "src_stats.h5",
        "--tau",
        "0.5",
        "--out-dir",
        out,
        "--color",
    )
    assert "wrote 6 predictions" in result.stderr
    pred = Image.open(out / "city_a" / "img_000.png")
    assert pred.mode == "L" and pred.size == (32, 24)
    assert Image.open(out / "city_a" / "img_000_color.png").mode == "RGB"
    manifest = json.loads((out / "correct.json").read_text())
    assert manifest["images"] == 6 and manifest["settings"]["tau"] == 0.5
    assert sum(manifest["pixels_after"]) == sum(manifest["pixels_before"]) == 6 * 24 * 32
    assert (
        manifest["settings"]["anchors_fingerprint"]
        == read_stats(tmp_path / "src_stats.h5").fingerprint
    )
    # Refuses to overwrite, resumes, overwrites on request.
    assert_error(
        run(
            "correct",
            stores["tgt"],
            "--stats",
            tmp_path / "src_stats.h5",
            "--out-dir",
            out,
            ok=False,
        ),
        "already exists",
    )
    first = [stores["tgt"], "--stats", tmp_path / "tgt_stats.h5", "--anchors"]
    first += [tmp_path / "src_stats.h5", "--tau", "0.5", "--out-dir", out, "--color"]
    assert "wrote 0 predictions" in run("correct", *first, "--resume").stderr
    assert_error(  # --resume with other settings would mix two corrections in one folder
        run(
            "correct",
            *first[:-3],
            "--out-dir",
            out,
            "--color",
            "--resume",
            "--tau",
            "0.3",
            ok=False,
        ),
        "other settings",
    )
    run(
        "correct",
        stores["tgt"],
        "--stats",
        tmp_path / "src_stats.h5",
        "--out-dir",
        out,
        "--overwrite",
    )


def test_correct_is_deterministic(tmp_path, stores):
    run("fit-stats", stores["src"], "--out", tmp_path / "s.h5")
    for out in ("a", "b"):
        run("correct", stores["tgt"], "--stats", tmp_path / "s.h5", "--out-dir", tmp_path / out)
    for png in sorted((tmp_path / "a").rglob("*.png")):
        assert png.read_bytes() == (tmp_path / "b" / png.relative_to(tmp_path / "a")).read_bytes()


def test_correct_upsamples_to_label_size(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "logits").mkdir()
    (tmp_path / "labels").mkdir()
    np.save(tmp_path / "logits" / "x.npy", rng.normal(size=(3, 8, 10)).astype(np.float32))
    Image.fromarray(rng.integers(0, 3, (16, 20)).astype(np.uint8)).save(
        tmp_path / "labels" / "x.png"
    )
    run(
        "import-logits",
        tmp_path / "logits",
        "--labels",
        tmp_path / "labels",
        "--out",
        tmp_path / "s.h5",
    )
    run("fit-stats", tmp_path / "s.h5", "--out", tmp_path / "st.h5", "--min-pixels", "1")
    run("correct", tmp_path / "s.h5", "--stats", tmp_path / "st.h5", "--out-dir", tmp_path / "p")
    assert Image.open(tmp_path / "p" / "x.png").size == (20, 16)


def test_correct_reports_small_cells_and_class_mismatch(tmp_path, stores):
    run("fit-stats", stores["src"], "--out", tmp_path / "s.h5", "--min-pixels", "100000000")
    result = run(
        "correct",
        stores["tgt"],
        "--stats",
        tmp_path / "s.h5",
        "--method",
        "blda",
        "--out-dir",
        tmp_path / "p",
        ok=False,
    )
    assert_error(result, "s.h5", "anchors hold too few pixels")
    other_logits, _ = write_case(tmp_path / "five", num_images=2, num_classes=5)
    run("import-logits", other_logits, "--out", tmp_path / "five.h5")
    run("fit-stats", tmp_path / "five.h5", "--out", tmp_path / "five_stats.h5")
    result = run(
        "correct",
        stores["tgt"],
        "--stats",
        tmp_path / "five_stats.h5",
        "--out-dir",
        tmp_path / "q",
        ok=False,
    )
    assert_error(result, "five_stats.h5", "class names")


def test_correct_warns_about_skipped_cells(tmp_path, stores):
    run("fit-stats", stores["tgt"], "--labels", "pseudo", "--out", tmp_path / "probe.h5")
    pixels = read_stats(tmp_path / "probe.h5").cell_pixels
    threshold = int(np.sort(pixels.ravel())[3]) + 1  # exactly four cells fall below it
    run(
        "fit-stats",
        stores["tgt"],
        "--labels",
        "pseudo",
        "--out",
        tmp_path / "t.h5",
        "--min-pixels",
        threshold,
    )
    run("fit-stats", stores["src"], "--out", tmp_path / "s.h5")
    result = run(
        "correct",
        stores["tgt"],
        "--stats",
        tmp_path / "t.h5",
        "--anchors",
        tmp_path / "s.h5",
        "--method",
        "blda",
        "--out-dir",
        tmp_path / "p",
    )
    small = int((pixels < threshold).sum())
    assert small >= 4
    assert f"{small} of 16 cells hold too few pixels and get no shift" in result.stderr
    manifest = json.loads((tmp_path / "p" / "correct.json").read_text())
    assert len(manifest["settings"]["skipped_cells"]) == small


def test_bad_store_file_gives_one_line_error(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_text("nope")
    assert_error(run("fit-stats", junk, "--out", tmp_path / "s.h5", ok=False), "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "something-else"
    assert_error(
        run("fit-stats", tmp_path / "other.h5", "--out", tmp_path / "s.h5", ok=False),
        "not a logits store",
    )
    assert_error(
        run("fit-stats", tmp_path / "none_*.h5", "--out", tmp_path / "s.h5", ok=False),
        "no file matches",
    )


def test_gt_labels_required_for_gt_mode(tmp_path, npy_case):
    logits_dir, _ = npy_case
    run("import-logits", logits_dir, "--out", tmp_path / "u.h5")
    assert_error(
        run("fit-stats", tmp_path / "u.h5", "--labels", "gt", "--out", tmp_path / "s.h5", ok=False),
        "--label-source gt needs label maps",
    )
    result = run("fit-stats", tmp_path / "u.h5", "--out", tmp_path / "s.h5")
    assert "labels: pseudo" in result.stderr


def test_module_entry_point_runs():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "blda_posthoc", "--help"], capture_output=True, text=True, check=True
    )
    assert "fit-stats" in out.stdout and "correct" in out.stdout


def test_correct_scores_store_agrees_with_the_pngs(tmp_path, stores):
    run("fit-stats", stores["src"], "--out", tmp_path / "s.h5")
    run(
        "correct",
        stores["tgt"],
        "--stats",
        tmp_path / "s.h5",
        "--tau",
        "0.5",
        "--out-dir",
        tmp_path / "p",
        "--scores-out",
        tmp_path / "scores.h5",
    )
    with LogitStore([tmp_path / "scores.h5"]) as scores:
        assert len(scores) == 6
        for name in scores.names:
            record = scores.read(name)
            assert record.logits.shape == (4, 24, 32) and record.size == (24, 32)
            pred = np.asarray(Image.open(tmp_path / "p" / f"{name}.png"))
            assert (record.logits.argmax(0) == pred).mean() > 0.999  # float16 storage
    result = run(
        "correct",
        stores["tgt"],
        "--stats",
        tmp_path / "s.h5",
        "--out-dir",
        tmp_path / "q",
        "--scores-out",
        tmp_path / "x.h5",
        "--resume",
        ok=False,
    )
    assert result.exit_code == 2 and "--resume" in result.output


def test_too_large_tau_is_a_one_line_error_before_any_output(tmp_path, stores):
    run("fit-stats", stores["src"], "--out", tmp_path / "s.h5")
    result = run(
        "correct",
        stores["tgt"],
        "--stats",
        tmp_path / "s.h5",
        "--tau",
        "1000",
        "--out-dir",
        tmp_path / "p",
        ok=False,
    )
    assert_error(result, "s.h5", "too large")
    assert not (tmp_path / "p").exists()


def test_unwritable_output_is_a_one_line_error(tmp_path, stores):
    import os

    if os.geteuid() == 0:  # root writes anywhere: use a path under a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "s.h5"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "s.h5"
    result = run("fit-stats", stores["src"], "--labels", "gt", "--out", out, ok=False)
    assert_error(result, str(tmp_path))


def declared_stats(path: Path, num_classes: int, bins: int) -> Path:
    """A few-KB stats file declaring ``(C, C, B)`` counts (chunks never written: no data)."""
    with h5py.File(path, "w") as f:
        f.attrs["format"], f.attrs["version"] = "blda-stats", 2
        f.create_dataset(
            "cells/counts", (num_classes, num_classes, bins), np.int64, chunks=(1, 1, bins)
        )
    return path


@pytest.mark.parametrize(
    "command, extra",
    [
        ("evaluate", []),
        ("correct", ["--out-dir", "out"]),
        ("relabel", ["--out-dir", "out"]),
        ("compare", ["--json", "out.json"]),
    ],
)
def test_statistics_over_the_memory_budget_are_refused_before_they_are_read(
    tmp_path, stores, monkeypatch, command, extra
):
    """200 classes x 4096 bins: 1.2 GiB of counts and as much of tables, more than a 2 GiB
    budget; refused from the file's declared shape, with the bin count that fits."""
    from blda_posthoc.pipelines import corrections

    def never(*args, **kwargs):
        raise AssertionError("the statistics were read")

    monkeypatch.setattr(corrections, "read_stats", never)
    monkeypatch.setenv("BLDA_MEMORY_GIB", "2")
    monkeypatch.chdir(tmp_path)
    big = declared_stats(tmp_path / "big.h5", 200, 4096)
    args = [command, stores["tgt"], "--stats", big, "--method", "blda", *extra]
    if command == "compare":
        args = args[:4] + ["--methods", "blda", *extra]
    result = run(*args, ok=False)
    assert_error(result, "big.h5", "200 classes x 4096 bins", "2.00 GiB (BLDA_MEMORY_GIB)")
    assert "fit-stats --bins" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("command", ["info", "diagnose"])
def test_commands_that_only_read_statistics_check_the_budget_first(
    tmp_path, stores, monkeypatch, command
):
    """info and diagnose (without --anchors) build no correction, but 200 x 200 x 4096 counts
    are 1.2 GiB to read: over a 1 GiB budget they are refused from the declared shape."""
    from blda_posthoc.pipelines import memory

    def never(*args, **kwargs):
        raise AssertionError("the statistics were read")

    monkeypatch.setattr(memory, "read_stats", never)
    monkeypatch.setenv("BLDA_MEMORY_GIB", "1")
    big = declared_stats(tmp_path / "big.h5", 200, 4096)
    args = ["info", big] if command == "info" else ["diagnose", stores["tgt"], "--stats", big]
    result = run(*args, ok=False)
    assert_error(result, "big.h5: reading it needs about", "1.00 GiB (BLDA_MEMORY_GIB)")


@pytest.mark.parametrize("below", [True, False])
def test_the_memory_estimate_decides_at_the_budget(tmp_path, stores, monkeypatch, below):
    """A real file just over the budget is refused (naming --bins that fits), just under runs."""
    from blda_posthoc.core.align import correction_memory

    stats = tmp_path / "s.h5"
    run("fit-stats", stores["src"], "--label-source", "gt", "--out", stats)
    c, bins, groups = stats_size(stats)
    need = correction_memory(c, bins, groups=groups)
    budget = need - 4096 if below else need + 4096
    monkeypatch.setenv("BLDA_MEMORY_GIB", repr(budget / 2**30))
    result = run("evaluate", stores["tgt"], "--stats", stats, "--method", "blda", ok=not below)
    if below:
        assert_error(result, str(stats), f"{c} classes x {bins} bins", "fit-stats --bins")


@pytest.mark.parametrize("calibrated", [True, False])
def test_fit_stats_warns_when_its_file_would_not_fit_the_budget(
    tmp_path, stores, monkeypatch, calibrated
):
    """One warning line naming the file, the estimate and the --bins that fits; the file is
    written all the same, and applying it is then refused with the same figure."""
    from blda_posthoc.core.align import correction_memory

    groups = 2 if calibrated else 1
    need = correction_memory(4, 4096, groups=groups)
    monkeypatch.setenv("BLDA_MEMORY_GIB", repr((need - 4096) / 2**30))
    out = tmp_path / "s.h5"
    labels = "gt" if calibrated else "pseudo"
    result = run("fit-stats", stores["src"], "--label-source", labels, "--out", out)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert (
        f"{out}: applying it with a BLDA method needs at least {need / 2**30:.2f} GiB"
        in (warnings[0])
    )
    fits = int(re.search(r"--bins (\d+) or fewer", warnings[0]).group(1))
    assert correction_memory(4, fits, groups=groups) < need - 4096
    assert read_stats(out).grid.bins == 4096
    refused = run("evaluate", stores["tgt"], "--stats", out, "--method", "blda", ok=False)
    assert_error(refused, f"needs about {need / 2**30:.2f} GiB")
    monkeypatch.setenv("BLDA_MEMORY_GIB", repr((need + 4096) / 2**30))
    result = run("fit-stats", stores["src"], "--label-source", labels, "--out", out, "--overwrite")
    assert "warning:" not in result.stderr


@pytest.mark.parametrize("labels, groups", [("pseudo", 1), ("gt", 2)])
def test_fit_stats_refuses_histograms_over_the_budget_before_the_fit(
    tmp_path, stores, monkeypatch, labels, groups
):
    """gt fits calibrated statistics too: two sets of histograms held at once."""
    from blda_posthoc.core.align import Tables, correction_memory

    need = correction_memory(4, 4096, groups=groups, tables=Tables())
    monkeypatch.setenv("BLDA_MEMORY_GIB", repr((need - 4096) / 2**30))
    out = tmp_path / "s.h5"
    result = run("fit-stats", stores["src"], "--label-source", labels, "--out", out, ok=False)
    assert_error(result, f"--bins 4096: fitting needs about {need / 2**30:.2f} GiB", "--bins ")
    assert not out.exists()
    monkeypatch.setenv("BLDA_MEMORY_GIB", repr((need + 4096) / 2**30))
    run("fit-stats", stores["src"], "--label-source", labels, "--out", out)
    assert out.exists()


@pytest.mark.parametrize("value", ["x", "0", "-1", "nan", "inf"])
def test_a_bad_memory_budget_is_one_line(tmp_path, stores, monkeypatch, value):
    monkeypatch.setenv("BLDA_MEMORY_GIB", value)
    stats = declared_stats(tmp_path / "s.h5", 4, 64)
    result = run("evaluate", stores["tgt"], "--stats", stats, ok=False)
    assert_error(result, "BLDA_MEMORY_GIB must be a number of GiB above 0")
    result = run("fit-stats", stores["src"], "--out", tmp_path / "new.h5", ok=False)
    assert_error(result, "BLDA_MEMORY_GIB must be a number of GiB above 0")
    assert not (tmp_path / "new.h5").exists()


@pytest.mark.parametrize(
    "exc, oom",
    [
        (MemoryError(), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("an unrelated bug"), False),
    ],
)
def test_a_failed_allocation_is_one_line_with_what_lowers_it(
    tmp_path, stores, monkeypatch, exc, oom
):
    """Building the correction's tables runs out of memory: one line, exit 1, the remedy named;
    any other RuntimeError is not disguised as one."""
    from blda_posthoc.pipelines import corrections

    stats = tmp_path / "s.h5"
    run("fit-stats", stores["src"], "--out", stats)

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(corrections, "build_maps", fail)
    result = run("evaluate", stores["tgt"], "--stats", stats, "--method", "blda", ok=False)
    if oom:
        assert_error(result, "out of memory", "--bins")
    else:
        assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)
        assert "an unrelated bug" in str(result.exception)
