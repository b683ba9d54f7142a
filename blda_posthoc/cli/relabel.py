"""``blda relabel``: corrected pseudo-labels with ignore (255), optionally class-balanced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from blda_posthoc.cli.common import (
    FiniteFloatRange,
    correction_options,
    device_option,
    handle_errors,
    info,
    overwrite_option,
    progress,
    report_changes,
    report_notes,
    resolve_device,
    resolve_shard,
    shard_option,
    warn,
)
from blda_posthoc.io.correct import check_color_names
from blda_posthoc.io.corrections import CorrectionSpec, load_correction
from blda_posthoc.io.outputs import output_folder, shard_suffix
from blda_posthoc.io.relabel import MANIFEST, RelabelSettings, relabel_store
from blda_posthoc.io.store import LogitStore, expand_store_paths

PORTION_TOLERANCE = 0.005
"""Warn when a class's kept fraction misses --keep-portion by more than this (ties)."""


@click.command("relabel")
@click.argument("stores", nargs=-1, required=True)
@correction_options
@click.option(
    "--out-dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for NAME.png pseudo-labels (255 = ignore) and manifest.json.",
)
@click.option(
    "--min-confidence",
    type=FiniteFloatRange(0.0, 1.0),
    default=None,
    help="Ignore pixels whose corrected confidence (softmax of the corrected scores) is below P.",
)
@click.option(
    "--keep-portion",
    type=FiniteFloatRange(0.0, 1.0),
    default=None,
    help="Class-balanced selection (CBST): per class keep the P most confident fraction of "
    "its pixels, ignore the rest. Two passes over the stores.",
)
@click.option(
    "--pseudo-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder of current NAME.png pseudo-labels; the manifest reports what changes.",
)
@click.option("--color", is_flag=True, help="Also write NAME_color.png palette previews.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run with the same settings, keeping its finished images.",
)
@shard_option
@device_option
@overwrite_option
@handle_errors
def command(
    stores: tuple[str, ...],
    correction: CorrectionSpec | None,
    out_dir: Path,
    min_confidence: float | None,
    keep_portion: float | None,
    pseudo_dir: Path | None,
    color: bool,
    resume: bool,
    shard: tuple[int, int] | None,
    device: str,
    overwrite: bool,
) -> None:
    """Relabel STORES into a pseudo-label set for the next self-training round.

    Writes OUT_DIR/NAME.png trainIds at each image's size (255 = ignore) and
    OUT_DIR/manifest.json; never modifies its inputs. With --shard K/N each shard writes
    its images into the same OUT_DIR and its own OUT_DIR/manifest-K-of-N.json.

    Example: blda relabel tgt.h5 --stats src_stats.h5 --tau 0.5 --keep-portion 0.6
    --out-dir pseudo_r2
    """
    if correction is None:
        raise click.UsageError("give --stats (and --method), or --from-compare")
    if resume and overwrite:
        raise click.UsageError("give --resume or --overwrite, not both")
    run_shard = resolve_shard(shard)
    if run_shard is not None and keep_portion is not None:
        raise click.UsageError(
            "--keep-portion needs thresholds over all images: it does not go with --shard "
            "(or torchrun); use --min-confidence, or relabel in one process"
        )
    dev = resolve_device(device)
    with LogitStore(expand_store_paths(stores)) as store:
        if color:
            check_color_names(store.names, store.paths[0])
        store.select_shard(run_shard)
        ready = load_correction(correction, store.class_names, dev)
        report_notes(ready)
        settings = RelabelSettings(
            ready.tau,
            correction.clamp,
            min_confidence,
            keep_portion,
            pseudo_dir,
            color,
            ready.method,
        )
        with output_folder(
            out_dir,
            run_shard,
            command="relabel",
            settings={
                "settings": settings.as_dict(),
                "statistics": ready.settings,
                "stores": [str(p) for p in store.paths],
                "class_names": store.class_names,
            },
            overwrite=overwrite,
            resume=resume,
            inputs=[*store.paths, pseudo_dir, correction.stats, correction.anchors],
        ) as folder:
            manifest_name = MANIFEST
            if run_shard is not None:
                manifest_name = f"manifest{shard_suffix(run_shard)}.json"
            manifest = relabel_store(
                store,
                ready,
                folder.root,
                settings,
                overwrite=overwrite,
                resume=resume,
                device=dev,
                progress=lambda desc: lambda it, n: progress(it, n, f"relabel {desc}"),
                manifest_name=manifest_name,
            )
    report(manifest, out_dir / manifest_name)


def report(manifest: dict[str, Any], manifest_path: Path) -> None:
    """Summarise a relabelling run on stderr."""
    written = manifest["images_written"]
    kept = manifest["num_images"] - written
    info(
        f"wrote {written} pseudo-labels"
        + (f" (kept {kept} existing)" if kept else "")
        + f"; ignore fraction {manifest['ignore_fraction']:.4f}"
    )
    labels, total = manifest["flow_labels"], manifest["num_pixels"]
    report_changes(manifest["changes"]["argmax"]["flow"], labels, total)
    if "pseudo_dir" in manifest["changes"]:
        report_changes(manifest["changes"]["pseudo_dir"]["flow"], labels, total, "--pseudo-dir")
    portion = manifest["settings"]["keep_portion"]
    if portion is not None:
        for name, entry in manifest["thresholds"].items():
            achieved = entry["portion_kept_fraction"]
            if achieved is not None and abs(achieved - portion) > PORTION_TOLERANCE:
                warn(f"{name}: kept {achieved:.4f} of its pixels (ties at the threshold)")
    quality = manifest["quality"]
    if quality:
        for key, q in quality.items():
            info(
                f"labels: {key:<10} mIoU {_pct(q['miou'])}, pixel acc {_pct(q['pixel_acc'])} "
                f"over non-ignored pixels (coverage {q['coverage']:.4f})"
            )
    info(f"manifest: {manifest_path}")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
