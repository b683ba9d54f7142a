"""Every command has one shape: same option name, same meaning, help text and validation."""

from __future__ import annotations

import importlib
from collections import defaultdict
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import fitted_case
from PIL import Image

from blda_posthoc.cli import COMMANDS, main
from blda_posthoc.cli.common import resolve_device
from blda_posthoc.errors import InputError

# Commands that read logit stores take them as the positional STORES.
READS_STORES = {"fit-stats", "diagnose", "correct", "relabel", "evaluate", "compare"}

# Commands that take a folder of labels, as --labels DIR with --label-suffix.
TAKES_LABELS_DIR = {"dump-logits", "import-logits", "diagnose", "relabel", "evaluate", "compare"}

# Commands that write label-map folders, with the same extra files beside NAME.png.
WRITES_LABEL_MAPS = {"correct", "relabel"}

# The help text of these options must be the same wherever they appear.
SAME_HELP = (
    "--label-suffix",
    "--color",
    "--cityscapes-ids",
    "--class-names",
    "--labels",
    "--device",
    "--threads",
    "--overwrite",
    "--clamp",
    "--min-pixels",
    "--stats",
    "--anchors",
    "--method",
    "--from-compare",
)

# (option, command): help of its own, as the option does more there; why.
OWN_HELP = {
    ("--stats", "diagnose"): "optional: without it diagnose fits pseudo-label statistics itself",
    ("--anchors", "diagnose"): "used for an EM estimate of the target priors, not for a shift",
    ("--min-pixels", "fit-stats"): "records the setting that the correcting commands default to",
}

# (option, command): same name, deliberately another kind of value; why.
OTHER_TYPE = {
    ("--json", "info"): "a flag: info prints JSON on stdout, it writes no file",
    ("--images", "demo"): "demo: how many scenes to synthesise, not an image folder",
    ("--labels", "fit-stats"): "hidden old spelling of --label-source",
}


def _commands() -> dict[str, click.Command]:
    return {name: importlib.import_module(module).command for name, module in COMMANDS.items()}


def _type_signature(param: click.Parameter) -> str:
    kind = param.type
    return f"{type(kind).__name__}{sorted((k, repr(v)) for k, v in vars(kind).items())}"


def _options() -> dict[str, list[tuple[str, click.Option]]]:
    found: dict[str, list[tuple[str, click.Option]]] = defaultdict(list)
    for name, command in _commands().items():
        for param in command.params:
            if isinstance(param, click.Option):
                for spelling in param.opts:
                    found[spelling].append((name, param))
    return found


def test_every_command_that_reads_stores_takes_them_as_positional_stores():
    commands = _commands()
    assert set(commands) >= READS_STORES
    for name in READS_STORES:
        arguments = [p for p in commands[name].params if isinstance(p, click.Argument)]
        assert [a.name for a in arguments] == ["stores"], name
        assert arguments[0].nargs == -1, name  # evaluate --pred-dir needs none
        usage = " ".join(commands[name].collect_usage_pieces(click.Context(commands[name])))
        assert usage.endswith(("STORES...", "[STORES]...")), (name, usage)


def test_every_command_that_reads_a_labels_folder_takes_labels_and_label_suffix():
    options = _options()
    with_dir = {n for n, p in options["--labels"] if not p.hidden}
    assert with_dir == TAKES_LABELS_DIR
    assert {n for n, _ in options["--label-suffix"]} == TAKES_LABELS_DIR


def test_every_command_that_writes_label_maps_takes_the_same_extra_files():
    options = _options()
    for spelling in ("--color", "--cityscapes-ids", "--resume", "--out-dir"):
        users = {n for n, _ in options[spelling]}
        assert users >= WRITES_LABEL_MAPS, spelling
    assert {n for n, _ in options["--cityscapes-ids"]} == WRITES_LABEL_MAPS


