"""The rules scripts/bench_methods.py applies to choose defaults (docs/methods.md), on hand-made
gains whose answers are worked out by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_methods.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_methods", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gains(table: dict[tuple, list[float]]) -> dict[str, dict[tuple, dict]]:
    """``{row: [gain per case]}`` -> the script's ``{case: {row: {"gain", "ci95"}}}``."""
    names = ["a", "b", "c"]
    return {
        n: {k: {"gain": v[i], "ci95": None} for k, v in table.items()} for i, n in enumerate(names)
    }


CASES = gains({
    ("x", 0.2, False): [3.0, 1.0, 2.0],   # worst 1.0, mean 2.0
    ("x", 0.5, False): [1.0, 1.05, 5.0],  # worst 1.0 (tie within 0.1), mean 2.35: x's choice
    ("x", 0.0, False): [0.0, 0.0, 0.0],   # tau 0 is never a candidate of the strength rule
    ("y", 1.0, False): [4.0, -1.0, 6.0],  # best on a and c, worst -1
    ("y", None, True): [9.0, 9.0, 9.0],   # --tau auto is not a fixed row
})  # fmt: skip


def test_max_min_breaks_ties_by_the_mean(bench):
    assert bench.max_min(CASES, ["a", "b", "c"]) == ("y", None, True)
    fixed = {n: {k: v for k, v in c.items() if not k[2]} for n, c in CASES.items()}
    assert bench.max_min(fixed, ["a", "b", "c"]) == ("x", 0.5, False)
    assert bench.max_min(fixed, ["a", "c"]) == ("y", 1.0, False)  # worst 4 on a and c


def test_strength_rule_and_its_leave_one_out(bench):
    _, out = bench.strength_rule(CASES)
    x = out["x"]
    assert x["rule_tau"] == 0.5 and x["worst"] == 1.0 and x["mean"] == 2.35
    # Without c, tau 0.2 has worst 1.0 and mean 2.0, tau 0.5 worst 1.0 and mean 1.025.
    assert x["leave_one_out"]["c"] == {"tau": 0.2, "held_out_gain": 2.0}
    assert x["leave_one_out"]["a"] == {"tau": 0.5, "held_out_gain": 1.0}
    assert out["y"]["rule_tau"] == 1.0


def test_regret_is_the_largest_shortfall_to_each_cases_best_fixed_row(bench):
    text, out = bench.regrets(CASES)
    # Best fixed per case: a 4.0 (y), b 1.05 (x 0.5), c 6.0 (y); tau 0 rows are left out.
    assert out["rows"] == {"y τ 1": 2.05, "x τ 0.5": 3.0, "x τ 0.2": 4.0}
    assert list(out["rows"]) == ["y τ 1", "x τ 0.5", "x τ 0.2"]  # smallest regret first
    assert out["smallest"] == "y τ 1" and "no fixed row meets" in text
