"""The ``blda`` command line: a click group whose commands live one per module here."""

from __future__ import annotations

import importlib
import os

import click

from blda_posthoc import __version__

# Before any command imports torch: OpenMP threads that spin while they wait for work make torch
# several times slower when other processes keep the cores busy; sleeping costs little otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COMMANDS = {
    "dump-logits": "dump_logits",
    "import-logits": "import_logits",
    "fit-stats": "fit_stats",
    "diagnose": "diagnose",
    "correct": "correct",
    "relabel": "relabel",
    "evaluate": "evaluate",
    "compare": "compare",
    "info": "info",
    "demo": "demo",
}


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command runs (fast start-up)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The commands whose modules exist, in pipeline order."""
        return [name for name in COMMANDS if self._module(name) is not None]

    def _module(self, name: str) -> object | None:
        try:
            return importlib.import_module(f"blda_posthoc.cli.{COMMANDS[name]}")
        except ModuleNotFoundError as exc:
            if exc.name == f"blda_posthoc.cli.{COMMANDS[name]}":
                return None
            raise

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import and return one command."""
        if cmd_name not in COMMANDS:
            return None
        module = self._module(cmd_name)
        return getattr(module, "command", None)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blda")
def main() -> None:
    """Post-hoc class-bias correction of frozen domain-adapted segmenters (BLDA).

    Pipeline: dump-logits (or import-logits) -> fit-stats -> diagnose / compare / correct /
    relabel -> evaluate; `blda info` describes a store or stats file. `blda demo` runs it all
    on a built-in synthetic case. The method, the metrics and the file formats are explained in
    docs/method.md, docs/metrics.md and docs/formats.md of the repository.
    """
