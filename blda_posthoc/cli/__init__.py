"""The ``blda`` command line: a click group whose commands live one per module here."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from blda_posthoc import __version__

# Before any command imports torch: OpenMP threads that spin while they wait for work make torch
# several times slower when other processes keep the cores busy; sleeping costs little otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MALLOC_MMAP_THRESHOLD = 64 << 20
"""Bytes from which glibc's malloc maps a block of its own (see :func:`tune_malloc`)."""
MALLOC_TRIM_THRESHOLD = 128 << 20
"""Free bytes at the top of the heap that glibc's malloc keeps instead of returning them."""


def tune_malloc() -> bool:
    """Let glibc's malloc keep the large temporaries of one step for the next (Linux only).

    The full-size paths allocate tensors of several MB per step of pixels (``compare``'s wide
    BLDA bags and scores are 17 MB each). glibc maps each such block from the kernel and
    unmaps it when freed (its threshold only grows to the last size freed), so every step
    faults its pages in again: at Cityscapes size ``compare`` spent 8 of its 43 CPU seconds
    in the kernel. Blocks below :data:`MALLOC_MMAP_THRESHOLD` now come from the heap, which
    keeps up to :data:`MALLOC_TRIM_THRESHOLD` free bytes (measured: 2.8 s in the kernel, the
    same peak RSS). The environment variables ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_``, when set, are left to glibc.

    Returns:
        Whether the thresholds were set (False: not glibc, or set by the environment).
    """
    if not sys.platform.startswith("linux") or any(
        key in os.environ for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    ):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # a C library without it (musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD)
    )


tune_malloc()

# Command name -> the module whose ``command`` it runs. ``demo`` lives on the floor above the CLI
# (it runs the other commands), so the CLI names it here and never imports it itself.
COMMANDS = {
    "dump-logits": "blda_posthoc.cli.dump_logits",
    "import-logits": "blda_posthoc.cli.import_logits",
    "fit-stats": "blda_posthoc.cli.fit_stats",
    "diagnose": "blda_posthoc.cli.diagnose",
    "correct": "blda_posthoc.cli.correct",
    "relabel": "blda_posthoc.cli.relabel",
    "evaluate": "blda_posthoc.cli.evaluate",
    "compare": "blda_posthoc.cli.compare",
    "info": "blda_posthoc.cli.info",
    "demo": "blda_posthoc.demo.command",
}


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command runs (fast start-up)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The commands whose modules exist, in pipeline order (found, not imported)."""
        return [name for name in COMMANDS if _source(name) is not None]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the commands with their short help read from their source, importing none.

        Importing every command to list them would import torch for ``blda --help``.
        """
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            doc = _command_doc(name)
            if doc is None:  # not a plain docstring: ask the command itself
                command = self.get_command(ctx, name)
                rows.append((name, command.get_short_help_str(limit) if command else ""))
            else:
                rows.append((name, click.Command(name, help=doc).get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def _module(self, name: str) -> object | None:
        try:
            return importlib.import_module(COMMANDS[name])
        except ModuleNotFoundError as exc:
            if exc.name == COMMANDS[name]:
                return None
            raise

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        """Parse the arguments; Ctrl-C meanwhile exits 130 (see :func:`_interrupted`)."""
        try:
            return super().make_context(info_name, args, parent, **extra)
        except KeyboardInterrupt:
            _interrupted()

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; Ctrl-C before it handles it (importing torch, parsing) exits 130."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _interrupted()

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import and return one command."""
        if cmd_name not in COMMANDS:
            return None
        module = self._module(cmd_name)
        return getattr(module, "command", None)


def _interrupted() -> NoReturn:
    """Ctrl-C before a command started work: one line, exit 130 (as during its work).

    Without this click would print ``Aborted!`` and exit 1 (a failure, not an interruption).
    """
    click.echo("interrupted", err=True)
    raise SystemExit(130)


def _source(name: str) -> Path | None:
    spec = importlib.util.find_spec(COMMANDS[name])
    return Path(spec.origin) if spec is not None and spec.origin else None


def _command_doc(name: str) -> str | None:
    """The docstring of the module's ``command`` function, as click would show it, or None."""
    path = _source(name)
    if path is None or path.suffix != ".py":
        return None
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef) and node.name == "command":
            doc = ast.get_docstring(node)
            return doc.split("\f", 1)[0] if doc else None
    return None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blda")
def main() -> None:
    """Post-hoc class-bias correction of frozen domain-adapted segmenters (BLDA).

    Pipeline: dump-logits (or import-logits) -> fit-stats -> diagnose / compare / correct /
    relabel -> evaluate; `blda info` describes a store or stats file. `blda demo` runs it all
    on a built-in synthetic case. The method, the metrics and the file formats are explained in
    docs/method.md, docs/metrics.md and docs/formats.md of the repository.
    """
