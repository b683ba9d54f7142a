"""``blda relabel --weights-out``: per-pixel quality weights beside the pseudo-labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_relabel import C, write_store  # the same labelled stores as the relabel tests

from blda_posthoc.cli import main
from blda_posthoc.core.correct import correct_image
from blda_posthoc.io.stats import write_stats
from blda_posthoc.io.store import LogitStore
from blda_posthoc.pipelines.corrections import CorrectionSpec, load_correction
from blda_posthoc.pipelines.fit_stats import FitOptions, fit_store

ARGS = ("--method", "blda", "--tau", "0.5", "--keep-portion", "0.6")


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    write_store(root / "src.h5", seed=1)
    write_store(root / "tgt.h5", seed=2)
    with LogitStore([root / "src.h5"]) as store:
        write_stats(root / "src_stats.h5", fit_store(store, FitOptions(labels="gt")))
    relabel_ok(root / "tgt.h5", root / "src_stats.h5", root / "pl", root / "w", *ARGS)
    return {"root": root, "store": root / "tgt.h5", "stats": root / "src_stats.h5"}


def run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["relabel", *map(str, args)])
    return result.exit_code, result.stderr


def relabel_ok(store: Path, stats: Path, out: Path, weights: Path, *extra: object) -> None:
    code, err = run(store, "--stats", stats, "--out-dir", out, "--weights-out", weights, *extra)
    assert code == 0, err


def reference_confidence(case: dict[str, Path], tau: float) -> dict[str, np.ndarray]:
    """Per image, the top softmax entry of the corrected scores, in float64 numpy."""
    out = {}
    with LogitStore([case["store"]]) as store:
        ready = load_correction(
            CorrectionSpec(method="blda", tau=tau, stats=case["stats"]), store.class_names
        )
        for name in store.names:
            rec = store.read(name)
            scores = correct_image(torch.from_numpy(rec.logits), rec.size, ready.corrector, tau)[1]
            s = scores.double().numpy()
            e = np.exp(s - s.max(0, keepdims=True))
            out[name] = (e / e.sum(0)).max(0)
    return out


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


def files_of(root: Path) -> dict[Path, bytes]:
    return {
        p.relative_to(root): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".blda-run")
    }


def test_png_weights_are_the_quantised_corrected_confidence(case):
    root = case["root"]
    ref = reference_confidence(case, 0.5)
    assert len(ref) == 6
    ignored = kept = 0
    for name, conf in ref.items():
        label, weight = png(root / "pl" / f"{name}.png"), png(root / "w" / f"{name}.png")
        assert weight.shape == label.shape == conf.shape
        assert weight.min() >= 0 and weight.max() <= 255
        assert (weight[label == 255] == 0).all()
        on = label != 255
        # Within quantisation: round(255 * c) is at most half a step from 255 * c.
        assert np.abs(weight[on] - 255 * conf[on]).max() <= 0.5 + 1e-3
        # A kept pixel's class has at least 1/C of the probability, so its weight is positive.
        assert (weight[on] >= np.floor(255 / C)).all()
        ignored, kept = ignored + int((~on).sum()), kept + int(on.sum())
    assert ignored > 0 and kept > 0  # the keep-portion leaves both kinds of pixels
    manifest = json.loads((root / "pl" / "manifest.json").read_text())
    assert manifest["settings"]["weights_format"] == "png"
    assert sorted(p.name for p in (root / "w").iterdir()) == [
        ".blda-run.json",
        "city_a",
        "city_b",
    ]


def test_npy_weights_are_float16_confidence_and_labels_unchanged(case, tmp_path):
    root = case["root"]
    relabel_ok(
        case["store"], case["stats"], tmp_path / "pl", tmp_path / "w", *ARGS,
        "--weights-format", "npy",
    )  # fmt: skip
    ref = reference_confidence(case, 0.5)
    for name, conf in ref.items():
        label = png(tmp_path / "pl" / f"{name}.png")
        assert (label == png(root / "pl" / f"{name}.png")).all()  # the weights change no label
        weight = np.load(tmp_path / "w" / f"{name}.npy", allow_pickle=False)
        assert weight.dtype == np.float16 and weight.shape == label.shape
        assert (weight[label == 255] == 0).all()
        on = label != 255
        assert np.allclose(weight[on].astype(np.float64), conf[on], rtol=1e-3, atol=1e-4)


def test_resume_keeps_finished_weights_and_overwrite_is_refused(case, tmp_path):
    root = case["root"]
    out, weights = tmp_path / "pl", tmp_path / "w"
    shutil.copytree(root / "pl", out)
    shutil.copytree(root / "w", weights)
    labels_before, weights_before = files_of(out), files_of(weights)
    base = (case["store"], "--stats", case["stats"], "--out-dir", out, "--weights-out", weights)
    code, err = run(*base, *ARGS)
    assert code == 1 and err.startswith("error:") and "already exists" in err
    assert err.count("\n") == 1
    (weights / "city_a" / "img_002.png").unlink()  # a weight lost: its image is redone
    (out / "city_b" / "img_003.png").unlink()  # a label lost: its weight is rewritten too
    code, err = run(*base, *ARGS, "--resume")
    assert code == 0, err
    assert "wrote 2 pseudo-labels (kept 4 existing)" in err
    assert files_of(out) == labels_before and files_of(weights) == weights_before
    code, err = run(*base, *ARGS, "--weights-format", "npy", "--resume")
    assert code == 1 and "other settings" in err and err.count("\n") == 1
    code, err = run(*base, *ARGS, "--weights-format", "npy", "--overwrite")
    assert code == 0, err
    assert sorted(p.suffix for p in (weights / "city_a").iterdir()) == [".npy"] * 3


def test_shards_write_the_weights_of_one_process(case, tmp_path):
    out, weights = tmp_path / "pl", tmp_path / "w"
    base = (case["store"], "--stats", case["stats"], "--out-dir", out, "--weights-out", weights)
    for k in (1, 2):
        code, err = run(*base, *ARGS, "--count-only", "--shard", f"{k}/2")
        assert code == 0, err
    for k in (1, 2):
        code, err = run(*base, *ARGS, "--shard", f"{k}/2")
        assert code == 0, err
    one = files_of(case["root"] / "w")
    assert files_of(weights) == one and len(one) == 6
    labels = {p: b for p, b in files_of(out).items() if p.suffix == ".png"}
    assert labels == {p: b for p, b in files_of(case["root"] / "pl").items() if p.suffix == ".png"}


def test_weights_options_are_checked(case, tmp_path):
    base = (case["store"], "--stats", case["stats"], "--out-dir", tmp_path / "pl")
    code, err = run(*base, "--weights-format", "npy")
    assert code == 2 and "--weights-out" in err
    for bad in (tmp_path / "pl", tmp_path / "pl" / "w", tmp_path):
        code, err = run(*base, "--weights-out", bad)
        assert code == 1 and err.startswith("error:") and "overlaps --out-dir" in err
        assert err.count("\n") == 1
    code, err = run(*base, "--weights-out", case["root"])  # holds the store: an input
    assert code == 1 and "--weights-out is also an input" in err and err.count("\n") == 1
    assert not (tmp_path / "pl").exists()  # refused before writing anything
    code, err = run("--merge", tmp_path / "manifest-1-of-2.json", "--weights-out", tmp_path / "w")
    assert code == 2 and "--weights-out" in err


def test_out_suffix_names_labels_and_weights_as_mmsegmentation_reads_them(case, tmp_path):
    root = case["root"]
    out, weights = tmp_path / "pl", tmp_path / "w"
    suffix = "_gtFine_labelTrainIds"
    relabel_ok(case["store"], case["stats"], out, weights, *ARGS, "--out-suffix", suffix)
    plain_labels, plain_weights = files_of(root / "pl"), files_of(root / "w")
    # What CityscapesDataset does: image NAME_leftImg8bit.png -> annotation NAME<suffix>.png.
    for rel in (p for p in plain_labels if p.suffix == ".png"):
        image = f"{rel.with_suffix('').as_posix()}_leftImg8bit.png"
        annotation = image.replace("_leftImg8bit.png", f"{suffix}.png")
        assert (out / annotation).read_bytes() == plain_labels[rel]
        assert (weights / annotation).read_bytes() == plain_weights[rel]
    assert len([p for p in files_of(out) if p.suffix == ".png"]) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["out_suffix"] == suffix
    (out / f"city_a/img_002{suffix}.png").unlink()
    code, err = run(
        case["store"], "--stats", case["stats"], "--out-dir", out, "--weights-out", weights,
        *ARGS, "--out-suffix", suffix, "--resume",
    )  # fmt: skip
    assert code == 0 and "wrote 1 pseudo-labels (kept 5 existing)" in err, err
    for bad in ("a/b", "_x.png", "\\x"):
        code, err = run(case["store"], "--stats", case["stats"], "--out-dir", tmp_path / "o",
                        "--out-suffix", bad)  # fmt: skip
        assert code == 2 and "--out-suffix" in err
