"""``blda evaluate``: segmentation metrics of PNG predictions or of a store, before/after."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from blda_posthoc.cli.common import (
    FILE,
    FOLDER,
    bootstrap_option,
    check_output_file,
    class_names_option,
    correction_options,
    device_option,
    explicit,
    handle_errors,
    info,
    label_suffix_option,
    labels_dir_option,
    overwrite_option,
    parse_class_names,
    report_notes,
    resolve_device,
    resolve_shard,
    shard_option,
    warn,
)
from blda_posthoc.core.defaults import DEFAULT_BOOTSTRAP
from blda_posthoc.errors import InputError
from blda_posthoc.outputs import write_text

if TYPE_CHECKING:
    import torch

    from blda_posthoc.io.store import LogitStore
    from blda_posthoc.pipelines.corrections import CorrectionSpec
    from blda_posthoc.report.tables import Result


def check_usage(
    pred_dir: Path | None,
    stores: tuple[str, ...],
    labels_dir: Path | None,
    correction: CorrectionSpec | None,
    num_classes: int | None,
    ignore_pred_ignore: bool = False,
) -> None:
    """Reject option combinations that cannot work (click usage errors, exit 2)."""
    if (pred_dir is None) == (not stores):
        raise click.UsageError(
            "give STORES (logits), or --pred-dir DIR (PNG predictions, scored against "
            "--labels DIR), not both"
        )
    if pred_dir is not None and labels_dir is None:
        raise click.UsageError("--pred-dir needs --labels DIR")
    if pred_dir is not None and correction is not None:
        raise click.UsageError("a correction (--stats/--method) needs STORES: it works on logits")
    if stores and num_classes is not None:
        raise click.UsageError("--num-classes is for --pred-dir; a store carries its classes")
    if stores and ignore_pred_ignore:
        raise click.UsageError(
            "--ignore-pred-ignore is for --pred-dir (a store's argmax never predicts 255)"
        )


def store_class_names(store: LogitStore, spec: str | None) -> list[str]:
    """The store's class names, optionally renamed by ``--class-names`` (same count)."""
    names = parse_class_names(spec)
    if names is None:
        return list(store.class_names)
    if len(names) != store.num_classes:
        raise InputError(
            f"--class-names gives {len(names)} names, the store has {store.num_classes} classes"
        )
    return names


def write_outputs(
    paths: dict[str, Path | None],
    class_names: list[str],
    before: Result,
    after: Result | None,
    counts: dict[str, int],
    settings: dict[str, Any],
    partial: dict[str, Any] | None = None,
    gain_ci95: list[float | None] | None = None,
) -> None:
    """Print the table and write the requested JSON, Markdown and plot files.

    A shard's JSON report also holds ``partial``: its raw accumulators, for ``--merge``.
    ``gain_ci95``: the interval of the mIoU gain of a before/after run (None: not computed).
    """
    from blda_posthoc.core.bootstrap import includes_zero
    from blda_posthoc.io.jsonfiles import write_json
    from blda_posthoc.report.plots import plot_confusion, plot_iou
    from blda_posthoc.report.tables import build_report, format_markdown, format_table

    click.echo(format_table(class_names, before, after, gain_ci95))
    if includes_zero(gain_ci95) and partial is None:
        info(
            f"note: the 95% interval of the mIoU gain includes 0: on these {counts['num_images']} "
            "images the correction is not told apart from no change (more images narrow it)"
        )
    if paths["json"] is not None:
        report = build_report(
            class_names, before, after, counts=counts, settings=settings, gain_ci95=gain_ci95
        )
        if partial is not None:
            report["partial"] = partial
        write_json(paths["json"], report)
        info(f"wrote {paths['json']}")
    if paths["markdown"] is not None:
        text = format_markdown(
            class_names, before, after, counts=counts, settings=settings, gain_ci95=gain_ci95
        )
        write_text(paths["markdown"], text)
        info(f"wrote {paths['markdown']}")
    if paths["plot"] is not None:
        plot_iou(paths["plot"], class_names, before, after)
        info(f"wrote {paths['plot']}")
    if paths["confusion"] is not None:
        plot_confusion(paths["confusion"], class_names, before, after)
        info(f"wrote {paths['confusion']}")