def test_the_same_option_has_the_same_type_everywhere():
    mismatched = []
    for spelling, uses in _options().items():
        kept = [(n, p) for n, p in uses if (spelling, n) not in OTHER_TYPE]
        if len({_type_signature(p) for _, p in kept}) > 1:
            mismatched.append((spelling, [(n, _type_signature(p)) for n, p in kept]))
    assert mismatched == []
    for spelling, name in OTHER_TYPE:  # every exception still names a real option
        assert any(n == name for n, _ in _options()[spelling]), (spelling, name)


def test_shared_options_have_the_same_help_everywhere():
    options = _options()
    for spelling in SAME_HELP:
        uses = [(n, p) for n, p in options[spelling] if not p.hidden]
        uses = [(n, p) for n, p in uses if (spelling, n) not in OWN_HELP]
        assert len(uses) >= 2, spelling
        helps = {p.help for _, p in uses}
        assert len(helps) == 1, (spelling, [(n, p.help) for n, p in uses])


def test_labels_is_a_folder_everywhere_except_the_hidden_fit_stats_alias():
    for name, param in _options()["--labels"]:
        if name == "fit-stats":
            assert param.hidden
        else:
            assert isinstance(param.type, click.Path) and not param.type.file_okay, name


def test_the_same_range_check_applies_to_clamp_and_min_pixels_everywhere():
    runner = CliRunner()
    for name, _ in _options()["--clamp"]:
        result = runner.invoke(main, [name, "x.h5", "--clamp", "0.7"])
        assert result.exit_code == 2, (name, result.output)
        assert "--clamp" in result.output and "0.7" in result.output
    for name, _ in _options()["--min-pixels"]:
        result = runner.invoke(main, [name, "x.h5", "--min-pixels", "0"])
        assert result.exit_code == 2, (name, result.output)
        assert "--min-pixels" in result.output


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return fitted_case(tmp_path_factory.mktemp("shape"), tgt_images=2)


