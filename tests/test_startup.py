"""``blda CMD -h`` and usage errors answer without importing torch, h5py or numpy."""

from __future__ import annotations

import json
import subprocess
import sys

from blda_posthoc.cli import COMMANDS

# Runs in a fresh interpreter: every command's help, then a usage error of each, and reports
# which heavy modules were imported by then.
PROBE = """
import json, sys
from blda_posthoc.cli import main
heavy = ("torch", "h5py", "numpy")
report = {}
for args in json.loads(sys.argv[1]):
    try:
        main(args, prog_name="blda")
    except SystemExit as exc:
        code = exc.code
    report[" ".join(args)] = [code, [m for m in heavy if m in sys.modules]]
print(json.dumps(report))
"""

USAGE_ERRORS = [
    ["correct"],  # STORES missing
    ["compare", "x.h5", "--pixel-stride", "0", "--json", "c.json"],
    ["compare", "x.h5", "--methods", "blda,foo", "--json", "c.json"],
    ["relabel", "x.h5", "--keep-portion", "2"],
    ["fit-stats", "x.h5", "--label-source", "nope", "--out", "s.h5"],
    ["evaluate", "--device", "tpu"],
    ["dump-logits", "--precision", "fp8"],
]


def probe(calls: list[list[str]]) -> dict[str, list]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(calls)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_and_usage_errors_import_no_heavy_module():
    commands = [name for name in COMMANDS if name != "demo"]
    report = probe([[name, "-h"] for name in commands] + USAGE_ERRORS)
    for name in commands:
        assert report[f"{name} -h"] == [0, []], (name, report[f"{name} -h"])
    for args in USAGE_ERRORS:
        code, imported = report[" ".join(args)]
        assert code == 2 and imported == [], (args, code, imported)


def test_demo_help_imports_no_torch():
    (code, imported), *_ = probe([["demo", "-h"]]).values()
    assert code == 0 and "torch" not in imported and "h5py" not in imported


def test_option_choices_match_the_modules_that_use_them():
    from blda_posthoc.core import defaults
    from blda_posthoc.core.infer import PRECISIONS

    assert tuple(PRECISIONS) == defaults.PRECISION_NAMES
