"""What every command shares: error reporting, common options and option parsing."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import torch

from blda_posthoc.core.correct import DEFAULT_CLAMP, DEFAULT_TAU, AlignmentMaps
from blda_posthoc.io.console import info, progress, warn
from blda_posthoc.io.errors import InputError
from blda_posthoc.io.names import read_class_names

__all__ = ["info", "progress", "warn"]

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> None:
    """Print ``error: message`` on stderr and exit with status 1."""
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def handle_errors(func: F) -> F:
    """Turn :class:`InputError` (and unreadable files) into a one-line ``error:``, exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InputError as exc:
            fail(str(exc))
        except OSError as exc:  # a file or folder that cannot be read or written
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}")
        except KeyboardInterrupt:
            fail("interrupted")

    return wrapper  # type: ignore[return-value]


def class_names_option(func: F) -> F:
    """``--class-names``: preset (``cityscapes``), comma-separated list, or text file."""
    return click.option(
        "--class-names",
        "class_names",
        default=None,
        help="Preset (cityscapes), comma-separated names, or a file with one name per line.",
    )(func)


def parse_class_names(spec: str | None) -> list[str] | None:
    """Resolve ``--class-names`` (None stays None)."""
    return None if spec is None else read_class_names(spec)


def device_option(func: F) -> F:
    """``--device auto|cpu|cuda[:k]``."""
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="auto (CUDA when present), cpu, or cuda[:k].",
    )(func)


def resolve_device(spec: str) -> torch.device:
    """Turn a ``--device`` value into a torch device, checking CUDA is really there."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise InputError(f"--device: {spec!r} is not a device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {spec}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {spec}: only cpu and cuda are supported")
    return device


def overwrite_option(func: F) -> F:
    """``--overwrite``: replace existing outputs."""
    return click.option("--overwrite", is_flag=True, help="Replace existing outputs.")(func)


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output file unless ``--overwrite``."""
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists (use --overwrite to replace it)")


def stats_options(func: F) -> F:
    """``--stats``, ``--anchors``, ``--tau``, ``--clamp``: the correction's settings."""
    options = [
        click.option(
            "--stats",
            "stats_path",
            required=True,
            type=click.Path(path_type=Path),
            help="Stats file of the conditionals F_ij.",
        ),
        click.option(
            "--anchors",
            "anchors_path",
            type=click.Path(path_type=Path),
            help="Stats file whose pooled anchors are the targets (default: --stats).",
        ),
        click.option(
            "--tau",
            type=click.FloatRange(0.0),
            default=DEFAULT_TAU,
            show_default=True,
            help="Correction strength (0 = plain argmax).",
        ),
        click.option(
            "--clamp",
            type=float,
            default=DEFAULT_CLAMP,
            show_default=True,
            help="CDF values are clamped to [r, 1 - r].",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def describe_maps(maps: AlignmentMaps, class_names: list[str]) -> None:
    """Report cells that get no shift."""
    skipped = maps.skipped
    if not skipped:
        return
    own = [class_names[i] for i, j in skipped if i == j]
    warn(
        f"{len(skipped)} of {len(class_names) ** 2} cells hold too few pixels and get no shift"
        + (f" (positive cells of: {', '.join(own)})" if own else "")
    )
