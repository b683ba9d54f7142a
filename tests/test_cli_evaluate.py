"""``blda evaluate`` end to end with CliRunner, checked against independent computations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from blda_posthoc.cli import main
from blda_posthoc.io.images import find_files, read_label
from blda_posthoc.io.store import StoreWriter

NAMES = ["road", "wall", "pole", "sky"]


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["evaluate", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def reference(pairs: list[tuple[np.ndarray, np.ndarray]], c: int) -> dict[str, object]:
    """mIoU, mAcc and per-class IoU from a plain bincount confusion matrix."""
    m = np.zeros((c, c), dtype=np.int64)
    for pred, label in pairs:
        v = label != 255
        m += np.bincount(label[v].astype(np.int64) * c + pred[v], minlength=c * c).reshape(c, c)
    tp, rows, cols = np.diag(m), m.sum(1), m.sum(0)
    union = rows + cols - tp
    iou = [100 * t / u if u else None for t, u in zip(tp, union, strict=True)]
    acc = [100 * t / r if r else None for t, r in zip(tp, rows, strict=True)]
    return {
        "miou": np.mean([x for x in iou if x is not None]),
        "macc": np.mean([x for x in acc if x is not None]),
        "iou": iou,
        "acc": acc,
    }


def noisy_predictions(logits_dir: Path, pred_dir: Path, seed: int = 0) -> None:
    """Write argmax predictions with a few random flips as trainId PNGs."""
    rng = np.random.default_rng(seed)
    for name, path in find_files(logits_dir, (".npy",)).items():
        pred = np.load(path).argmax(0).astype(np.uint8)
        flip = rng.random(pred.shape) < 0.05
        pred[flip] = rng.integers(0, 4, flip.sum())
        (pred_dir / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred).save(pred_dir / f"{name}.png")


def pairs_from_dirs(pred_dir: Path, labels_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    labels = find_files(labels_dir, (".png",))
    return [
        (np.asarray(Image.open(pred_dir / f"{n}.png")).astype(np.int64), read_label(p))
        for n, p in labels.items()
    ]


@pytest.fixture
def pred_case(tmp_path: Path, npy_case: tuple[Path, Path]) -> tuple[Path, Path]:
    logits_dir, labels_dir = npy_case
    pred_dir = tmp_path / "pred"
    noisy_predictions(logits_dir, pred_dir)
    return pred_dir, labels_dir


def test_pred_dir_json_matches_independent_confusion(
    tmp_path: Path, pred_case: tuple[Path, Path]
) -> None:
    pred_dir, labels_dir = pred_case
    out = tmp_path / "out" / "a.json"
    code, stdout, stderr = run(
        "--pred-dir",
        pred_dir,
        "--labels",
        labels_dir,
        "--class-names",
        ",".join(NAMES),
        "--json",
        out,
    )
    assert code == 0, stderr
    report = json.loads(out.read_text())
    ref = reference(pairs_from_dirs(pred_dir, labels_dir), 4)
    assert report["miou"] == pytest.approx(ref["miou"], abs=0.01)
    assert report["macc"] == pytest.approx(ref["macc"], abs=0.01)
    assert list(report["per_class"]) == NAMES
    for k, name in enumerate(NAMES):
        entry = report["per_class"][name]
        assert set(entry) >= {"iou", "acc", "bias", "pred_true_ratio"}
        assert entry["iou"] == pytest.approx(ref["iou"][k], abs=0.01)  # type: ignore[index]
        assert entry["acc"] == pytest.approx(ref["acc"][k], abs=0.01)  # type: ignore[index]
    assert report["num_images"] == 6
    assert report["settings"]["source"] == "pred_dir"
    assert "mIoU" in stdout and "road" in stdout
    assert "inferred" not in stderr


def test_inferred_class_count_is_announced(tmp_path: Path, pred_case: tuple[Path, Path]) -> None:
    pred_dir, labels_dir = pred_case
    out = tmp_path / "a.json"
    code, _, stderr = run("--pred-dir", pred_dir, "--labels", labels_dir, "--json", out)
    assert code == 0, stderr
    assert "inferred 4 classes" in stderr
    report = json.loads(out.read_text())
    assert list(report["per_class"]) == ["class_0", "class_1", "class_2", "class_3"]
    ref = reference(pairs_from_dirs(pred_dir, labels_dir), 4)
    assert report["miou"] == pytest.approx(ref["miou"], abs=0.01)


def test_absent_class_is_null_and_out_of_range_predictions_count_as_wrong(
    tmp_path: Path,
) -> None:
    labels, preds = tmp_path / "labels", tmp_path / "pred"
    labels.mkdir()
    preds.mkdir()
    Image.fromarray(np.array([[0, 0], [1, 255]], dtype=np.uint8)).save(labels / "x.png")
    Image.fromarray(np.array([[0, 7], [1, 1]], dtype=np.uint8)).save(preds / "x.png")
    out = tmp_path / "a.json"
    code, _, stderr = run(
        "--pred-dir", preds, "--labels", labels, "--num-classes", 3, "--json", out
    )
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert report["per_class"]["class_2"]["iou"] is None  # neither labelled nor predicted
    assert report["per_class"]["class_2"]["pred_true_ratio"] is None
    assert report["per_class"]["class_0"]["iou"] == pytest.approx(50.0)  # 7 is a miss
    assert report["miou"] == pytest.approx(75.0)
    assert "outside 0..2" in stderr
    assert "NaN" not in out.read_text()


def test_missing_prediction_is_a_one_line_error(
    tmp_path: Path, pred_case: tuple[Path, Path]
) -> None:
    pred_dir, labels_dir = pred_case
    (pred_dir / "city_b" / "img_003.png").unlink()
    code, stdout, stderr = run("--pred-dir", pred_dir, "--labels", labels_dir)
    assert code == 1
    assert stderr.startswith("error: ") and stderr.count("\n") == 1
    assert "img_003" in stderr and "Traceback" not in stderr
    out = tmp_path / "a.json"
    code, _, stderr = run(
        "--pred-dir", pred_dir, "--labels", labels_dir, "--allow-missing", "--json", out
    )
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert report["num_images"] == 5 and report["num_missing_predictions"] == 1


def test_size_mismatch_names_the_file(tmp_path: Path, pred_case: tuple[Path, Path]) -> None:
    pred_dir, labels_dir = pred_case
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(pred_dir / "city_a" / "img_000.png")
    code, _, stderr = run("--pred-dir", pred_dir, "--labels", labels_dir)
    assert code == 1 and "img_000.png" in stderr and "5x5" in stderr


def test_json_is_not_overwritten_without_flag(tmp_path: Path, pred_case: tuple[Path, Path]) -> None:
    pred_dir, labels_dir = pred_case
    out = tmp_path / "a.json"
    out.write_text("keep")
    code, _, stderr = run("--pred-dir", pred_dir, "--labels", labels_dir, "--json", out)
    assert code == 1 and "already exists" in stderr and "--overwrite" in stderr
    assert out.read_text() == "keep"
    code, _, stderr = run(
        "--pred-dir", pred_dir, "--labels", labels_dir, "--json", out, "--overwrite"
    )
    assert code == 0, stderr
    assert "miou" in json.loads(out.read_text())


def test_usage_errors_exit_2(pred_case: tuple[Path, Path], tmp_path: Path) -> None:
    pred_dir, labels_dir = pred_case
    assert run("--labels", labels_dir)[0] == 2
    assert run("--pred-dir", pred_dir)[0] == 2
    assert run("--pred-dir", pred_dir, "--labels", labels_dir, "--store", "x.h5")[0] == 2
    code, _, err = run("x.h5", "--pred-dir", pred_dir)  # where the labels come from is said
    assert code == 2 and "--pred-dir DIR (PNG predictions, scored against --labels DIR)" in err
    stats = tmp_path / "s.h5"
    stats.write_text("")
    assert run("--pred-dir", pred_dir, "--labels", labels_dir, "--stats", stats)[0] == 2


def test_markdown_and_plot(tmp_path: Path, pred_case: tuple[Path, Path]) -> None:
    pred_dir, labels_dir = pred_case
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    code, _, stderr = run(
        "--pred-dir", pred_dir, "--labels", labels_dir, "--markdown", md, "--plot", png
    )
    assert code == 0, stderr
    text = md.read_text()
    assert "| class | IoU | Acc | Bias | pred/true |" in text and "class_3" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(
    tmp_path: Path, pred_case: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pred_dir, labels_dir = pred_case
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, stderr = run(
        "--pred-dir", pred_dir, "--labels", labels_dir, "--plot", tmp_path / "r.png"
    )
    assert code == 1
    assert stderr.startswith("error: --plot needs matplotlib") and "[plot]" in stderr


# ---------------------------------------------------------------- stores


def write_store(
    path: Path,
    logits_dir: Path,
    labels_dir: Path,
    names: list[str] | None = None,
    stride: int = 1,
    with_labels: bool = True,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Store (optionally subsampled) logits; return the reference argmax/label pairs."""
    pairs = []
    with StoreWriter(path, NAMES, dtype="float32") as writer:
        for name, file in find_files(logits_dir, (".npy",)).items():
            if names is not None and name not in names:
                continue
            label = read_label(labels_dir / f"{name}.png")
            logits = np.load(file)[:, ::stride, ::stride]
            writer.write(name, logits, label if with_labels else None, size=label.shape)
            up = F.interpolate(
                torch.from_numpy(logits)[None],
                size=label.shape,
                mode="bilinear",
                align_corners=False,
            )[0]
            pairs.append((up.argmax(0).numpy(), label))
    return pairs


