"""Messages and progress bars for the user, on stderr (stdout is kept for results)."""

from __future__ import annotations

import sys
from typing import Any

import click


def warn(message: str) -> None:
    """Print ``warning: message`` on stderr."""
    click.echo(f"warning: {message}", err=True)


def info(message: str) -> None:
    """Print a progress note on stderr (stdout stays for results)."""
    click.echo(message, err=True)


def progress(iterable: Any, total: int | None, desc: str, unit: str = "img") -> Any:
    """A tqdm progress bar on stderr, off when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=None,
        file=sys.stderr,
        dynamic_ncols=True,
    )
