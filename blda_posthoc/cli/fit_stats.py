"""``blda fit-stats``: class-conditional logit distributions from one or more stores."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from blda_posthoc.cli.common import (
    FILE,
    check_output_file,
    device_option,
    handle_errors,
    info,
    overwrite_option,
    progress,
    resolve_device,
    warn,
)
from blda_posthoc.core.defaults import (
    DEFAULT_BINS,
    DEFAULT_SAMPLE_PIXELS,
    ESTIMATORS,
    LABEL_SOURCES,
)
from blda_posthoc.outputs import Claim, check_not_input

if TYPE_CHECKING:
    import numpy as np

    from blda_posthoc.core.fit import LogitStats


@click.command("fit-stats")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", required=True, type=FILE, help="Stats file to write.")
@click.option(
    "--label-source",
    "labels",
    type=click.Choice(LABEL_SOURCES),
    default=None,
    help="Cell labels: gt (the store's labels) or pseudo (argmax of the logits). "
    "Default: gt when every image has a label, else pseudo.",
)
@click.option(  # the old spelling, kept for one release; other commands' --labels is a folder
    "--labels",
    "labels_alias",
    type=click.Choice(LABEL_SOURCES),
    default=None,
    hidden=True,
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
@click.option(
    "--sample-pixels",
    type=click.IntRange(0, 10_000_000),
    default=DEFAULT_SAMPLE_PIXELS,
    show_default=True,
    help="Seeded pixel sample kept in the file (calibration fit, em-map, ot-prior, --tau auto).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the pixel sample.")
@click.option(
    "--calibrate/--no-calibrate",
    default=True,
    show_default=True,
    help="With --label-source gt: fit temperature, vector-scaling and bias calibrations and the "
    "statistics of calibrated logits (a second pass).",
)
@click.option(
    "--calibration",
    "calibration_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="A stats file fitted with --label-source gt (usually the source's): also fit statistics "
    "of the logits calibrated with its vector scaling, for --method calibrated-blda.",
)
@device_option
@overwrite_option
@handle_errors
def command(
    stores: tuple[str, ...],
    out: Path,
    labels: str | None,
    labels_alias: str | None,
    estimator: str,
    components: int,
    min_pixels: int,
    bins: int,
    sample_pixels: int,
    seed: int,
    calibrate: bool,
    calibration_path: Path | None,
    device: str,
    overwrite: bool,
) -> None:
    """Fit per-class logit distributions from STORES (files or globs; shards are merged).

    Example: blda fit-stats src.h5 --label-source gt --out src_stats.h5
    """
    from blda_posthoc.io.stats import write_stats
    from blda_posthoc.io.store import LogitStore, expand_store_paths
    from blda_posthoc.pipelines.fit_stats import FitOptions, fit_store
    from blda_posthoc.pipelines.memory import applying_warning, memory_budget

    if labels_alias is not None:
        if labels is not None and labels != labels_alias:
            raise click.UsageError("--labels is the old spelling of --label-source; give one")
        labels = labels_alias
    check_output_file(out, overwrite)
    memory_budget()  # a bad BLDA_MEMORY_GIB is said before any work
    dev = resolve_device(device)  # before any work: a bad --device is the first thing said
    paths = expand_store_paths(stores)
    check_not_input(out, [*paths, calibration_path], option="--out")
    with Claim(out):  # a second run writing the same file stops at once
        with LogitStore(paths) as store:
            calibration = None
            if calibration_path is not None:
                calibration = read_calibration(calibration_path, store.class_names)
            if labels is None:
                labels = "gt" if store.has_labels() else "pseudo"
                info(f"labels: {labels} (pass --label-source to choose)")
            options = FitOptions(
                labels=labels,
                estimator=estimator,
                components=components,
                min_pixels=min_pixels,
                bins=bins,
                sample_pixels=sample_pixels,
                seed=seed,
                calibrate=calibrate,
                calibration=calibration,
                calibration_source=None if calibration_path is None else str(calibration_path),
            )
            stats = fit_store(
                store,
                options,
                device=dev,
                progress=lambda it, n: progress(it, n, "fit-stats"),
            )
        write_stats(out, stats, overwrite=overwrite)
    report_cells(stats)
    calibrated = stats.extras is not None and stats.extras.calibrated is not None
    too_large = applying_warning(
        out, stats.num_classes, stats.grid.bins, groups=2 if calibrated else 1
    )
    if too_large is not None:
        warn(too_large)
    info(f"wrote {out} (fingerprint {stats.fingerprint})")


def read_calibration(path: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The vector-scaling calibration of a stats file fitted with ground truth."""
    from blda_posthoc.io.stats import read_stats
    from blda_posthoc.pipelines.fit_stats import vector_calibration

    return vector_calibration(read_stats(path), str(path), class_names, "--label-source gt")


def report_cells(stats: LogitStats) -> None:
    """Say how many pixels the statistics hold and which cells are too small to use."""
    import numpy as np

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
            + (
                f"; classes without a usable positive cell: {', '.join(empty)} (next step: "
                "correct with --method filled-blda --anchors SOURCE_STATS, which borrows those "
                "cells from source ground truth, or compare the methods with blda compare)"
                if empty
                else ""
            )
        )
    extras = stats.extras
    if extras is not None and "calibration_pixels" in stats.settings:
        from blda_posthoc.core.calibrate import CALIBRATIONS

        fitted = extras.calibrations
        missing = [kind for kind in CALIBRATIONS if kind not in fitted]
        if missing:
            warn(
                f"no {' or '.join(missing)} calibration: its fitted scale was 0 or below (the "
                "logits rank the classes against their labels)"
            )
    if extras is not None and "vector" in extras.calibrations:
        vector = extras.calibrations["vector"]
        info(
            f"calibrations fitted on {stats.settings['calibration_pixels']} labelled pixels "
            f"({', '.join(extras.calibrations)}; "
            f"vector scaling: scale {vector[0].min():.3g}..{vector[0].max():.3g}); "
            "statistics of calibrated logits included"
        )
    elif extras is not None and extras.calibrated is not None:
        info("statistics of calibrated logits included (--method calibrated-blda)")