def test_store_argmax_upsampled_to_label_size(tmp_path: Path, npy_case: tuple[Path, Path]) -> None:
    logits_dir, labels_dir = npy_case
    store = tmp_path / "s.h5"
    pairs = write_store(store, logits_dir, labels_dir, stride=2)
    out = tmp_path / "a.json"
    code, stdout, stderr = run("--store", store, "--json", out, "--device", "cpu")
    assert code == 0, stderr
    report = json.loads(out.read_text())
    ref = reference(pairs, 4)
    assert report["miou"] == pytest.approx(ref["miou"], abs=0.01)
    assert report["macc"] == pytest.approx(ref["macc"], abs=0.01)
    assert 0 <= report["ece"] <= 100
    assert report["settings"]["source"] == "store"
    assert "ECE" in stdout


def test_store_shards_by_glob_equal_one_store(tmp_path: Path, npy_case: tuple[Path, Path]) -> None:
    logits_dir, labels_dir = npy_case
    names = list(find_files(logits_dir, (".npy",)))
    write_store(tmp_path / "all.h5", logits_dir, labels_dir)
    write_store(tmp_path / "shard_0.h5", logits_dir, labels_dir, names[:2])
    write_store(tmp_path / "shard_1.h5", logits_dir, labels_dir, names[2:])
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert run("--store", tmp_path / "all.h5", "--json", one)[0] == 0
    code, _, stderr = run("--store", str(tmp_path / "shard_*.h5"), "--json", two)
    assert code == 0, stderr
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    a.pop("settings")
    b.pop("settings")
    assert a == b


