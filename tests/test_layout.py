"""The package's floors: every import points down (or sideways), and no module imports itself back.

core <- outputs <- io <- report <- pipelines <- cli / api <- demo. Imports inside functions count
too: a lazy import that reaches up is still a floor reaching up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import blda_posthoc

PACKAGE = Path(blda_posthoc.__file__).parent
FLOORS = {
    "blda_posthoc": 0,
    "blda_posthoc.errors": 0,
    "blda_posthoc.core": 0,
    "blda_posthoc.outputs": 1,
    "blda_posthoc.io": 2,
    "blda_posthoc.report": 3,
    "blda_posthoc.pipelines": 4,
    "blda_posthoc.cli": 5,
    "blda_posthoc.api": 5,
    "blda_posthoc.demo": 6,
    "blda_posthoc.__main__": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    """The floor of the longest FLOORS key that is ``module`` or a package above it."""
    best = max((k for k in FLOORS if module == k or module.startswith(k + ".")), key=len)
    return FLOORS[best]


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (at any depth of its code)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imports(path, modules) - {name} for name, path in paths.items()}


def test_every_module_has_a_floor():
    for name in graph():
        assert floor(name) >= 0, name


def test_no_import_reaches_a_higher_floor():
    up = [
        f"{name} (floor {floor(name)}) imports {target} (floor {floor(target)})"
        for name, targets in graph().items()
        for target in sorted(targets)
        if floor(target) > floor(name)
    ]
    assert up == []


def test_no_import_cycles():
    edges = graph()
    # Package __init__ files are entered by every submodule import; they import nothing here.
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if target.rsplit(".", 1)[0] == node:  # a package naming its own submodule
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_floor_rule_catches_a_reach_up(tmp_path):
    """The check itself can fail: a core module that imports the CLI is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from blda_posthoc.cli.common import handle_errors\n")
    targets = imports(bad, set(graph()))
    assert "blda_posthoc.cli.common" in targets
    assert floor("blda_posthoc.cli.common") > floor("blda_posthoc.core.fit")
