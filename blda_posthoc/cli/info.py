"""``blda info``: what a logits store or stats file holds; set its class names after the fact."""

from __future__ import annotations

import json
from pathlib import Path

import click

from blda_posthoc.cli.common import handle_errors, info


@click.command("info")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@click.option(
    "--rename-classes",
    "rename",
    metavar="NAMES",
    help="Set the class names of every FILE first (same count): a preset (cityscapes), "
    "comma-separated names, or a text (one per line) or JSON file.",
)
@handle_errors
def command(files: tuple[Path, ...], as_json: bool, rename: str | None) -> None:
    """Describe logits stores and stats files (formats: docs/formats.md).

    A store: format, version, classes, images, sizes, labels, shard, dtype. A stats file:
    classes, estimator, grid, labels, sources, settings, fingerprint.

    Example: blda info tgt.h5 tgt_stats.h5 --json

    Example: blda info --rename-classes cityscapes tgt.h5 tgt_stats.h5
    """
    from blda_posthoc.io.names import read_class_names
    from blda_posthoc.pipelines.info import describe_files, format_description, rename_classes

    if rename is not None:
        names = read_class_names(rename)
        for path in files:
            old = rename_classes(path, names)
            if old == names:
                info(f"{path}: class names unchanged")
                continue
            changed = [f"{a} -> {b}" for a, b in zip(old, names, strict=True) if a != b]
            shown = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
            info(f"{path}: renamed {len(changed)} classes ({shown})")
    document = describe_files(files)
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo("\n\n".join(format_description(d) for d in document["files"]))
