"""The Python API (blda_posthoc.api) gives what the commands give on the same data."""

from __future__ import annotations

import doctest
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_case
from PIL import Image

from blda_posthoc import api
from blda_posthoc.cli import main
from blda_posthoc.core.fit import LogitStats

CLASSES = ["class_0", "class_1", "class_2", "class_3"]
API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def run(*args: object) -> None:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + str(result.exception)


def triples(logits_dir: Path, labels_dir: Path | None) -> list[tuple[str, np.ndarray, object]]:
    """``(name, logits, label)`` of a case written by ``write_case``, in file order."""
    out = []
    for path in sorted(logits_dir.rglob("*.npy")):
        name = path.relative_to(logits_dir).with_suffix("").as_posix()
        label = None
        if labels_dir is not None:
            label = np.asarray(Image.open(labels_dir / f"{name}.png"))
        out.append((name, np.load(path), label))
    return out


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Source and target cases, their float32 stores and the stats ``blda fit-stats`` fits.

    The target's logits are stored at half resolution (the label size is the image size).
    """
    root = tmp_path_factory.mktemp("api")
    src_logits, src_labels = write_case(root / "src", num_images=5, seed=1)
    tgt_logits, tgt_labels = write_case(root / "tgt", num_images=5, seed=2, bias_scale=1.5)
    for path in tgt_logits.rglob("*.npy"):
        np.save(path, np.ascontiguousarray(np.load(path)[:, ::2, ::2]))
    paths = {
        "root": root,
        "src_logits": src_logits,
        "src_labels": src_labels,
        "tgt_logits": tgt_logits,
        "tgt_labels": tgt_labels,
    }
    for side in ("src", "tgt"):
        store = root / f"{side}.h5"
        run("import-logits", paths[f"{side}_logits"], "--labels", paths[f"{side}_labels"],
            "--out", store, "--dtype", "float32")  # fmt: skip
        paths[side] = store
    # On the API's default device (the command's `auto` is CUDA where present, and the sample
    # of calibrated logits compared bit for bit below rounds differently there).
    cpu = ("--device", "cpu", "--min-pixels", 10)
    run("fit-stats", paths["src"], "--labels", "gt", *cpu, "--out", root / "s.h5")
    run("fit-stats", paths["tgt"], "--labels", "pseudo", *cpu, "--out", root / "t.h5")
    run("fit-stats", paths["tgt"], "--labels", "pseudo", *cpu,
        "--calibration", root / "s.h5", "--out", root / "tc.h5")  # fmt: skip
    paths["src_stats"], paths["tgt_stats"] = root / "s.h5", root / "t.h5"
    paths["tgt_cal_stats"] = root / "tc.h5"
    return paths


def assert_same_stats(got: LogitStats, want: LogitStats) -> None:
    """Equal counts, extras and settings (but the sources) of two statistics."""
    assert got.class_names == want.class_names
    assert (got.grid.lo, got.grid.hi, got.grid.bins) == (want.grid.lo, want.grid.hi, want.grid.bins)
    np.testing.assert_array_equal(got.counts, want.counts)
    np.testing.assert_array_equal(got.anchor_counts, want.anchor_counts)
    # Where the images came from differs: a store (and its fingerprints) or memory.
    where = ("sources", "source_fingerprints")
    assert {k: v for k, v in got.settings.items() if k not in where} == {
        k: v for k, v in want.settings.items() if k not in where
    }
    assert got.settings["sources"] == ["<memory>"] and "source_fingerprints" not in got.settings
    assert got.extras is not None and want.extras is not None
    np.testing.assert_array_equal(got.extras.predicted, want.extras.predicted)
    np.testing.assert_array_equal(got.extras.confidence, want.extras.confidence)
    np.testing.assert_array_equal(got.extras.sample.logits, want.extras.sample.logits)
    np.testing.assert_array_equal(got.extras.sample.labels, want.extras.sample.labels)
    assert got.extras.calibrations.keys() == want.extras.calibrations.keys()
    for kind, (scale, bias) in want.extras.calibrations.items():
        np.testing.assert_array_equal(got.extras.calibrations[kind][0], scale)
        np.testing.assert_array_equal(got.extras.calibrations[kind][1], bias)
    assert (got.extras.calibrated is None) == (want.extras.calibrated is None)
    if want.extras.calibrated is not None:
        assert got.extras.calibrated is not None
        np.testing.assert_array_equal(got.extras.calibrated.counts, want.extras.calibrated.counts)
        calibration = got.extras.calibrated.settings["calibration"]
        assert (
            calibration["fingerprint"]
            == want.extras.calibrated.settings["calibration"]["fingerprint"]
        )


def test_fit_stats_equals_the_command(case):
    images = triples(case["src_logits"], case["src_labels"])
    want = api.read_stats(case["src_stats"])
    assert want.extras is not None and want.extras.calibrated is not None
    got = api.fit_stats(images, class_names=CLASSES, min_pixels=10)
    assert_same_stats(got, want)
    # Order does not matter, and a callable (tensors) reads the same images again.
    tensors = [(n, torch.tensor(z), torch.tensor(y)) for n, z, y in images[::-1]]
    assert_same_stats(
        api.fit_stats(lambda: iter(tensors), class_names=CLASSES, min_pixels=10), want
    )


def test_fit_stats_pseudo_resizes_like_the_command(case):
    # Logits at half size, labels at full size: resized to the label, as the store does.
    images = triples(case["tgt_logits"], case["tgt_labels"])
    got = api.fit_stats(images, class_names=CLASSES, labels="pseudo", min_pixels=10)
    assert_same_stats(got, api.read_stats(case["tgt_stats"]))
    assert got.settings["num_pixels"] == 5 * 24 * 32


def test_fit_stats_with_a_calibration_equals_the_command(case):
    """``calibration=`` is ``fit-stats --calibration``: statistics for calibrated-blda."""
    source = api.read_stats(case["src_stats"])
    images = triples(case["tgt_logits"], case["tgt_labels"])
    got = api.fit_stats(
        images, class_names=CLASSES, labels="pseudo", min_pixels=10, calibration=source
    )
    want = api.read_stats(case["tgt_cal_stats"])
    assert want.extras is not None and want.extras.calibrated is not None
    assert_same_stats(got, want)
    assert got.extras is not None and got.extras.calibrated is not None
    assert got.extras.calibrated.settings["calibration"]["source"] == "<calibration>"


def cli_methods() -> list[str]:
    """The names ``blda correct --method`` accepts."""
    import click

    command = main.get_command(click.Context(main), "correct")
    assert command is not None
    (option,) = [p for p in command.params if p.name == "method"]
    assert isinstance(option.type, click.Choice)
    return [str(c) for c in option.type.choices]


@pytest.fixture(scope="module")
def api_fitted(case) -> dict[str, LogitStats]:
    """Source (ground truth, calibrations) and target (pseudo, calibrated) stats, by the API."""
    source = api.fit_stats(
        triples(case["src_logits"], case["src_labels"]), class_names=CLASSES, min_pixels=10
    )
    target = api.fit_stats(
        triples(case["tgt_logits"], case["tgt_labels"]),
        class_names=CLASSES,
        labels="pseudo",
        min_pixels=10,
        calibration=source,
    )
    return {"source": source, "target": target}


@pytest.mark.parametrize("method", cli_methods())
def test_every_cli_method_loads_from_api_fitted_stats(case, api_fitted, tmp_path, method):
    """Every ``--method`` of the CLI, from API-fitted stats, predicts as ``blda correct``."""
    run("correct", case["tgt"], "--stats", case["tgt_cal_stats"], "--anchors", case["src_stats"],
        "--method", method, "--out-dir", tmp_path / "out")  # fmt: skip
    correction = api.load(method, stats=api_fitted["target"], anchors=api_fitted["source"])
    assert correction.method == method
    for name, z, label in triples(case["tgt_logits"], case["tgt_labels"]):
        pred, _ = api.correct(z, correction, size=label.shape)
        want = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        np.testing.assert_array_equal(pred.numpy(), want)


@pytest.mark.parametrize("method", ["temperature", "vector-scaling", "bias"])
def test_a_calibration_needs_only_the_labelled_stats(case, api_fitted, tmp_path, method):
    """As ``--anchors`` alone on the command line: the calibration lives in the source file."""
    alone = api.load(method, anchors=api_fitted["source"])
    both = api.load(method, stats=api_fitted["target"], anchors=api_fitted["source"])
    run("correct", case["tgt"], "--anchors", case["src_stats"], "--method", method,
        "--out-dir", tmp_path / "out")  # fmt: skip
    for name, z, label in triples(case["tgt_logits"], case["tgt_labels"]):
        pred, _ = api.correct(z, alone, size=label.shape)
        assert torch.equal(pred, api.correct(z, both, size=label.shape)[0])
        want = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        np.testing.assert_array_equal(pred.numpy(), want)


def test_errors_name_the_api_arguments_not_cli_flags(case, api_fitted):
    source, target = api_fitted["source"], api_fitted["target"]
    plain_target = api.read_stats(case["tgt_stats"])  # fitted without a calibration
    cases = [
        (lambda: api.load("magic", stats=target), "method must be one of"),
        (lambda: api.load("vector-scaling"), "method vector-scaling needs anchors"),
        (lambda: api.load("blda", anchors=source), "method blda needs stats"),
        (
            lambda: api.load("calibrated-blda", stats=plain_target, anchors=source),
            r"<stats>: holds no statistics of calibrated logits \(fit it with "
            r"api.fit_stats\(labels='gt'\), or with api.fit_stats\(\.\.\., calibration=anchors\)",
        ),
        (
            lambda: api.load("vector-scaling", stats=plain_target),
            r"<stats>: holds no vector calibration \(it is fitted by api.fit_stats\(labels='gt'\)",
        ),
        (lambda: api.load("blda", stats=target, clamp=0.7), "clamp must lie in"),
        (
            lambda: api.fit_stats(
                triples(case["tgt_logits"], None),
                class_names=CLASSES,
                labels="pseudo",
                calibration=plain_target,
            ),
            r"<calibration>: holds no vector-scaling calibration \(fit it with api.fit_stats",
        ),
        (
            lambda: api.fit_stats(
                triples(case["tgt_logits"], None),
                class_names=["a", "b", "c", "d"],
                labels="pseudo",
                calibration=source,
            ),
            "<calibration>: class names",
        ),
    ]
    for call, match in cases:
        with pytest.raises(api.InputError, match=match) as caught:
            call()
        assert "--" not in str(caught.value), str(caught.value)
    note = api.load("temperature", anchors=source, tau=0.5).notes
    assert note == ["tau is ignored: temperature has no strength"]


def test_load_refuses_a_correction_over_the_memory_budget(api_fitted, monkeypatch):
    """The statistics held plus the tables to build, against the budget, in API terms."""
    from blda_posthoc.core.align import correction_memory

    source, target = api_fitted["source"], api_fitted["target"]
    groups = 4  # both files hold statistics of calibrated logits
    need = correction_memory(4, target.grid.bins, groups=groups)
    monkeypatch.setenv("BLDA_MEMORY_GIB", repr((need - 4096) / 2**30))
    with pytest.raises(api.InputError, match=r"api.fit_stats\(\.\.\., bins=\d+\) fits"):
        api.load("blda", stats=target, anchors=source)
    monkeypatch.setenv("BLDA_MEMORY_GIB", repr((need + 4096) / 2**30))
    assert api.load("blda", stats=target, anchors=source).method == "blda"


def test_input_error_is_a_value_error(api_fitted):
    """Library users who catch ValueError for bad arguments keep working."""
    assert issubclass(api.InputError, ValueError)
    with pytest.raises(ValueError, match="tau must be 'auto' or a finite number") as caught:
        api.load("blda", stats=api_fitted["target"], tau=-1)
    assert isinstance(caught.value, api.InputError)


def test_write_and_read_stats_round_trip(case, tmp_path):
    stats = api.fit_stats(
        triples(case["src_logits"], case["src_labels"]), class_names=CLASSES, min_pixels=10
    )
    api.write_stats(tmp_path / "s.h5", stats)
    assert_same_stats(api.read_stats(tmp_path / "s.h5"), stats)
    run("info", tmp_path / "s.h5")


@pytest.mark.parametrize(
    ("method", "tau"), [("blda", None), ("blda", "auto"), ("vector-scaling", None)]
)
def test_correct_equals_the_command_pngs(case, tmp_path, method, tau):
    args = ["--tau", tau] if tau is not None else []
    run("correct", case["tgt"], "--stats", case["tgt_stats"], "--anchors", case["src_stats"],
        "--method", method, *args, "--out-dir", tmp_path / "out")  # fmt: skip
    correction = api.load(
        method,
        stats=api.read_stats(case["tgt_stats"]),
        anchors=api.read_stats(case["src_stats"]),
        tau=tau,
    )
    changed = 0
    for name, z, label in triples(case["tgt_logits"], case["tgt_labels"]):
        pred, scores = api.correct(z, correction, size=label.shape)
        want = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        np.testing.assert_array_equal(pred.numpy(), want)
        assert pred.dtype == torch.int64 and scores.shape == (4, *label.shape)
        changed += int(
            (pred.numpy() != api.correct(z, api.load("none"), size=label.shape)[0].numpy()).sum()
        )
    # The correction changes pixels (tau auto may choose 0: then none, as the command).
    assert (changed > 0) == (correction.tau > 0 or method == "vector-scaling")


def test_evaluate_equals_the_command(case, tmp_path):
    out = tmp_path / "e.json"
    run("evaluate", case["tgt"], "--stats", case["tgt_stats"], "--anchors", case["src_stats"],
        "--json", out)  # fmt: skip
    report = json.loads(out.read_text())
    correction = api.load(  # no method on either side: the same label-free default
        stats=api.read_stats(case["tgt_stats"]), anchors=api.read_stats(case["src_stats"])
    )
    plain, corrected, labels = [], [], []
    for _, z, label in triples(case["tgt_logits"], case["tgt_labels"]):
        plain.append(api.correct(z, api.load("none"), size=label.shape)[0])
        corrected.append(api.correct(z, correction, size=label.shape)[0])
        labels.append(label)
    before = api.evaluate(plain, labels, 4)
    after = api.evaluate(corrected, labels, 4)
    for got, want in ((before, report["before"]), (after, report["after"])):
        for key in ("miou", "macc", "pixel_acc"):
            assert got[key] == pytest.approx(want[key], abs=0.006)
        assert [got["iou"][i] for i in range(4)] == pytest.approx(
            [want["per_class"][c]["iou"] for c in CLASSES], abs=0.006
        )
    assert after["miou"] != before["miou"]
    # One stacked array gives what the per-image list gives.
    stacked = api.evaluate(torch.stack(corrected), np.stack(labels), 4)
    assert stacked == after


def test_batch_equals_single_images(case):
    correction = api.load(
        "blda", stats=api.read_stats(case["tgt_stats"]), anchors=api.read_stats(case["src_stats"])
    )
    z = torch.stack([torch.from_numpy(t[1]) for t in triples(case["tgt_logits"], None)])
    z.requires_grad_(True)
    pred, scores = api.correct(z, correction)
    assert pred.shape == (5, 12, 16) and scores.shape == (5, 4, 12, 16)
    assert pred.device == z.device and not scores.requires_grad
    for i in range(5):
        one_pred, one_scores = api.correct(z[i], correction)
        assert torch.equal(one_pred, pred[i]) and torch.equal(one_scores, scores[i])
    big, _ = api.correct(z.detach().numpy(), correction, size=(24, 32))
    assert big.shape == (5, 24, 32)
    assert torch.equal(scores.argmax(1), pred)


def test_errors(case):
    images = triples(case["src_logits"], case["src_labels"])
    with pytest.raises(TypeError, match="one-shot iterator"):
        api.fit_stats(iter(images), class_names=CLASSES)
    with pytest.raises(api.InputError, match="occurs twice"):
        api.fit_stats(images + images[:1], class_names=CLASSES)
    with pytest.raises(api.InputError, match="needs a label map"):
        api.fit_stats([(n, z, None) for n, z, _ in images], class_names=CLASSES)
    for bad_option, match in (
        ({"bins": 8}, r"bins must be in \[16, 65536\], got 8"),
        ({"min_pixels": 0}, "min_pixels must be at least 1"),
        ({"estimator": "kde"}, "estimator must be one of"),
        ({"labels": "weak"}, "labels must be one of"),
    ):
        with pytest.raises(api.InputError, match=match):
            api.fit_stats(images, class_names=CLASSES, **bad_option)  # type: ignore[arg-type]
    with pytest.raises(api.InputError, match="channels"):
        api.fit_stats(images, class_names=CLASSES[:3])
    bad = [(n, z, np.where(y == 1, 7, y)) for n, z, y in images]
    with pytest.raises(api.InputError, match="label value 7"):
        api.fit_stats(bad, class_names=CLASSES)
    nan = [(n, np.where(z > 4, np.nan, z), y) for n, z, y in images]
    with pytest.raises(api.InputError, match="NaN"):
        api.fit_stats(nan, class_names=CLASSES)
    stats = api.read_stats(case["tgt_stats"])
    with pytest.raises(api.InputError, match="tau"):
        api.load("blda", stats=stats, tau=-1.0)
    with pytest.raises(api.InputError, match="needs stats"):
        api.load("blda")
    with pytest.raises(api.InputError, match="^method must be one of"):
        api.load("magic", stats=stats)
    # Pseudo-label statistics hold no calibration: the command's message, naming "<stats>".
    with pytest.raises(api.InputError, match="<stats>: holds no vector calibration"):
        api.load("vector-scaling", stats=stats)
    with pytest.raises(api.InputError, match="shape"):
        api.evaluate(np.zeros((2, 2), np.int64), np.zeros((2, 3), np.int64), 4)
    with pytest.raises(api.InputError, match=r"\(C, H, W\)"):
        api.correct(np.zeros((4, 5)), api.load("none"))


def test_every_bad_argument_is_an_input_error_in_api_terms(case, tmp_path):
    """Each bad argument: an InputError naming the parameter, never a CLI flag or a traceback."""
    stats = api.read_stats(case["tgt_stats"])
    blda = api.load("blda", stats=stats)
    z = np.random.default_rng(0).normal(size=(4, 6, 8)).astype(np.float32)
    bad_calls = {
        "NaN logits": (lambda: api.correct(np.where(z > 1, np.nan, z), blda), "NaN"),
        "wrong class count": (
            lambda: api.correct(z[:3], blda),
            r"logits have 3 classes \(shape \(3, 6, 8\)\), the correction 4",
        ),
        "size (0, 0)": (lambda: api.correct(z, blda, size=(0, 0)), r"size must be \(H, W\)"),
        "size of floats": (lambda: api.correct(z, blda, size=(2.5, 3)), "size must be"),
        "integer logits": (lambda: api.correct(z.astype(np.int64), blda), "floating point"),
        "empty logits": (lambda: api.correct(z[:, :0], blda), r"\(C, H, W\)"),
        "not a correction": (lambda: api.correct(z, "blda"), "correction must come from load"),
        "tau=[1]": (lambda: api.load("blda", stats=stats, tau=[1]), "tau must be"),
        "tau=True": (lambda: api.load("blda", stats=stats, tau=True), "tau must be"),
        "tau=nan": (lambda: api.load("blda", stats=stats, tau=float("nan")), "tau must be"),
        "stats as a path": (
            lambda: api.load("blda", stats=str(case["tgt_stats"])),
            r"stats must be statistics .*api.read_stats\(",
        ),
        "anchors as a Path": (
            lambda: api.load("blda", stats=stats, anchors=case["tgt_stats"]),
            "anchors must be statistics",
        ),
        "min_pixels=-3": (lambda: api.load("blda", stats=stats, min_pixels=-3), "min_pixels"),
        "min_pixels=2.5": (lambda: api.load("blda", stats=stats, min_pixels=2.5), "min_pixels"),
        "clamp=0.5": (lambda: api.load("blda", stats=stats, clamp=0.5), r"clamp must lie in"),
        "method=7": (lambda: api.load(7, stats=stats), "method must be"),  # type: ignore[arg-type]
        "num_classes=0": (
            lambda: api.evaluate(np.zeros(3, np.int64), np.zeros(3, np.int64), 0),
            "num_classes must be in",
        ),
        "num_classes='4'": (
            lambda: api.evaluate(np.zeros(3, np.int64), np.zeros(3, np.int64), "4"),
            "num_classes must be a whole number",
        ),
        "duplicate class names": (
            lambda: api.fit_stats([], class_names=["a", "a"]),
            "class_names: class names are not unique",
        ),
        "empty class name": (
            lambda: api.fit_stats([], class_names=["a", ""]),
            "class_names: class 1 has an empty name",
        ),
        "class names as a string": (
            lambda: api.fit_stats([], class_names="abc"),
            "class_names must be a sequence",
        ),
        "bins as a float": (
            lambda: api.fit_stats([], class_names=CLASSES, bins=64.0),
            "bins must be a whole number",
        ),
    }
    for what, (call, match) in bad_calls.items():
        with pytest.raises(api.InputError, match=match) as caught:
            call()
        assert isinstance(caught.value, api.InputError), what
        assert "--" not in str(caught.value), (what, str(caught.value))


def test_module_example_runs():
    result = doctest.testmod(api, raise_on_error=False)
    assert result.attempted > 5 and result.failed == 0


def test_docs_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes example_tgt_stats.h5
    blocks = re.findall(r"```python\n(.*?)```", API_DOC.read_text(), re.S)
    assert len(blocks) == 2  # the second, the training loop: test_api_training.py
    assert 'tgt_stats.h5"' not in blocks[0].replace("example_tgt_stats.h5", "")
    scope: dict[str, object] = {}
    exec(compile(blocks[0], "docs/api.md", "exec"), scope)  # noqa: S102
    assert scope["after"]["miou"] > scope["before"]["miou"]  # type: ignore[index]
    assert api.read_stats(tmp_path / "example_tgt_stats.h5").settings["labels"] == "pseudo"
