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
    label_suffix_option,
    labels_dir_option,
    overwrite_option,
    progress,
    resolve_device,
    resolve_shard,
    shard_option,
    warn,
)
from blda_posthoc.errors import InputError


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
@labels_dir_option
@label_suffix_option
@click.option("--json", "json_path", type=FILE, help="Write the report as JSON.")
@click.option("--plot", "plot_path", type=FILE, help="Write a score chart.")
@shard_option
@click.option(
    "--merge",
    is_flag=True,
    help="STORES are instead the --json reports of shards 1..N (--shard K/N): add them up and "
    "diagnose all images, as one run would (with the statistics the shards used).",
)
@device_option
@overwrite_option
@handle_errors
def command(
    stores: tuple[str, ...],
    stats_path: Path | None,
    anchors_path: Path | None,
    labels_dir: Path | None,
    label_suffix: str,
    json_path: Path | None,
    plot_path: Path | None,
    shard: tuple[int, int] | None,
    merge: bool,
    device: str,
    overwrite: bool,
) -> None:
    """Report per class whether the model over- or under-predicts it (Bias too with labels).

    Labels come from the store, or from --labels DIR (one for every image).

    Without labels the verdict is an estimate: from the EM estimate of the class priors with
    --anchors (better), else from the logit score; 'uncertain' where it cannot tell. See
    docs/metrics.md.

    With --shard K/N (and --stats) shard K counts its share of the name-sorted images into
    JSON-K-of-N.json; `blda diagnose --merge d-*-of-N.json --json d.json` diagnoses all.

    Example: blda diagnose tgt.h5 --stats tgt_stats.h5 --anchors src_stats.h5 --json d.json
    """
    from blda_posthoc.core.diagnose import diagnose
    from blda_posthoc.io.jsonfiles import write_json
    from blda_posthoc.io.store import LogitStore, expand_store_paths
    from blda_posthoc.pipelines.diagnose import (
        count_predictions,
        estimated_priors,
        format_table,
        load_or_fit_stats,
        merge_counts,
        partial_block,
        plot_scores,
        report_dict,
    )
    from blda_posthoc.pipelines.dump_logits import shard_path
    from blda_posthoc.pipelines.evaluate import every_label
    from blda_posthoc.pipelines.memory import read_stats_within_budget
    from blda_posthoc.report.plots import require_matplotlib

    if merge and (
        shard is not None
        or stats_path is not None
        or anchors_path is not None
        or labels_dir is not None
    ):
        raise click.UsageError(
            "--merge takes the shards' JSON reports as arguments (their --stats and --anchors "
            "are reused), without --stats, --anchors, --labels or --shard"
        )
    run_shard = None if merge else resolve_shard(shard)
    if run_shard is not None:
        if stats_path is None:
            raise click.UsageError(
                "--shard needs --stats (fit them first with fit-stats, which merges shards)"
            )
        if json_path is None:
            raise click.UsageError("--shard writes a partial report to merge: give --json")
        if plot_path is not None:
            raise click.UsageError("--plot describes all images: draw it with --merge")
        json_path = shard_path(json_path, run_shard)
    for path in (json_path, plot_path):
        if path is not None:
            check_output_file(path, overwrite, [*stores, stats_path, labels_dir])
    if plot_path is not None:
        require_matplotlib()
    partial = None
    if merge:
        counts = merge_counts(expand_store_paths(stores))
        stats_path, anchors_path = counts.stats_path, counts.anchors_path
        stats = read_stats_within_budget(stats_path)
        if stats.fingerprint != counts.fingerprint:
            raise InputError(f"{stats_path}: not the statistics the shards used (fingerprint)")
        predicted, confusion, num_images = counts.predicted, counts.confusion, counts.num_images
        class_names = stats.class_names
    else:
        dev = resolve_device(device)
        with LogitStore(expand_store_paths(stores)) as store:
            if anchors_path is not None and stats_path is None:
                raise click.UsageError("--anchors needs --stats")
            label_files = every_label(store, labels_dir, label_suffix) if labels_dir else None
            stats = load_or_fit_stats(store, stats_path, dev)
            store.select_shard(run_shard)
            predicted, confusion = count_predictions(
                store,
                label_files=label_files,
                device=dev,
                progress=lambda it, n: progress(it, n, "diagnose"),
            )
            num_images = len(store)
            class_names = store.class_names
        if run_shard is not None:
            partial = partial_block(run_shard, num_images, predicted, confusion, anchors_path)
            info(f"shard {run_shard[0]}/{run_shard[1]}: these figures cover its images only")
    priors = None
    if anchors_path is not None:
        assert stats_path is not None
        priors, why = estimated_priors(stats_path, anchors_path, class_names)
        if why is not None:
            warn(why)
    result = diagnose(stats, predicted, confusion, target_priors=priors)
    click.echo(format_table(result))
    unknown = [d.name for d in result.classes if d.decided_by is None]
    if unknown:
        warn(f"no verdict (too few positive pixels, no labels) for: {', '.join(unknown)}")
    if json_path is not None:
        report = report_dict(result, stats, stats_path, num_images)
        if partial is not None:
            report["partial"] = partial
        write_json(json_path, report, sort_keys=True)
        info(f"wrote {json_path}")
    if plot_path is not None:
        plot_scores(plot_path, result)
        info(f"wrote {plot_path}")
