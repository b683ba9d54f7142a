"""Every command has one shape: same option name, same meaning, help text and validation."""

from __future__ import annotations

import importlib
from collections import defaultdict

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import fitted_case

from blda_posthoc.cli import COMMANDS, main
from blda_posthoc.cli.common import resolve_device
from blda_posthoc.io.errors import InputError

# Commands that read logit stores take them as the positional STORES.
READS_STORES = {"fit-stats", "diagnose", "correct", "relabel", "evaluate", "compare"}

# The help text of these options must be the same wherever they appear.
SAME_HELP = (
    "--label-suffix",
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
    return {
        name: importlib.import_module(f"blda_posthoc.cli.{module}").command
        for name, module in COMMANDS.items()
    }


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