def note_out_of_range(
    results: list[Result | None], num_classes: int, pred_dir: bool = False
) -> None:
    """Warn when predictions held ids outside the classes (they count as wrong)."""
    pixels = max((r.summary["out_of_range_pixels"] for r in results if r), default=0)
    if pixels:
        hint = (
            " (if 255 in the predictions means 'no label', as in pseudo-labels, "
            "--ignore-pred-ignore leaves those pixels out)"
            if pred_dir
            else ""
        )
        warn(
            f"{pixels} labelled pixels were predicted with ids outside 0..{num_classes - 1}; "
            f"they count as wrong{hint}"
        )


IN_FILE = click.Path(path_type=Path, dir_okay=False)


@click.command("evaluate")
@click.argument("stores", nargs=-1)
@click.option("--store", "store_options", multiple=True, hidden=True)
@click.option("--pred-dir", type=FOLDER, help="Folder of NAME.png trainId predictions.")
@labels_dir_option
@label_suffix_option
@class_names_option
@click.option("--num-classes", type=click.IntRange(1, 255), help="Class count (for --pred-dir).")
@correction_options
@click.option(
    "--allow-missing", is_flag=True, help="Evaluate the rest when predictions are missing."
)
@click.option(
    "--ignore-pred-ignore",
    is_flag=True,
    help="With --pred-dir: leave out pixels predicted as 255 (ignore) instead of counting them "
    "as wrong, e.g. to score pseudo-labels as relabel's quality report does.",
)
@click.option("--json", "json_path", type=FILE, help="Write the report as JSON.")
@click.option("--markdown", "markdown_path", type=FILE, help="Write the report as Markdown.")
@click.option("--plot", "plot_path", type=FILE, help="Per-class IoU bar chart (needs matplotlib).")
@click.option(
    "--confusion-plot",
    "confusion_path",
    type=FILE,
    help="Row-normalised confusion matrix (before and after with a correction; needs matplotlib).",
)
@bootstrap_option("the mIoU gain (with a correction)")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the bootstrap resampling.",
)
@shard_option
@click.option(
    "--merge",
    is_flag=True,
    help="STORES are instead the --json reports of shards 1..N (--shard K/N): add them up and "
    "report all images, as one run would.",
)
@overwrite_option
@device_option
@handle_errors
def command(
    stores: tuple[str, ...],
    store_options: tuple[str, ...],
    pred_dir: Path | None,
    labels_dir: Path | None,
    label_suffix: str,
    class_names: str | None,
    num_classes: int | None,
    correction: CorrectionSpec | None,
    allow_missing: bool,
    ignore_pred_ignore: bool,
    json_path: Path | None,
    markdown_path: Path | None,
    plot_path: Path | None,
    confusion_path: Path | None,
    bootstrap: int,
    seed: int,
    shard: tuple[int, int] | None,
    merge: bool,
    overwrite: bool,
    device: str,
) -> None:
    """Per-class IoU, accuracy, Bias and pred/true ratio; mIoU, mAcc, IoU std, ECE.

    Predictions come from STORES (argmax of the logits, upsampled bilinearly to the label size)
    or from --pred-dir (PNGs); labels from --labels or the store. With --stats (and --anchors) the
    stores are evaluated before and after the correction in one run. The table goes to stdout.
    Metrics are defined in docs/metrics.md.

    With a correction, the mIoU gain comes with its 95% paired bootstrap interval over images
    (--bootstrap N resamples, --seed); an interval that includes 0 is said.

    With --shard K/N (or under torchrun) only shard K's share of the name-sorted images is
    evaluated and --json is written to JSON-K-of-N.json with the raw counts; then
    `blda evaluate --merge eval-*-of-N.json --json eval.json` reports all images.

    Example: blda evaluate tgt.h5 --stats tgt_stats.h5 --anchors src_stats.h5 --json eval.json
    """
    from blda_posthoc.pipelines.dump_logits import shard_path
    from blda_posthoc.report.plots import require_matplotlib

    stores = stores + store_options  # --store: the spelling before 0.2, kept for one release
    outputs = {
        "json": json_path,
        "markdown": markdown_path,
        "plot": plot_path,
        "confusion": confusion_path,
    }
    given = [f"--{name}" for name in ("bootstrap", "seed") if explicit(name)]
    if merge:
        if not stores or pred_dir is not None or correction is not None or shard is not None:
            raise click.UsageError(
                "--merge takes the shards' JSON reports as arguments, without --pred-dir, "
                "a correction or --shard"
            )
        if given:
            raise click.UsageError(
                f"--merge reports with the shards' settings: give {', '.join(given)} to the "
                "shards instead"
            )
        for path in outputs.values():
            if path is not None:
                check_output_file(path, overwrite, stores)
        if plot_path is not None or confusion_path is not None:
            require_matplotlib("--plot" if plot_path is not None else "--confusion-plot")
        run_merge(stores, outputs)
        return
    run_shard = resolve_shard(shard) if pred_dir is None else None
    if shard is not None and pred_dir is not None:
        raise click.UsageError("--shard is for STORES (--pred-dir reads PNGs)")
    if run_shard is not None:
        if json_path is None:
            raise click.UsageError("--shard writes a partial report to merge: give --json")
        if markdown_path is not None or plot_path is not None or confusion_path is not None:
            raise click.UsageError(
                "--markdown and the plots describe all images: write them with --merge"
            )
        json_path = shard_path(json_path, run_shard)
    check_usage(pred_dir, stores, labels_dir, correction, num_classes, ignore_pred_ignore)
    if given and correction is None:
        raise click.UsageError(
            f"{', '.join(given)}: the interval is of a correction's gain; give --stats (and "
            "--method) to evaluate before and after"
        )
    outputs["json"] = json_path  # a shard's own file
    for path in outputs.values():
        if path is not None:
            inputs = [*stores, pred_dir, labels_dir]
            if correction is not None:
                inputs += [correction.stats, correction.anchors]
            check_output_file(path, overwrite, inputs)
    if plot_path is not None or confusion_path is not None:
        require_matplotlib("--plot" if plot_path is not None else "--confusion-plot")
    if pred_dir is not None:
        assert labels_dir is not None
        run_pred_dir(
            pred_dir,
            labels_dir,
            label_suffix,
            class_names,
            num_classes,
            allow_missing,
            outputs,
            ignore_pred_ignore=ignore_pred_ignore,
        )
    else:
        run_store(
            stores,
            labels_dir,
            label_suffix,
            class_names,
            correction,
            allow_missing,
            outputs,
            resolve_device(device),
            run_shard,
            bootstrap=(bootstrap, seed),
        )