def test_store_labels_from_folder(tmp_path: Path, npy_case: tuple[Path, Path]) -> None:
    logits_dir, labels_dir = npy_case
    store = tmp_path / "s.h5"
    pairs = write_store(store, logits_dir, labels_dir, with_labels=False)
    code, _, stderr = run("--store", store)
    assert code == 1 and "no label" in stderr
    out = tmp_path / "a.json"
    code, _, stderr = run("--store", store, "--labels", labels_dir, "--json", out)
    assert code == 0, stderr
    assert json.loads(out.read_text())["miou"] == pytest.approx(
        reference(pairs, 4)["miou"], abs=0.01
    )


def test_stats_before_after(tmp_path: Path, npy_case: tuple[Path, Path]) -> None:
    from blda_posthoc.core.align import build_maps
    from blda_posthoc.core.correct import correct_image
    from blda_posthoc.core.methods import Aligned
    from blda_posthoc.io.stats import read_stats, write_stats
    from blda_posthoc.io.store import LogitStore
    from blda_posthoc.pipelines.fit_stats import FitOptions, fit_store

    logits_dir, labels_dir = npy_case
    store, stats = tmp_path / "s.h5", tmp_path / "stats.h5"
    pairs = write_store(store, logits_dir, labels_dir)
    with LogitStore([store]) as s:
        write_stats(stats, fit_store(s, FitOptions(labels="gt", min_pixels=10)))
    plain, both = tmp_path / "plain.json", tmp_path / "both.json"
    assert run("--store", store, "--json", plain)[0] == 0
    code, stdout, stderr = run(
        "--store", store, "--stats", stats, "--method", "blda", "--tau", 0.5, "--json", both
    )
    assert code == 0, stderr
    report = json.loads(both.read_text())
    assert set(report) >= {"before", "after", "settings", "num_images"}
    before = json.loads(plain.read_text())
    assert before.pop("format") == report["format"] == "blda-evaluate"
    assert before.pop("version") == report["version"] == 1
    for key in ("settings", "num_images", "num_missing_predictions", "num_unlabelled_predictions"):
        before.pop(key)
    assert report["before"] == before
    assert report["settings"]["tau"] == 0.5 and report["settings"]["clamp"] == 0.01
    assert report["settings"]["stats_fingerprint"] == read_stats(stats).fingerprint
    assert "Δ" in stdout
    # after: the correction API's own predictions, scored by an independent confusion matrix
    st = read_stats(stats)
    maps = build_maps(st, st, clamp=0.01)
    corrected = []
    with LogitStore([store]) as s:
        for record in s:
            pred, _ = correct_image(
                torch.from_numpy(record.logits), record.size, Aligned(maps), 0.5
            )
            corrected.append((pred.numpy(), record.label))
    ref_after = reference(corrected, 4)  # type: ignore[arg-type]
    assert report["after"]["miou"] == pytest.approx(ref_after["miou"], abs=0.01)
    assert report["after"]["miou"] != pytest.approx(report["before"]["miou"], abs=0.01)
    assert report["before"]["miou"] == pytest.approx(reference(pairs, 4)["miou"], abs=0.01)
    # tau = 0 gives the plain argmax after as well
    zero = tmp_path / "zero.json"
    assert (
        run("--store", store, "--stats", stats, "--method", "blda", "--tau", 0, "--json", zero)[0]
        == 0
    )
    z = json.loads(zero.read_text())
    assert z["after"]["per_class"] == z["before"]["per_class"]


