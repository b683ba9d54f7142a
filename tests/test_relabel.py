"""``blda relabel``: core selection, manifest against direct counts, CLI end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import make_labels, make_logits
from PIL import Image

from blda_posthoc.cli import main
from blda_posthoc.core.classes import palette_for
from blda_posthoc.core.correct import correct_image
from blda_posthoc.core.relabel import (
    ConfidenceHistogram,
    LogOddsGrid,
    confidence_logodds,
    keep_thresholds,
    select,
    transitions,
)
from blda_posthoc.io.stats import write_stats
from blda_posthoc.io.store import LogitStore, StoreWriter
from blda_posthoc.pipelines.corrections import CorrectionSpec, load_correction
from blda_posthoc.pipelines.fit_stats import FitOptions, fit_store

C = 5
NAMES = ["road", "wall", "pole", "sky", "car"]
BIAS = np.array([-1.5, -0.5, 0.0, 0.8, 1.5], dtype=np.float32)


def write_store(path: Path, seed: int, n: int = 6, size: tuple[int, int] = (32, 48)) -> None:
    """A labelled store whose logits favour the last classes; one image at half resolution."""
    rng = np.random.default_rng(seed)
    with StoreWriter(path, NAMES, dtype="float32") as writer:
        for i in range(n):
            label = make_labels(rng, C, *size)
            logits = make_logits(rng, label, C, BIAS)
            if i == 0:  # logits at half the image size: outputs must come back at full size
                logits = F.avg_pool2d(torch.from_numpy(logits)[None], 2)[0].numpy()
            writer.write(f"city_{'ab'[i % 2]}/img_{i:03d}", logits, label, size)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("relabel")
    write_store(root / "src.h5", seed=1)
    write_store(root / "tgt.h5", seed=2)
    with LogitStore([root / "src.h5"]) as store:
        write_stats(root / "src_stats.h5", fit_store(store, FitOptions(labels="gt")))
    return {"root": root, "store": root / "tgt.h5", "stats": root / "src_stats.h5"}


KEEP_ARGS = ("--tau", "0.5", "--keep-portion", "0.6", "--color")


@pytest.fixture(scope="module")
def runs(case: dict[str, Path]) -> dict[str, Path]:
    """Outputs shared by several tests: ``--tau 0.5`` and ``--tau 0.5 --keep-portion 0.6``."""
    relabel(case, case["root"] / "tau05", "--tau", "0.5")
    relabel(case, case["root"] / "keep06", *KEEP_ARGS)
    return {"tau05": case["root"] / "tau05", "keep06": case["root"] / "keep06"}


def run(*args: object) -> tuple[int, str]:
    words = list(map(str, args))
    if "--stats" in words and "--method" not in words:
        words += ["--method", "blda"]  # these tests are about relabel, with the BLDA correction
    result = CliRunner().invoke(main, ["relabel", *words])
    return result.exit_code, result.stderr


def relabel(case: dict[str, Path], out: Path, *extra: object) -> dict:
    code, err = run(case["store"], "--stats", case["stats"], "--out-dir", out, *extra)
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text())


def images(store_path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, argmax at image size, label)`` computed independently of the package."""
    out = []
    with LogitStore([store_path]) as store:
        for name in store.names:
            rec = store.read(name)
            z = torch.from_numpy(rec.logits)[None]
            z = F.interpolate(z, size=rec.size, mode="bilinear", align_corners=False)[0]
            out.append((name, z.argmax(0).numpy(), rec.label))
    return out


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


