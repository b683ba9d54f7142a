"""``--threads`` on the compute commands and the OpenMP wait policy the CLI sets."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from blda_posthoc.cli import main
from blda_posthoc.io.stats import read_stats
from blda_posthoc.io.store import StoreWriter


def test_threads_option_sets_torch_threads_and_leaves_results_alone(tmp_path: Path):
    rng = np.random.default_rng(0)
    with StoreWriter(tmp_path / "s.h5", ["a", "b", "c"]) as writer:
        for i in range(3):
            label = rng.integers(0, 3, (16, 20)).astype(np.uint8)
            writer.write(f"im{i}", rng.normal(size=(3, 16, 20)).astype(np.float32), label)
    before = torch.get_num_threads()
    runner = CliRunner()
    try:
        args = ["fit-stats", str(tmp_path / "s.h5"), "--device", "cpu", "--no-calibrate"]
        one = runner.invoke(main, [*args, "--threads", "1", "--out", str(tmp_path / "one.h5")])
        assert one.exit_code == 0, one.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    default = runner.invoke(main, [*args, "--out", str(tmp_path / "default.h5")])
    assert default.exit_code == 0, default.output
    assert torch.get_num_threads() == before
    np.testing.assert_array_equal(
        read_stats(tmp_path / "one.h5").counts, read_stats(tmp_path / "default.h5").counts
    )
    bad = runner.invoke(main, [*args, "--threads", "0", "--out", str(tmp_path / "x.h5")])
    assert bad.exit_code == 2 and "--threads" in bad.output


def test_cli_makes_openmp_threads_wait_passively_unless_told_otherwise():
    code = "import os, blda_posthoc.cli; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PASSIVE", out.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE", out.stderr


def test_group_help_lists_every_command_without_importing_torch():
    code = (
        "import sys\n"
        "from blda_posthoc.cli import main\n"
        "try:\n"
        "    main(['--help'], prog_name='blda')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("no torch")
    # the short help read from the sources is what each imported command gives
    from blda_posthoc.cli import COMMANDS

    listed = {}
    for line in out.stdout.split("Commands:")[1].splitlines():
        if line.strip() and line.startswith("  ") and not line.startswith("    "):
            name, _, text = line.strip().partition(" ")
            listed[name] = text.strip()
    ctx = click.Context(main)
    assert set(listed) == {name for name in COMMANDS if main.get_command(ctx, name) is not None}
    for name, text in listed.items():
        command = main.get_command(ctx, name)
        assert command is not None and len(text) > 20
        assert command.get_short_help_str(1000).startswith(text.removesuffix("..."))


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's malloc only",
)
def test_cli_keeps_large_temporaries_in_the_heap_unless_the_environment_says_otherwise():
    code = "import blda_posthoc.cli as cli; print(cli.tune_malloc())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