def test_colour_previews_skipped_and_extra_predictions_warned(
    tmp_path: Path, pred_case: tuple[Path, Path]
) -> None:
    pred_dir, labels_dir = pred_case
    rgb = np.zeros((24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(pred_dir / "city_a" / "img_000_color.png")
    code, _, stderr = run("--pred-dir", pred_dir, "--labels", labels_dir, "--num-classes", 4)
    assert code == 0, stderr
    assert "warning" not in stderr
    Image.fromarray(rgb[..., 0]).save(pred_dir / "extra.png")
    code, _, stderr = run("--pred-dir", pred_dir, "--labels", labels_dir, "--num-classes", 4)
    assert code == 0 and "warning: 1 predictions have no label" in stderr


def test_label_beyond_num_classes_names_the_label(
    tmp_path: Path, pred_case: tuple[Path, Path]
) -> None:
    pred_dir, labels_dir = pred_case
    code, _, stderr = run("--pred-dir", pred_dir, "--labels", labels_dir, "--num-classes", 3)
    assert code == 1
    assert stderr.startswith("error: ") and "labels/city_a/img_000.png" in stderr
    assert "label value 3 is outside 0..2" in stderr


def test_pred_dir_takes_the_class_names_of_correct_json(
    tmp_path: Path, npy_case: tuple[Path, Path]
) -> None:
    """``correct`` names the classes in ``correct.json`` beside its PNGs: evaluate reads them."""
    logits_dir, labels_dir = npy_case
    store = tmp_path / "s.h5"
    write_store(store, logits_dir, labels_dir)
    pred = tmp_path / "pred"
    result = CliRunner().invoke(
        main, ["correct", str(store), "--method", "none", "--out-dir", str(pred)]
    )
    assert result.exit_code == 0, result.output
    out, from_store = tmp_path / "a.json", tmp_path / "s.json"
    code, stdout, stderr = run("--pred-dir", pred, "--labels", labels_dir, "--json", out)
    assert code == 0, stderr
    assert f"class names from {pred / 'correct.json'}" in stderr and "inferred" not in stderr
    report = json.loads(out.read_text())
    assert list(report["per_class"]) == NAMES and "road" in stdout
    assert run(store, "--json", from_store)[0] == 0
    assert report["per_class"] == json.loads(from_store.read_text())["per_class"]
    # --class-names / --num-classes still decide when given.
    code, _, stderr = run("--pred-dir", pred, "--labels", labels_dir, "--num-classes", 4,
                          "--json", out, "--overwrite")  # fmt: skip
    assert code == 0 and list(json.loads(out.read_text())["per_class"])[0] == "class_0"
    # A summary that is not correct's is refused, naming it.
    (pred / "correct.json").write_text('{"format": "blda-evaluate"}')
    code, _, stderr = run("--pred-dir", pred, "--labels", labels_dir)
    assert code == 1 and "correct.json: not a 'blda-correct' summary" in stderr