def test_fit_stats_label_source_and_its_hidden_old_spelling(case, tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(main, ["fit-stats", "--help"]).output
    assert "--label-source [gt|pseudo]" in help_text and "--labels" not in help_text
    new = runner.invoke(
        main, ["fit-stats", str(case["src"]), "--label-source", "gt", "--out", str(tmp_path / "a")]
    )
    assert new.exit_code == 0, new.output
    old = runner.invoke(
        main, ["fit-stats", str(case["src"]), "--labels", "gt", "--out", str(tmp_path / "b")]
    )
    assert old.exit_code == 0, old.output
    both = runner.invoke(
        main,
        ["fit-stats", str(case["src"]), "--labels", "gt", "--label-source", "pseudo"]
        + ["--out", str(tmp_path / "c")],
    )
    assert both.exit_code == 2
    assert "--labels is the old spelling of --label-source" in both.output
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("spec", ["gpu", "mps", "cuda:x", "cuda:-1", "cpu:0", "CUDA", ""])
def test_an_unknown_device_is_one_line_naming_only_the_devices_we_run_on(spec):
    runner = CliRunner()
    commands = [name for name, _ in _options()["--device"]]
    assert len(commands) >= 8
    for name in commands:
        result = runner.invoke(main, [name, "x.h5", "--device", spec])
        assert result.exit_code == 2, (name, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert errors == [
            f"Error: Invalid value for '--device': {spec!r} is not a device: use auto, cpu, "
            "cuda or cuda:K (K = 0, 1, ...)"
        ], (name, result.output)
        assert "xla" not in result.output and "Traceback" not in result.output


def test_resolve_device_refuses_the_same_spellings_and_missing_cuda():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match=r"'gpu' is not a device: use auto, cpu, cuda or cuda:K"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available on this machine"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(InputError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_cuda_without_cuda_is_a_one_line_error(case, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(
        main, ["fit-stats", str(case["src"]), "--device", "cuda", "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 1
    assert result.stderr == "error: --device cuda: CUDA is not available on this machine\n"


TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def noisy_stats(case, tmp_path_factory):
    """Target statistics with too few pixels in most cells: correcting with them warns."""
    path = tmp_path_factory.mktemp("noisy") / "noisy.h5"
    result = CliRunner().invoke(
        main, ["fit-stats", str(case["tgt"]), "--min-pixels", "300", "--out", str(path)]
    )
    assert result.exit_code == 0, result.output
    return path


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


def _families(case, noisy: Path, tmp: Path) -> dict[str, tuple[list[object], Path]]:
    """Per command family: a run that prints notes or warnings, and its output."""
    correction = ["--stats", noisy, "--anchors", case["src_stats"]]
    images = tmp / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / f"x_{i}.png")
    return {
        "dump-logits": (
            ["dump-logits", "--model", "tiny_models:build", "--images", images, "--out",
             tmp / "d.h5"],
            tmp / "d.h5",
        ),
        "import-logits": (
            ["import-logits", case["src"].parent / "tgt" / "logits", "--out", tmp / "i.h5"],
            tmp / "i.h5",
        ),
        "fit-stats": (["fit-stats", case["tgt"], "--out", tmp / "s.h5"], tmp / "s.h5"),
        "diagnose": (["diagnose", case["tgt"], "--json", tmp / "g.json"], tmp / "g.json"),
        "correct": (["correct", case["tgt"], *correction, "--out-dir", tmp / "c"], tmp / "c"),
        "correct --scores-out": (
            ["correct", case["tgt"], *correction, "--out-dir", tmp / "c2", "--scores-out",
             tmp / "scores.h5"],
            tmp / "scores.h5",
        ),
        "relabel": (["relabel", case["tgt"], *correction, "--out-dir", tmp / "r"], tmp / "r"),
        "evaluate": (["evaluate", case["tgt"], *correction, "--json", tmp / "e.json"],
                     tmp / "e.json"),
        "compare": (["compare", case["tgt"], *correction, "--json", tmp / "k.json"],
                    tmp / "k.json"),
    }  # fmt: skip


FAMILIES = [
    "dump-logits", "import-logits", "fit-stats", "diagnose", "correct", "correct --scores-out",
    "relabel", "evaluate", "compare",
]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_an_existing_output_is_the_only_thing_said(
    case, noisy_stats, tmp_path, family, monkeypatch
):
    monkeypatch.syspath_prepend(str(TESTS))  # tiny_models:build
    args, output = _families(case, noisy_stats, tmp_path)[family]
    runner = CliRunner()
    first = runner.invoke(main, [str(a) for a in args])
    assert first.exit_code == 0, first.output
    assert first.stderr.count("\n") >= 2, first.stderr  # notes or warnings that could come first
    if family == "correct --scores-out":  # a fresh --out-dir: only --scores-out is in the way
        args[args.index(tmp_path / "c2")] = tmp_path / "c3"
    before = _snapshot(output)
    again = runner.invoke(main, [str(a) for a in args])
    assert again.exit_code == 1, again.output
    assert again.stderr.count("\n") == 1, again.stderr
    assert again.stderr.startswith(f"error: {output}: already exists (use --overwrite")
    assert _snapshot(output) == before
    assert not (tmp_path / "c3").exists() and not (tmp_path / "c3.partial").exists()


@pytest.mark.parametrize("command", ["evaluate", "diagnose", "relabel"])
def test_a_labels_error_comes_before_any_correction_note(case, noisy_stats, tmp_path, command):
    bare = tmp_path / "bare.h5"
    runner = CliRunner()
    made = runner.invoke(
        main, ["import-logits", str(case["src"].parent / "tgt" / "logits"), "--out", str(bare)]
    )
    assert made.exit_code == 0, made.output
    args = [command, bare, "--stats", noisy_stats, "--anchors", case["src_stats"]]
    if command != "diagnose":
        args += ["--method", "blda"]  # blda's notes (cells without a shift) could come first
    if command == "evaluate":
        noted = runner.invoke(main, [str(a) for a in [*args, "--labels", case["labels"]]])
        assert noted.exit_code == 0 and "warning:" in noted.stderr  # the note that could come first
    else:
        args += ["--labels", tmp_path]  # a folder without labels
    if command == "relabel":
        args += ["--out-dir", tmp_path / "out"]
    result = runner.invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "label" in result.stderr
