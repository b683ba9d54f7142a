"""``blda fit-stats``: class-conditional logit distributions from one or more stores."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from blda_posthoc.cli.common import (
    check_output_file,
    device_option,
    handle_errors,
    info,
    overwrite_option,
    progress,
    resolve_device,
    warn,
)
from blda_posthoc.core.fit import ESTIMATORS, LogitStats
from blda_posthoc.io.fit_stats import DEFAULT_BINS, LABEL_SOURCES, fit_store
from blda_posthoc.io.stats import write_stats
from blda_posthoc.io.store import LogitStore, expand_store_paths


@click.command("fit-stats")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Stats file to write.")
@click.option(
    "--labels",
    type=click.Choice(LABEL_SOURCES),
    default=None,
    help="Cell labels: gt (the store's labels) or pseudo (argmax of the logits). "
    "Default: gt when every image has a label, else pseudo.",
)
@click.option(
    "--estimator",
    type=click.Choice(ESTIMATORS),
    default="hist",
    show_default=True,
    help="hist: exact empirical CDF; gmm: K-component Gaussian mixtures (the paper).",
)
@click.option(
    "--components",
    type=click.IntRange(1, 64),
    default=5,
    show_default=True,
    help="Mixture components for --estimator gmm.",
)
@click.option(
    "--min-pixels",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="Cells with fewer pixels get no shift when correcting.",
)
@click.option(
    "--bins",
    type=click.IntRange(16, 1 << 16),
    default=DEFAULT_BINS,
    show_default=True,
    help="Histogram bins over the logit range.",
)
@device_option
@overwrite_option
@handle_errors
def command(
    stores: tuple[str, ...],
    out: Path,
    labels: str | None,
    estimator: str,
    components: int,
    min_pixels: int,
    bins: int,
    device: str,
    overwrite: bool,
) -> None:
    """Fit per-class logit distributions from STORES (files or globs; shards are merged).

    Example: blda fit-stats src.h5 --labels gt --out src_stats.h5
    """
    check_output_file(out, overwrite)
    with LogitStore(expand_store_paths(stores)) as store:
        if labels is None:
            labels = "gt" if store.has_labels() else "pseudo"
            info(f"labels: {labels} (pass --labels to choose)")
        stats = fit_store(
            store,
            labels=labels,
            estimator=estimator,
            components=components,
            min_pixels=min_pixels,
            bins=bins,
            device=resolve_device(device),
            progress=lambda it, n: progress(it, n, "fit-stats"),
        )
    write_stats(out, stats, overwrite=overwrite)
    report_cells(stats)
    info(f"wrote {out} (fingerprint {stats.fingerprint})")


def report_cells(stats: LogitStats) -> None:
    """Say how many pixels the statistics hold and which cells are too small to use."""
    pixels = stats.cell_pixels
    min_pixels = int(stats.settings["min_pixels"])
    info(
        f"{stats.settings['num_images']} images, {stats.settings['num_pixels']} labelled pixels,"
        f" labels={stats.settings['labels']}, estimator={stats.estimator}"
    )
    small = pixels < min_pixels
    if small.any():
        empty = [stats.class_names[i] for i in np.flatnonzero(np.diag(small))]
        warn(
            f"{int(small.sum())} of {small.size} cells hold fewer than {min_pixels} pixels and "
            "will get no shift"
            + (f"; classes without a usable positive cell: {', '.join(empty)}" if empty else "")
        )
