"""``blda compare``: every correction and strength side by side on labelled images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from blda_posthoc.cli.common import (
    bootstrap_option,
    check_output_file,
    compare_merge_hint,
    device_option,
    explicit,
    handle_errors,
    info,
    label_suffix_option,
    labels_dir_option,
    overwrite_option,
    resolve_device,
    resolve_shard,
    shard_option,
    shard_text,
    statistics_options,
    warn,
)
from blda_posthoc.core.defaults import (
    COMPARE_DEFAULT,
    DEFAULT_TAU_GRID,
    METHODS,
    METRICS,
    removed_reason,
)

MERGE_KEEPS = ("metric", "max_class_loss", "bootstrap", "seed")
"""Options a merge takes from the shards' settings (given to --merge they are refused)."""


def check_method_names(text: str) -> str:
    """``--methods``: every comma-separated name is ``all`` or a method (a usage error else)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    for name in names:
        reason = removed_reason(name)
        if reason is not None:
            raise click.UsageError(f"--methods {reason}")
    unknown = sorted(set(names).difference(METHODS, {"all"}))
    if unknown:
        raise click.BadParameter(
            f"unknown {', '.join(unknown)} (choose from all, {', '.join(METHODS)})"
        )
    if not names:
        raise click.BadParameter("name at least one method, or all")
    return text


def parse_select_on(text: str | None) -> float | None:
    """``--select-on``: a count of images (>= 1) or a fraction in (0, 1)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number", param_hint="--select-on") from None
    if not (0 < value < 1 or (value >= 1 and value == int(value))):
        raise click.BadParameter(
            f"{text!r}: give a count of images (1, 2, ...) or a fraction in (0, 1)",
            param_hint="--select-on",
        )
    return value


