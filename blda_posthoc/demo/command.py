"""``blda demo``: the whole method on a built-in synthetic domain-adaptation case."""

from __future__ import annotations

from pathlib import Path

import click

from blda_posthoc.cli.common import device_option, handle_errors, overwrite_option
from blda_posthoc.demo.data import DEFAULT_COUNT, DEFAULT_SEED


@click.command("demo")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("blda-demo"),
    show_default=True,
    help="Where everything is written.",
)
@click.option(
    "--images",
    "count",
    type=click.IntRange(4, 10000),
    default=DEFAULT_COUNT,
    show_default=True,
    help="Scenes per domain.",
)
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help="Data seed.")
@device_option
@overwrite_option
@handle_errors
def command(workdir: Path, count: int, seed: int, device: str, overwrite: bool) -> None:
    """Generate a synthetic source/target street-scene case and run the whole pipeline on it.

    dump-logits (shipped demo network) -> fit-stats (source gt, target pseudo) -> diagnose ->
    correct (two settings, tau 0.2) -> evaluate, then a before/after table, a Markdown report,
    a per-class IoU chart and example pictures in the work folder. Running it again replaces
    its own earlier outputs there.
    """
    from blda_posthoc.demo.run import echo_summary, run_demo

    summary = run_demo(workdir, count, seed, device, overwrite)
    echo_summary(summary, workdir)