def miou(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """mIoU and pixel accuracy (percent) over pixels where neither side is 255."""
    m = np.zeros((C, C), dtype=np.int64)
    for pred, label in pairs:
        v = (label != 255) & (pred != 255)
        m += np.bincount(label[v] * C + pred[v], minlength=C * C).reshape(C, C)
    tp, union = np.diag(m), m.sum(0) + m.sum(1) - np.diag(m)
    return float(np.mean(100 * tp[union > 0] / union[union > 0])), 100 * tp.sum() / m.sum()


def outputs(out: Path, names: list[str]) -> dict[str, np.ndarray]:
    return {n: read_png(out / f"{n}.png") for n in names}


# ------------------------------------------------------------------ what issue 5 requires


def test_tau_half_with_source_stats_beats_plain_argmax(case, runs):
    manifest = json.loads((runs["tau05"] / "manifest.json").read_text())
    ref = images(case["store"])
    after = outputs(runs["tau05"], [n for n, _, _ in ref])
    before_miou, before_acc = miou([(p, y) for _, p, y in ref])
    after_miou, after_acc = miou([(after[n], y) for n, _, y in ref])
    assert after_miou > before_miou + 3.0
    assert manifest["quality"]["argmax"]["miou"] == pytest.approx(before_miou, abs=1e-4)
    assert manifest["quality"]["relabelled"]["miou"] == pytest.approx(after_miou, abs=1e-4)
    assert manifest["quality"]["relabelled"]["pixel_acc"] == pytest.approx(after_acc, abs=1e-4)
    assert manifest["ignore_fraction"] == 0.0
    for name, pred, label in ref:  # each image's size, not the logits' size
        assert after[name].shape == label.shape == pred.shape


def test_keep_portion_ignores_the_rest_and_keeps_the_accurate_pixels(case, runs):
    manifest = json.loads((runs["keep06"] / "manifest.json").read_text())
    ref = images(case["store"])
    kept = outputs(runs["keep06"], [n for n, _, _ in ref])
    every = outputs(runs["tau05"], [n for n, _, _ in ref])
    ignored = sum(int((kept[n] == 255).sum()) for n, _, _ in ref)
    total = sum(kept[n].size for n, _, _ in ref)
    assert abs(ignored / total - 0.4) < 0.01
    assert manifest["ignore_fraction"] == pytest.approx(ignored / total, abs=1e-6)
    for name, entry in manifest["thresholds"].items():  # per class, not just overall
        k = NAMES.index(name)
        assigned = sum(int((every[n] == k).sum()) for n, _, _ in ref)
        still = sum(int((kept[n] == k).sum()) for n, _, _ in ref)
        assert entry["pixels"] == assigned
        assert abs(still / assigned - 0.6) <= 0.005
        assert entry["portion_kept_fraction"] == pytest.approx(still / assigned, abs=1e-6)
        assert 0.0 < entry["portion_confidence"] < 1.0
    # Kept pixels are relabelled identically to the unfiltered run and are more accurate.
    for n, _, _ in ref:
        v = kept[n] != 255
        assert (kept[n][v] == every[n][v]).all()
    _, acc_kept = miou([(kept[n], y) for n, _, y in ref])
    _, acc_all = miou([(every[n], y) for n, _, y in ref])
    assert acc_kept > acc_all + 5.0
    assert manifest["quality"]["relabelled"]["coverage"] == pytest.approx(0.6, abs=0.02)


# ------------------------------------------------------------------ core


def scores_of(case: dict[str, Path], tau: float) -> list[torch.Tensor]:
    with LogitStore([case["store"]]) as store:
        ready = load_correction(CorrectionSpec(stats=case["stats"]), store.class_names)
        return [
            correct_image(torch.from_numpy(r.logits), r.size, ready.corrector, tau)[1]
            for r in (store.read(n) for n in store.names)
        ]


def test_keep_thresholds_agree_with_numpy_quantiles(case):
    scores = scores_of(case, 0.5)
    grid = LogOddsGrid.for_classes(C)
    hist = ConfidenceHistogram(C, grid)
    preds, keys = [], []
    for s in scores:
        p, k = confidence_logodds(s)
        hist.update(p, k)
        preds.append(p.reshape(-1).numpy())
        keys.append(k.reshape(-1).numpy().astype(np.float64))
    pred, key = np.concatenate(preds), np.concatenate(keys)
    for portion in (0.2, 0.6, 0.9):
        th = keep_thresholds(hist.counts(), grid, portion)
        for c in range(C):
            kc = key[pred == c]
            # Independent reference: the (1 - P) quantile, and the fraction at or above it.
            lo, hi = np.quantile(kc, [1 - portion - 0.005, 1 - portion + 0.005])
            assert lo - grid.step <= th.logodds[c] <= hi + grid.step
            kept = int((np.floor((kc - grid.lo) / grid.step) >= th.bins[c]).sum())
            assert kept == th.kept[c] and th.pixels[c] == kc.size
            assert abs(kept / kc.size - portion) <= 0.005


def test_confidence_is_the_top_softmax_entry_without_saturation():
    s = torch.tensor([[0.0, 30.0, 2.0], [1.0, 0.0, 2.0], [-1.0, 0.0, 2.0]])
    pred, key = confidence_logodds(s)
    assert pred.tolist() == [1, 0, 0]  # pixels are columns; ties go to the first class
    probs = torch.softmax(s.double(), 0).max(0).values
    assert torch.allclose(torch.sigmoid(key.double()), probs, atol=1e-6)
    assert key[1] > 25  # conf rounds to 1 in float32; its log-odds still ranks it


def test_select_applies_min_confidence_and_class_thresholds():
    pred = torch.tensor([0, 0, 1, 1])
    key = torch.tensor([-1.0, 2.0, 0.5, 3.0])
    out = select(pred, key, min_confidence=0.5)  # logodds >= 0
    assert out.tolist() == [255, 0, 1, 1]
    grid = LogOddsGrid(-4.0, 4.0, 8)
    counts = np.zeros((2, 8), dtype=np.int64)
    counts[0, grid.index(key[:2]).numpy()] += 1
    counts[1, grid.index(key[2:]).numpy()] += 1
    th = keep_thresholds(counts, grid, 0.5)
    assert select(pred, key, thresholds=th, grid=grid).tolist() == [255, 0, 255, 1]


def test_transitions_count_ignore_as_an_extra_class():
    before = torch.tensor([0, 1, 255, 2, 2])
    after = torch.tensor([0, 255, 1, 1, 2])
    flow = transitions(before, after, 3)
    assert flow.shape == (4, 4) and flow.sum() == 5
    assert flow[1, 3] == 1 and flow[3, 1] == 1 and flow[2, 1] == 1 and np.trace(flow) == 2
    with pytest.raises(ValueError):
        transitions(torch.tensor([7]), torch.tensor([0]), 3)


# ------------------------------------------------------------------ manifest and options


def write_pseudo(out: Path, ref: list[tuple[str, np.ndarray, np.ndarray]], seed: int = 0) -> None:
    """The user's current pseudo-labels: argmax with a few flips and ignores."""
    rng = np.random.default_rng(seed)
    for name, pred, _ in ref:
        p = pred.astype(np.uint8)
        p[rng.random(p.shape) < 0.05] = 255
        flip = rng.random(p.shape) < 0.05
        p[flip] = rng.integers(0, C, int(flip.sum()))
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(p).save(out / f"{name}.png")


def flow_of(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    f = np.zeros((C + 1, C + 1), dtype=np.int64)
    for a, b in pairs:
        a, b = np.where(a == 255, C, a), np.where(b == 255, C, b)
        f += np.bincount((a * (C + 1) + b).ravel(), minlength=(C + 1) ** 2).reshape(C + 1, -1)
    np.fill_diagonal(f, 0)
    return f


def test_manifest_numbers_match_a_direct_count(case, tmp_path):
    ref = images(case["store"])
    write_pseudo(tmp_path / "pseudo", ref)
    out = tmp_path / "m"
    args = ("--tau", "0.5", "--min-confidence", "0.6", "--pseudo-dir", tmp_path / "pseudo")
    manifest = relabel(case, out, *args)
    after = outputs(out, [n for n, _, _ in ref])
    pseudo = outputs(tmp_path / "pseudo", [n for n, _, _ in ref])
    counts = sum(
        np.bincount(np.where(a == 255, C, a).ravel(), minlength=C + 1) for a in after.values()
    )
    assert manifest["pixels"]["relabelled"] == dict(
        zip([*NAMES, "ignore"], counts.tolist(), strict=True)
    )
    argmax_counts = sum(np.bincount(p.ravel(), minlength=C + 1) for _, p, _ in ref)
    assert manifest["pixels"]["argmax"] == dict(
        zip([*NAMES, "ignore"], argmax_counts.tolist(), strict=True)
    )
    assert manifest["num_pixels"] == counts.sum() and manifest["num_images"] == len(ref)
    assert manifest["ignore_fraction"] == pytest.approx(counts[-1] / counts.sum(), abs=1e-6)
    assert 0 < counts[-1] < counts.sum()
    vs_argmax = flow_of([(p, after[n]) for n, p, _ in ref])
    vs_pseudo = flow_of([(pseudo[n], after[n]) for n, _, _ in ref])
    assert manifest["changes"]["argmax"]["flow"] == vs_argmax.tolist()
    assert manifest["changes"]["pseudo_dir"]["flow"] == vs_pseudo.tolist()
    assert manifest["changes"]["pseudo_dir"]["changed_pixels"] == vs_pseudo.sum()
    assert manifest["flow_labels"] == [*NAMES, "ignore"]
    assert manifest["quality"]["pseudo_dir"]["miou"] == pytest.approx(
        miou([(pseudo[n], y) for n, _, y in ref])[0], abs=1e-4
    )
    assert manifest["settings"]["min_confidence"] == 0.6
    with LogitStore([case["stats"].parent / "src.h5"]) as store:
        fingerprint = fit_store(store, FitOptions(labels="gt")).fingerprint
    assert manifest["statistics"]["stats_fingerprint"] == fingerprint
    assert manifest["statistics"]["anchors"] == str(case["stats"])


def test_pseudo_suffix_reads_a_previous_round_named_with_out_suffix(case, tmp_path):
    ref = images(case["store"])
    suffix = "_gtFine_labelTrainIds"
    relabel(case, tmp_path / "r1", "--tau", "0.5", "--out-suffix", suffix)
    plain = ("--tau", "0.5", "--pseudo-dir", tmp_path / "r1")
    code, err = run(case["store"], "--stats", case["stats"], "--out-dir", tmp_path / "x", *plain)
    assert code == 1 and f"{ref[0][0]}.png: no pseudo-label" in err and err.count("\n") == 1
    manifest = relabel(case, tmp_path / "r2", *plain, "--pseudo-suffix", suffix)
    # The same correction twice: nothing changes against the previous round.
    assert manifest["changes"]["pseudo_dir"]["changed_pixels"] == 0
    assert manifest["settings"]["pseudo_suffix"] == suffix
    code, err = run(case["store"], "--stats", case["stats"], "--out-dir", tmp_path / "y",
                    "--pseudo-suffix", suffix)  # fmt: skip
    assert code == 2 and "--pseudo-suffix" in err and not (tmp_path / "y").exists()


def test_min_confidence_keeps_exactly_the_confident_pixels(case, tmp_path):
    relabel(case, tmp_path / "c", "--tau", "0.5", "--min-confidence", "0.7")
    ref = images(case["store"])
    for (name, _, _), s in zip(ref, scores_of(case, 0.5), strict=True):
        conf = torch.softmax(s.double(), 0).max(0).values.numpy()
        out = read_png(tmp_path / "c" / f"{name}.png")
        clear = np.abs(conf - 0.7) > 1e-5  # float32 vs float64 rounding at the boundary
        assert ((out != 255) == (conf >= 0.7))[clear].all()
        assert (out[out != 255] == s.argmax(0).numpy()[out != 255]).all()


def test_tau_zero_gives_the_plain_argmax_and_color_previews(case, tmp_path):
    manifest = relabel(case, tmp_path / "z", "--tau", "0", "--color")
    palette = palette_for(NAMES)
    for name, pred, _ in images(case["store"]):
        out = read_png(tmp_path / "z" / f"{name}.png")
        assert (out == pred).all()
        color = np.asarray(Image.open(tmp_path / "z" / f"{name}_color.png"))
        assert (color == palette[out]).all()
    assert manifest["changes"]["argmax"]["changed_pixels"] == 0


def files_of(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_relabelling_twice_gives_byte_identical_files(case, runs, tmp_path):
    relabel(case, tmp_path / "again", *KEEP_ARGS)
    first, second = files_of(runs["keep06"]), files_of(tmp_path / "again")
    assert len(first) == 2 * 6 + 2 and Path("manifest.json") in first
    assert Path(".blda-run.json") in first  # the settings that --resume checks
    assert first == second


# ------------------------------------------------------------------ CLI behaviour


def test_refuses_to_overwrite_and_resumes(case, runs, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(runs["keep06"], out)
    original = files_of(out)
    base = (case["store"], "--stats", case["stats"], "--out-dir", out)
    code, err = run(*base, *KEEP_ARGS)
    assert code == 1 and err.startswith("error:") and "already exists" in err
    assert err.count("\n") == 1
    (out / "city_a" / "img_002.png").unlink()
    (out / "city_b" / "img_003_color.png").unlink()
    code, err = run(*base, *KEEP_ARGS, "--resume")
    assert code == 0, err
    assert "wrote 2 pseudo-labels (kept 4 existing)" in err
    assert files_of(out) == original  # the manifest counts the kept images too
    code, err = run(*base, "--tau", "0.5", "--keep-portion", "0.7", "--color", "--resume")
    assert code == 1 and "other settings" in err and err.count("\n") == 1
    code, err = run(*base, "--tau", "0", "--overwrite")
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["settings"]["tau"] == 0.0


def test_bad_inputs_give_one_line_errors(case, tmp_path):
    other = tmp_path / "other.h5"
    with StoreWriter(other, ["a", "b", "c", "d", "e"]) as w:
        w.write("x", np.zeros((C, 4, 4), np.float32))
    with LogitStore([other]) as store:
        write_stats(tmp_path / "other_stats.h5", fit_store(store, FitOptions(labels="pseudo")))
    code, err = run(
        case["store"], "--stats", tmp_path / "other_stats.h5", "--out-dir", tmp_path / "o"
    )
    assert code == 1 and err.startswith("error:") and "class names" in err and err.count("\n") == 1
    ref = images(case["store"])
    write_pseudo(tmp_path / "pseudo", ref)
    (tmp_path / "pseudo" / f"{ref[3][0]}.png").unlink()
    code, err = run(
        case["store"],
        "--stats",
        case["stats"],
        "--out-dir",
        tmp_path / "o",
        "--pseudo-dir",
        tmp_path / "pseudo",
    )
    assert code == 1 and err.startswith("error:") and ref[3][0] in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # refused before writing anything
    code, err = run(
        case["store"],
        "--stats",
        case["stats"],
        "--out-dir",
        tmp_path / "o",
        "--keep-portion",
        "1.5",
    )
    assert code == 2
    code, err = run(case["store"], "--stats", tmp_path / "missing.h5", "--out-dir", tmp_path / "o")
    assert code == 1 and "no such stats file" in err