@click.command("compare")
@click.argument("stores", nargs=-1, required=True)
@statistics_options
@click.option(
    "--methods",
    default="all",
    show_default=True,
    callback=lambda ctx, param, value: check_method_names(value),
    help=f"Comma-separated methods to compare (any of {', '.join(METHODS)}), or all: "
    f"{', '.join(COMPARE_DEFAULT)} (the benchmark's winners and the defaults; "
    "docs/methods.md).",
)
@click.option(
    "--tau",
    "tau_grid",
    default=",".join(f"{t:g}" for t in DEFAULT_TAU_GRID),
    show_default=True,
    help="Strengths tried for every method that has one (comma-separated).",
)
@labels_dir_option
@label_suffix_option
@click.option(
    "--select-on",
    default=None,
    metavar="N|FRACTION",
    help="Pick the best row on N images (or a fraction) drawn at random and report every figure "
    "on the other images: an honest estimate of what the choice gains.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the --select-on draw and of the bootstrap resampling.",
)
@click.option(
    "--metric",
    type=click.Choice(METRICS),
    default="miou",
    show_default=True,
    help="What the selection maximises; every gain and interval is in it.",
)
@click.option(
    "--max-class-loss",
    type=click.FloatRange(min=0),
    default=None,
    metavar="POINTS",
    help="Leave out of the selection every row that lowers some class's IoU by more than "
    "POINTS against none (on the selection images, or all images without --select-on). "
    "Default: off.",
)
@bootstrap_option("every row's gain over none")
@click.option(
    "--json",
    "json_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the comparison as JSON (correct --from-compare reads it).",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="mIoU against tau per method and the selected row's per-class gain.",
)
@click.option(
    "--pixel-stride",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="S",
    help="Evaluate every row on every S-th pixel of each axis of the full-size images (1/S² of "
    "the pixels, the same per-pixel values): the per-image work falls about S²-fold (the "
    "run's fixed start-up stays), for choosing a row on large images; 1 evaluates every pixel.",
)
@shard_option
@click.option(
    "--merge",
    is_flag=True,
    help="STORES are instead the --json reports of shards 1..N (--shard K/N): add them up and "
    "report all images, as one run would.",
)
@device_option
@overwrite_option
@handle_errors
def command(
    stores: tuple[str, ...],
    stats: Path | None,
    anchors: Path | None,
    clamp: float,
    min_pixels: int | None,
    methods: str,
    tau_grid: str,
    labels_dir: Path | None,
    label_suffix: str,
    select_on: str | None,
    seed: int,
    metric: str,
    max_class_loss: float | None,
    bootstrap: int,
    json_path: Path,
    plot_path: Path | None,
    pixel_stride: int,
    shard: tuple[int, int] | None,
    merge: bool,
    device: str,
    overwrite: bool,
) -> None:
    """Evaluate every correction method × strength on the labelled images of STORES, in one pass.

    Prints a table (the selected row marked *), writes the JSON and optionally a plot. With
    --select-on N the choice is made on N images and every figure comes from the others.

    With --shard K/N (or under torchrun) shard K evaluates its share of the name-sorted images
    (the --select-on split is drawn over all images first) and writes JSON-K-of-N.json; then
    `blda compare --merge compare-*-of-N.json --json compare.json` reports all images.

    Every row carries the 95% paired bootstrap interval of its gain over none (resampling the
    images the figures come from); a selection whose interval includes 0 is not told apart
    from no gain, and the summary says so.

    Example: blda compare tgt_val.h5 --stats tgt_stats.h5 --anchors src_stats.h5
    --select-on 10 --json compare.json --plot compare.png
    """
    from blda_posthoc.io.store import LogitStore, expand_store_paths
    from blda_posthoc.pipelines.compare import (
        BOOTSTRAP_MEMORY,
        Comparison,
        Rule,
        bootstrap_bytes,
        build_report,
        build_rows,
        check_methods,
        compare_store,
        compare_tables,
        make_split,
        merge_reports,
        parse_grid,
        partial_block,
    )
    from blda_posthoc.pipelines.corrections import CorrectionSpec, read_statistics
    from blda_posthoc.pipelines.dump_logits import shard_path
    from blda_posthoc.pipelines.evaluate import shard_pairs, store_labels
    from blda_posthoc.report.plots import require_matplotlib

    if merge:
        if shard is not None or stats is not None:
            raise click.UsageError(
                "--merge takes the shards' JSON reports as arguments, without --stats or --shard"
            )
        given = [f"--{n.replace('_', '-')}" for n in MERGE_KEEPS if explicit(n)]
        if given:
            raise click.UsageError(
                f"--merge reports with the shards' settings: give {', '.join(given)} to the "
                "shards instead"
            )
        for path in (json_path, plot_path):
            if path is not None:
                check_output_file(path, overwrite, stores)
        if plot_path is not None:
            require_matplotlib()
        finish(merge_reports(expand_store_paths(stores)), json_path, plot_path)
        return
    run_shard = resolve_shard(shard)
    if run_shard is not None:
        if plot_path is not None:
            raise click.UsageError("--plot describes all images: draw it with --merge")
        json_path = shard_path(json_path, run_shard)
    if stats is None:
        raise click.UsageError("--stats is required")
    fraction = parse_select_on(select_on)
    for path in (json_path, plot_path):
        if path is not None:
            check_output_file(path, overwrite, [*stores, stats, anchors])
    if plot_path is not None:
        require_matplotlib()
    wanted = check_methods([m.strip() for m in methods.split(",") if m.strip()])
    taus = parse_grid(tau_grid)
    dev = resolve_device(device)
    spec = CorrectionSpec("blda", None, False, stats, anchors, clamp, min_pixels)
    paths = expand_store_paths(stores)
    with LogitStore(paths) as store:
        statistics = read_statistics(
            stats, anchors, store.class_names, tables=compare_tables(wanted, taus)
        )
        pairs, label_files = store_labels(
            store, labels_dir, label_suffix, allow_missing=False, command="compare"
        )
        split = make_split(pairs.names, fraction, seed)  # over all images: shards agree
        rows, auto, skipped = build_rows(wanted, taus, spec, statistics, store.class_names, dev)
        rule = Rule(metric, max_class_loss, bootstrap, seed)
        if bootstrap:  # decided on all images, so that every shard decides alike
            size = bootstrap_bytes(len(rows), len(pairs.names), store.num_classes)
            if size > BOOTSTRAP_MEMORY:
                warn(
                    f"--bootstrap turned off: the per-image counts of {len(rows)} rows x "
                    f"{len(pairs.names)} images x {store.num_classes} classes would take "
                    f"{size / 2**30:.1f} GiB (more than {BOOTSTRAP_MEMORY / 2**30:g} GiB); "
                    "compare fewer rows (--methods, --tau) or shard the images"
                )
                rule = Rule(metric, max_class_loss, 0, seed)
        pairs = shard_pairs(pairs, store.names, run_shard)
        for method, reason in skipped.items():
            warn(f"{method} left out: {reason}")
        info(f"comparing {len(rows)} rows on {len(pairs.names)} images")
        compare_store(
            store,
            pairs,
            label_files,
            rows,
            split=split,
            device=dev,
            per_image=rule.bootstrap > 0,
            pixel_stride=pixel_stride,
        )
        settings = dict(statistics.settings())
        # Absolute: --from-compare finds them from any working directory.
        settings.update(
            stats=str(Path(stats).resolve()), anchors=str(Path(anchors or stats).resolve())
        )
        settings.update(
            methods=wanted,
            tau_grid=taus,
            select_on=fraction,
            seed=seed,
            clamp=clamp,
            min_pixels=min_pixels,
            labels=str(labels_dir) if labels_dir is not None else "store",
            store_fingerprints=store.fingerprints,
            **rule.settings(),
            pixel_stride=pixel_stride,
        )
        comparison = Comparison(rows, split, auto, skipped, pairs)
        report = build_report(comparison, store.class_names, settings, paths)
        if run_shard is not None:
            report["partial"] = partial_block(comparison, run_shard)
            info(f"shard {run_shard[0]}/{run_shard[1]}: these figures cover its images only")
    finish(report, json_path, plot_path)


def finish(report: dict[str, Any], json_path: Path, plot_path: Path | None) -> None:
    """Print the table, write the JSON (and plot) and say how to apply the selection."""
    from blda_posthoc.io.jsonfiles import write_json
    from blda_posthoc.pipelines.compare import format_table, plot_compare, summary_lines

    click.echo(format_table(report), nl=False)
    write_json(json_path, report)
    info(f"wrote {json_path}")
    if plot_path is not None:
        plot_compare(plot_path, report)
        info(f"wrote {plot_path}")
    chosen = report["selected"]
    tau = "" if chosen["tau"] is None else f" --tau {chosen['tau']:g}"
    if "partial" in report:  # a shard chose on its own images: merge before applying
        shard = report["partial"]["shard"]
        info(
            f"shard {shard_text(shard)} would select --method {chosen['method']}{tau} on its "
            f"images only; once every shard has run: {compare_merge_hint(json_path, shard)}"
        )
        return
    for line in summary_lines(report):
        info(line)
    if chosen["gain_over_none"] is not None:
        info(f"apply it with blda correct STORES --from-compare {json_path} --out-dir DIR")