def run_pred_dir(
    pred_dir: Path,
    labels_dir: Path,
    label_suffix: str,
    class_spec: str | None,
    num_classes: int | None,
    allow_missing: bool,
    outputs: dict[str, Path | None],
    *,
    ignore_pred_ignore: bool = False,
) -> None:
    """``evaluate --pred-dir``."""
    from blda_posthoc.core.evaluate import summarize
    from blda_posthoc.pipelines.evaluate import (
        evaluate_pred_dir,
        folder_class_names,
        resolve_classes,
    )
    from blda_posthoc.report.tables import Result

    names = parse_class_names(class_spec)
    if names is None and num_classes is None:
        found = folder_class_names(pred_dir)  # correct.json / manifest.json name them
        if found is not None:
            names, source = found
            info(f"class names from {source}")
    known = len(names) if names is not None else num_classes
    cm, pairs = evaluate_pred_dir(
        pred_dir,
        labels_dir,
        label_suffix,
        known,
        allow_missing,
        ignore_pred_ignore=ignore_pred_ignore,
    )
    class_names = resolve_classes(names, num_classes, None if known else cm)
    if cm.num_classes != len(class_names):
        cm = cm.resized(len(class_names))
    confusion = cm.compute()
    result = Result(summarize(confusion), confusion=confusion)
    note_out_of_range([result], len(class_names), pred_dir=True)
    if cm.ignored_pred_pixels:
        info(
            f"note: {cm.ignored_pred_pixels} labelled pixels predicted as 255 (ignore) are left "
            "out (--ignore-pred-ignore)"
        )
    settings = {
        "source": "pred_dir",
        "pred_dir": str(pred_dir),
        "labels": str(labels_dir),
        "label_suffix": label_suffix,
        "num_classes": len(class_names),
        "classes_inferred": known is None,
        "ignore_pred_ignore": ignore_pred_ignore,
    }
    counts = {**pairs.counts(), "ignored_pred_pixels": cm.ignored_pred_pixels}
    write_outputs(outputs, class_names, result, None, counts, settings)


