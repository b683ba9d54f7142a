"""``blda correct``: anchor-aligned predictions as trainId PNGs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from blda_posthoc.cli.common import (
    check_output_file,
    cityscapes_ids_option,
    color_option,
    correction_options,
    device_option,
    handle_errors,
    info,
    merge_beside,
    overwrite_option,
    progress,
    report_changes,
    report_notes,
    resolve_device,
    resolve_shard,
    shard_option,
)
from blda_posthoc.errors import InputError
from blda_posthoc.outputs import check_not_input, output_folder, partial_path, shard_suffix

if TYPE_CHECKING:
    from blda_posthoc.pipelines.corrections import CorrectionSpec


@click.command("correct")
@click.argument("stores", nargs=-1, required=True)
@correction_options
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for NAME.png trainId predictions (required).",
)
@color_option
@cityscapes_ids_option
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run with the same settings, keeping its finished images.",
)
@click.option(
    "--scores-out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also store the corrected log-scores (C, H, W) as a logits store (float16), with "
    "the input's labels ('blda evaluate' reads it); shards write SCORES-K-of-N.h5.",
)
@click.option(
    "--merge",
    is_flag=True,
    help="STORES are the shards' correct-K-of-N.json: write the summary of all images "
    "(correct.json) beside them.",
)
@shard_option
@device_option
@overwrite_option
@handle_errors
def command(
    stores: tuple[str, ...],
    correction: CorrectionSpec | None,
    out_dir: Path,
    color: bool,
    cityscapes_ids: bool,
    resume: bool,
    scores_out: Path | None,
    merge: bool,
    shard: tuple[int, int] | None,
    device: str,
    overwrite: bool,
) -> None:
    """Correct the logits of STORES and write trainId PNGs at each image's size.

    With --shard K/N (or under torchrun) each shard corrects its share of the name-sorted
    images into the same OUT_DIR and writes OUT_DIR/correct-K-of-N.json (and --scores-out
    SCORES-K-of-N.h5, which later commands read together: 'SCORES-*-of-N.h5'); then
    `blda correct --merge 'OUT_DIR/correct-*-of-N.json'` writes OUT_DIR/correct.json.

    With --cityscapes-ids (Cityscapes classes only) also NAME_labelIds.png, the Cityscapes
    labelIds that cityscapesScripts' evaluation reads (docs/formats.md).

    Example: blda correct tgt.h5 --stats tgt_stats.h5 --anchors src_stats.h5 --tau 0.2
    --out-dir pred
    """
    from blda_posthoc.io.jsonfiles import write_json
    from blda_posthoc.io.store import LogitStore, expand_store_paths
    from blda_posthoc.pipelines.correct import SUMMARY_FORMAT, check_extras, correct_store
    from blda_posthoc.pipelines.corrections import load_correction
    from blda_posthoc.pipelines.dump_logits import shard_path

    if merge:
        if correction is not None or shard is not None or out_dir is not None or scores_out:
            raise click.UsageError(
                "--merge takes the shards' correct-K-of-N.json as arguments, without --stats, "
                "--out-dir, --scores-out or --shard"
            )
        run_merge(stores, overwrite)
        return
    if out_dir is None:
        raise click.UsageError("Missing option '--out-dir'.")
    if correction is None:
        raise click.UsageError("give --stats (and --anchors), or --from-compare")
    if resume and overwrite:
        raise click.UsageError("give --resume or --overwrite, not both")
    if resume and scores_out is not None:
        raise click.UsageError("--scores-out writes every image: it does not go with --resume")
    run_shard = resolve_shard(shard)
    if scores_out is not None:
        scores_out = shard_path(scores_out, run_shard)
        inputs = [*stores, correction.stats, correction.anchors]
        check_output_file(scores_out, overwrite, inputs, option="--scores-out")
        if not overwrite and os.path.lexists(partial_path(scores_out)):
            raise InputError(
                f"{partial_path(scores_out)}: an unfinished --scores-out store is there "
                "(--scores-out writes every image, it does not resume: use --overwrite to start "
                "over)"
            )
    dev = resolve_device(device)
    with LogitStore(expand_store_paths(stores)) as store:
        check_extras(store, color, cityscapes_ids)
        num_images = len(store.names)
        store.select_shard(run_shard)
        if scores_out is not None:
            check_not_input(scores_out, store.paths, option="--scores-out")
            if scores_out.resolve().is_relative_to(out_dir.resolve()):
                raise click.UsageError("--scores-out must lie outside --out-dir")
        ready = load_correction(correction, store.class_names, dev, check_shares=True)
        settings = dict(
            ready.settings,
            stores=[str(p) for p in store.paths],
            store_fingerprints=store.fingerprints,  # --resume refuses a store changed in place
        )
        inputs = [*store.paths, correction.stats, correction.anchors]
        with output_folder(
            out_dir,
            run_shard,
            command="correct",
            settings={
                **settings,
                "color": color,
                "cityscapes_ids": cityscapes_ids,
                "class_names": store.class_names,
            },
            overwrite=overwrite,
            resume=resume,
            inputs=inputs,
        ) as folder:
            report_notes(ready)  # once the folder is claimed: no warning before its errors
            summary = correct_store(
                store,
                ready,
                folder.root,
                color=color,
                cityscapes_ids=cityscapes_ids,
                resume=resume,
                overwrite=overwrite,
                scores_out=scores_out,
                shard=run_shard,
                device=dev,
                progress=lambda it, n: progress(it, n, "correct"),
            )
            written = summary.pop("written")
            summary["settings"] = settings
            summary["class_names"] = store.class_names
            summary.update({"format": SUMMARY_FORMAT, "version": 1})
            manifest = "correct.json"
            if run_shard is not None:
                manifest = f"correct{shard_suffix(run_shard)}.json"
                summary["shard"] = list(run_shard)
                summary["partial"] = {"shard": list(run_shard), "num_images": num_images}
            write_json(folder.root / manifest, summary, sort_keys=True)
    kept = summary["images"] - written
    info(f"wrote {written} predictions to {out_dir}" + (f" (kept {kept} existing)" if kept else ""))
    report_changes(summary["flow"], store.class_names, sum(summary["pixels_after"]))


def run_merge(parts: tuple[str, ...], overwrite: bool) -> None:
    """``correct --merge PARTS``: the shards' summaries added up into ``correct.json``."""
    from blda_posthoc.pipelines.correct import merge_summaries

    summary, out, count = merge_beside(
        parts, "correct.json", "correct-K-of-N.json", merge_summaries, overwrite
    )
    info(f"merged {count} shard summaries: {summary['images']} predictions; wrote {out}")
    report_changes(summary["flow"], summary["class_names"], sum(summary["pixels_after"]))
