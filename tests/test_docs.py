"""The user documentation is self-contained: links resolve, nothing points outside the clone,
and the worked Bias example agrees with the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from blda_posthoc.cli import main
from blda_posthoc.core.evaluate import summarize

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {
        slug(line.lstrip("#"))
        for line in path.read_text().splitlines()
        if line.startswith("#") and not line.startswith("#!")
    }


TOPICS = {
    "commands.md",
    "models.md",
    "method.md",
    "methods.md",
    "metrics.md",
    "formats.md",
    "api.md",
    "scaling.md",
    "safety.md",
    "benchmarks.md",
    "layout.md",
}
"""The topic pages the README's map points to."""
REPO_PATH = re.compile(r"`((?:blda_posthoc|scripts|tests|docs)/[\w./-]+\.(?:py|md|png|sh|pt))`")


def test_the_docs_exist() -> None:
    names = {p.name for p in DOCS}
    assert names >= TOPICS


def test_readme_is_a_front_door() -> None:
    """Short, and it maps every topic page (no page a newcomer cannot find)."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    mapped = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", text))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= mapped, f"docs not in the README's map: {sorted(pages - mapped)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_repository_paths_named_in_the_docs_exist(doc: Path) -> None:
    """A file named in backticks (`blda_posthoc/core/align.py`, `scripts/demo.sh`) exists."""
    for path in REPO_PATH.findall(doc.read_text()):
        assert (ROOT / path).exists(), f"{doc.name}: {path} does not exist"


def command_sections() -> dict[str, str]:
    """``docs/commands.md`` split at its ``## `blda NAME` `` headings."""
    parts = re.split(
        r"^## `blda ([\w-]+)`\n", (ROOT / "docs" / "commands.md").read_text(), flags=re.M
    )
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_command_and_option_is_in_the_command_reference() -> None:
    sections = command_sections()
    ctx = click.Context(main)
    assert set(sections) == set(main.list_commands(ctx))
    for name, section in sections.items():
        command = main.get_command(ctx, name)
        assert command is not None
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden or "--help" in param.opts:
                continue
            for opt in (*param.opts, *param.secondary_opts):
                if opt.startswith("--"):
                    assert f"`{opt}" in section, f"commands.md, blda {name}: {opt} undocumented"
            # A required option reads as required (compare --json is), an optional one not.
            row = re.compile(rf"^\| `{re.escape(param.opts[0])}[ `]")
            rows = [line for line in section.splitlines() if row.match(line)]
            assert len(rows) == 1, f"commands.md, blda {name}: no option row for {param.opts[0]}"
            assert ("[required]" in rows[0]) == param.required, rows[0]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve_inside_the_repository(doc: Path) -> None:
    for target in LINK.findall(doc.read_text()):
        assert not target.startswith(("http://", "https://", "/", "..")), f"{doc}: {target}"
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        assert linked.exists(), f"{doc.name}: {target} does not exist"
        assert ROOT in linked.parents or linked == ROOT, f"{doc.name}: {target} leaves the repo"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{doc.name}: no heading for #{anchor} in {linked}"


def test_nothing_user_facing_points_outside_the_repository() -> None:
    files = DOCS + sorted((ROOT / "blda_posthoc").rglob("*.py"))
    for path in files:
        text = path.read_text()
        for banned in ("METHOD.md", "shared notes", "../shared"):
            assert banned not in text, f"{path.relative_to(ROOT)} mentions {banned!r}"


def test_help_points_to_the_docs() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "docs/method.md" in result.stdout and "docs/metrics.md" in result.stdout


def test_worked_bias_example_matches_the_code() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    # road, pole, car; rows true, columns predicted (the table in metrics.md).
    s = summarize(np.array([[960, 40, 0], [15, 5, 0], [0, 0, 200]]))
    road, pole, car = 0, 1, 2
    assert s["pred_true_ratio"][pole] == pytest.approx(2.25)
    assert s["pred_true_ratio"][road] == pytest.approx(0.975)
    assert f"{s['bias'][pole]:.1f}".replace("-", "−") + " pp" in text  # −23.7 pp
    assert f"+{s['bias'][road]:.1f} pp" in text
    assert s["bias"][car] == pytest.approx(0.0)
    assert s["pred_true_ratio"][pole] > 1 and s["bias"][pole] < 0
    summary_line = (
        f"IoU: road {s['iou'][road]:.1f}, pole {s['iou'][pole]:.1f}, car {s['iou'][car]:.0f}; "
        f"mIoU {s['miou']:.1f}, mAcc {s['macc']:.1f}, pixel accuracy {s['pixel_acc']:.1f}"
    )
    assert summary_line in text


def documented_commands() -> list[tuple[str, list[str]]]:
    """``(source line, arguments)`` of every ``blda`` command line in the docs' bash blocks.

    Continuation lines are joined, comments dropped, ``[optional]`` brackets opened, and
    ``torchrun ... -m blda_posthoc`` lines read as ``blda``.
    """
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"(^|\s)#.*$", "", line).strip()
                line = re.sub(r"^.*?-m blda_posthoc\s", "blda ", line)
                if line.startswith("blda "):
                    tokens = shlex.split(line.replace("[", " ").replace("]", " "))
                    found.append((f"{doc.name}: {line}", tokens[1:]))
    return found


def test_every_documented_command_line_uses_existing_options() -> None:
    lines = documented_commands()
    assert len(lines) > 40  # the README's examples are found at all
    ctx = click.Context(main)
    for source, args in lines:
        if args[0] == "--help":
            continue
        command = main.get_command(ctx, args[0])
        assert command is not None, source
        options = {name: p for p in command.params for name in (*p.opts, *p.secondary_opts)}
        tokens = iter(args[1:])
        for token in tokens:
            if not token.startswith("-") or token == "-":
                continue
            param = options.get(token.split("=")[0])
            assert param is not None, f"{source}: no option {token}"
            takes_value = isinstance(param, click.Option) and not (param.is_flag or param.count)
            if takes_value and "=" not in token:
                next(tokens, None)