def run_store(
    stores: tuple[str, ...],
    labels_dir: Path | None,
    label_suffix: str,
    class_spec: str | None,
    spec: CorrectionSpec | None,
    allow_missing: bool,
    outputs: dict[str, Path | None],
    device: torch.device,
    shard: tuple[int, int] | None = None,
    *,
    bootstrap: tuple[int, int] = (DEFAULT_BOOTSTRAP, 0),
) -> None:
    """``evaluate STORES``, optionally before and after a correction (of one shard's images).

    ``bootstrap``: resamples and seed of the mIoU gain's interval (with a correction).
    """
    from blda_posthoc.io.store import LogitStore, expand_store_paths
    from blda_posthoc.pipelines.corrections import load_correction
    from blda_posthoc.pipelines.evaluate import (
        evaluate_store,
        gain_interval,
        partial_block,
        shard_pairs,
        store_labels,
    )

    paths = expand_store_paths(stores)
    with LogitStore(paths) as store:
        class_names = store_class_names(store, class_spec)
        correction = None
        if spec is not None:
            correction = load_correction(spec, list(store.class_names), device)
        pairs, label_files = store_labels(store, labels_dir, label_suffix, allow_missing)
        if correction is not None:  # once the labels are found: no warning before their errors
            report_notes(correction)
        pairs = shard_pairs(pairs, store.names, shard)
        resamples, seed = bootstrap if correction is not None else (0, 0)
        plain, corrected = evaluate_store(
            store, pairs, label_files, correction, device, per_image=resamples > 0
        )
    before, after = plain.result(), corrected.result() if corrected is not None else None
    if pairs.unlabelled and not label_files:
        warn(f"{len(pairs.unlabelled)} images in the store have no label and are left out")
    if not pairs.names:
        where = f" in shard {shard[0]}/{shard[1]}" if shard is not None else ""
        raise InputError(f"{paths[0]}: no image{where} has a label")
    note_out_of_range([before, after], len(class_names))
    settings: dict[str, Any] = {
        "source": "store",
        "stores": [str(p) for p in paths],
        "labels": str(labels_dir) if labels_dir is not None else "store",
        "label_suffix": label_suffix,
        "num_classes": len(class_names),
    }
    if correction is not None:
        settings.update(correction.settings)
        settings.update(bootstrap=resamples, seed=seed)
    partial = None
    if shard is not None:
        partial = partial_block(shard, class_names, plain, corrected, pairs.counts())
        info(f"shard {shard[0]}/{shard[1]}: these figures cover its {len(pairs.names)} images")
    interval = gain_interval(plain, corrected, n=resamples, seed=seed)
    write_outputs(outputs, class_names, before, after, pairs.counts(), settings, partial, interval)


def run_merge(parts: tuple[str, ...], outputs: dict[str, Path | None]) -> None:
    """``evaluate --merge PARTS``: the shards' partial reports added up."""
    from blda_posthoc.io.store import expand_store_paths
    from blda_posthoc.pipelines.evaluate import gain_interval, merge_partials

    paths = expand_store_paths(parts)
    merged = merge_partials(paths)
    before = merged.before.result()
    after = merged.after.result() if merged.after is not None else None
    note_out_of_range([before, after], len(merged.class_names))
    interval = gain_interval(
        merged.before,
        merged.after,
        n=int(merged.settings.get("bootstrap", 0)),
        seed=int(merged.settings.get("seed", 0)),
    )
    write_outputs(
        outputs,
        merged.class_names,
        before,
        after,
        merged.counts,
        merged.settings,
        gain_ci95=interval,
    )
