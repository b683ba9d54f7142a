"""``blda diagnose``: which classes the frozen model over- or under-predicts."""

from __future__ import annotations

from pathlib import Path

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
from blda_posthoc.core.diagnose import diagnose
from blda_posthoc.io.diagnose import (
    count_predictions,
    estimated_priors,
    format_table,
    load_or_fit_stats,
    plot_scores,
    report_dict,
)
from blda_posthoc.io.report import require_matplotlib, write_json
from blda_posthoc.io.store import LogitStore, expand_store_paths


@click.command("diagnose")
@click.argument("stores", nargs=-1, required=True)
@click.option(
    "--stats",
    "stats_path",
    type=FILE,
    default=None,
    help="Stats file (default: fit pseudo-label statistics of STORES on the fly).",
)
@click.option(
    "--anchors",
    "anchors_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Source stats file fitted with --label-source gt: its calibration and class priors give "
    "an EM estimate of the target priors, and the label-free verdict follows the estimated "
    "predicted/true ratio (needs --stats of version 2).",
)
@click.option("--json", "json_path", type=FILE, help="Write the report as JSON.")
@click.option("--plot", "plot_path", type=FILE, help="Write a score chart.")
@device_option
@overwrite_option
@handle_errors
def command(
    stores: tuple[str, ...],
    stats_path: Path | None,
    anchors_path: Path | None,
    json_path: Path | None,
    plot_path: Path | None,
    device: str,
    overwrite: bool,
) -> None:
    """Report per class whether the model over- or under-predicts it (Bias too with labels).

    Without labels the verdict is an estimate: from the EM estimate of the class priors with
    --anchors (better), else from the logit score; 'uncertain' where it cannot tell. See
    docs/metrics.md.

    Example: blda diagnose tgt.h5 --stats tgt_stats.h5 --anchors src_stats.h5 --json d.json
    """
    for path in (json_path, plot_path):
        if path is not None:
            check_output_file(path, overwrite, [*stores, stats_path])
    if plot_path is not None:
        require_matplotlib()
    dev = resolve_device(device)
    with LogitStore(expand_store_paths(stores)) as store:
        stats = load_or_fit_stats(store, stats_path, dev)
        predicted, confusion = count_predictions(
            store, device=dev, progress=lambda it, n: progress(it, n, "diagnose")
        )
        num_images = len(store)
        priors = None
        if anchors_path is not None:
            if stats_path is None:
                raise click.UsageError("--anchors needs --stats")
            priors, why = estimated_priors(stats_path, anchors_path, store.class_names)
            if why is not None:
                warn(why)
    result = diagnose(stats, predicted, confusion, target_priors=priors)
    click.echo(format_table(result))
    unknown = [d.name for d in result.classes if d.decided_by is None]
    if unknown:
        warn(f"no verdict (too few positive pixels, no labels) for: {', '.join(unknown)}")
    if json_path is not None:
        write_json(json_path, report_dict(result, stats, stats_path, num_images), sort_keys=True)
        info(f"wrote {json_path}")
    if plot_path is not None:
        plot_scores(plot_path, result)
        info(f"wrote {plot_path}")
