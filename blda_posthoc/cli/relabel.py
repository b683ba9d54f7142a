"""``blda relabel``: corrected pseudo-labels with ignore (255), optionally class-balanced."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from blda_posthoc.cli.common import (
    FiniteFloatRange,
    cityscapes_ids_option,
    color_option,
    correction_options,
    device_option,
    handle_errors,
    info,
    label_suffix_option,
    labels_dir_option,
    merge_beside,
    overwrite_option,
    progress,
    report_changes,
    report_notes,
    resolve_device,
    resolve_shard,
    shard_option,
    warn,
)
from blda_posthoc.core.defaults import WEIGHT_FORMATS
from blda_posthoc.errors import InputError
from blda_posthoc.outputs import check_name, output_folder

if TYPE_CHECKING:
    from blda_posthoc.pipelines.corrections import CorrectionSpec


PORTION_TOLERANCE = 0.005
"""Warn when a class's kept fraction misses --keep-portion by more than this (ties)."""


@click.command("relabel")
@click.argument("stores", nargs=-1, required=True)
@correction_options
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for NAME.png pseudo-labels (255 = ignore) and manifest.json (required).",
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
    "its pixels, ignore the rest. Two passes over the stores (with --shard: --count-only first).",
)
@click.option(
    "--count-only",
    is_flag=True,
    help="With --keep-portion and --shard K/N: only count shard K's confidences into "
    "OUT_DIR/relabel-counts-K-of-N.h5. Once every shard has counted, the same command without "
    "--count-only writes the labels with the thresholds of all images.",
)
@click.option(
    "--pseudo-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder of current NAME.png pseudo-labels; the manifest reports what changes.",
)
@click.option(
    "--pseudo-suffix",
    default="",
    callback=lambda ctx, param, value: check_out_suffix(value),
    help="Stem ending of the --pseudo-dir files: NAME<SUFFIX>.png (e.g. _gtFine_labelTrainIds, "
    "as a previous round's --out-suffix named them).",
)
@click.option(
    "--weights-out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    metavar="DIR",
    help="Also write per-pixel quality weights DIR/NAME.png (same names as the labels): the "
    "corrected confidence of the kept class, round(255 * confidence), 0 where the label is "
    "255; the loss weight of DAFormer-style self-training.",
)
@click.option(
    "--weights-format",
    type=click.Choice(sorted(WEIGHT_FORMATS)),
    default=None,
    help="With --weights-out: png (8-bit, default) or npy (float16 confidence in [0, 1]).",
)
@click.option(
    "--out-suffix",
    default="",
    callback=lambda ctx, param, value: check_out_suffix(value),
    help="Stem ending of the written label (and weight) files: NAME<SUFFIX>.png, e.g. "
    "_gtFine_labelTrainIds, the file names mmsegmentation's CityscapesDataset reads "
    "(docs/models.md).",
)
@labels_dir_option
@label_suffix_option
@color_option
@cityscapes_ids_option
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run with the same settings, keeping its finished images.",
)
@click.option(
    "--merge",
    is_flag=True,
    help="STORES are the shards' manifest-K-of-N.json: write the manifest of all images "
    "(manifest.json) beside them.",
)
@shard_option
@device_option
@overwrite_option
@handle_errors
def command(
    stores: tuple[str, ...],
    correction: CorrectionSpec | None,
    out_dir: Path | None,
    min_confidence: float | None,
    keep_portion: float | None,
    count_only: bool,
    pseudo_dir: Path | None,
    pseudo_suffix: str,
    weights_out: Path | None,
    weights_format: str | None,
    out_suffix: str,
    labels_dir: Path | None,
    label_suffix: str,
    color: bool,
    cityscapes_ids: bool,
    resume: bool,
    merge: bool,
    shard: tuple[int, int] | None,
    device: str,
    overwrite: bool,
) -> None:
    """Relabel STORES into a pseudo-label set for the next self-training round.

    Writes OUT_DIR/NAME.png trainIds at each image's size (255 = ignore) and
    OUT_DIR/manifest.json; never modifies its inputs. With --shard K/N each shard writes
    its images into the same OUT_DIR and its own OUT_DIR/manifest-K-of-N.json; then
    `blda relabel --merge 'OUT_DIR/manifest-*-of-N.json'` writes OUT_DIR/manifest.json. With
    --keep-portion, every shard first counts (--count-only), then relabels. With labels (in
    the store, or --labels DIR) the manifest scores the pseudo-labels; --cityscapes-ids also
    writes NAME_labelIds.png; --weights-out DIR writes each pixel's quality weight under the
    same names (docs/formats.md).

    Example: blda relabel tgt.h5 --stats src_stats.h5 --tau 0.5 --keep-portion 0.6
    --out-dir pseudo_r2
    """
    from blda_posthoc.io.store import LogitStore, expand_store_paths
    from blda_posthoc.pipelines.correct import check_extras
    from blda_posthoc.pipelines.corrections import load_correction
    from blda_posthoc.pipelines.dump_logits import torchrun_shard
    from blda_posthoc.pipelines.evaluate import every_label
    from blda_posthoc.pipelines.relabel import (
        RelabelSettings,
        count_shard,
        manifest_name,
        read_counts,
        relabel_store,
    )

    if merge:
        if (
            correction is not None
            or shard is not None
            or out_dir is not None
            or count_only
            or labels_dir is not None
            or weights_out is not None
            or out_suffix
            or pseudo_suffix
        ):
            raise click.UsageError(
                "--merge takes the shards' manifests as arguments, without --stats, --out-dir, "
                "--weights-out, --labels or --shard"
            )
        run_merge(stores, overwrite)
        return
    if out_dir is None:
        raise click.UsageError("Missing option '--out-dir'.")
    if correction is None:
        raise click.UsageError("give --stats (and --anchors), or --from-compare")
    if resume and overwrite:
        raise click.UsageError("give --resume or --overwrite, not both")
    if weights_format is not None and weights_out is None:
        raise click.UsageError(
            "--weights-format is the format of --weights-out: give --weights-out"
        )
    if weights_out is not None:
        check_apart(out_dir, weights_out)
        weights_format = weights_format or "png"
    run_shard = resolve_shard(shard)
    if count_only:
        if keep_portion is None:
            raise click.UsageError("--count-only counts for --keep-portion: give --keep-portion")
        if shard is None and torchrun_shard() is None:
            raise click.UsageError(
                "--count-only counts one shard of a sharded run: give --shard K/N (or run "
                "under torchrun)"
            )
        if run_shard is None:
            info("one shard: the relabel step counts its images itself; nothing to count first")
            return
    if pseudo_suffix and pseudo_dir is None:
        raise click.UsageError("--pseudo-suffix names the files of --pseudo-dir; give both")
    dev = resolve_device(device)
    with LogitStore(expand_store_paths(stores)) as store:
        check_extras(store, color, cityscapes_ids)
        label_files = every_label(store, labels_dir, label_suffix) if labels_dir else None
        every_name = list(store.names)
        store.select_shard(run_shard)
        ready = load_correction(correction, store.class_names, dev, check_shares=True)
        settings = RelabelSettings(
            ready.tau,
            correction.clamp,
            min_confidence,
            keep_portion,
            pseudo_dir,
            color,
            ready.method,
            cityscapes_ids,
            weights_format,
            out_suffix,
            pseudo_suffix,
        )
        run = {
            "settings": settings.as_dict(),
            "statistics": ready.settings,
            "stores": [str(p) for p in store.paths],
            "store_fingerprints": store.fingerprints,  # --resume refuses a changed store
            "class_names": store.class_names,
        }
        inputs = [*store.paths, pseudo_dir, labels_dir, correction.stats, correction.anchors]
        if count_only:
            assert run_shard is not None
            path, written = count_shard(
                store,
                ready,
                out_dir,
                run_shard,
                run,
                overwrite=overwrite,
                resume=resume,
                inputs=inputs,
                device=dev,
                progress=lambda it, n: progress(it, n, "relabel count"),
            )
            report_notes(ready)  # after count_shard's output checks
            k, n = run_shard
            info(
                f"{'counted' if written else 'kept the counts of'} shard {k}/{n} "
                f"({len(store.names)} images) in {path}; relabel once all {n} shards have counted"
            )
            return
        counts = None
        if keep_portion is not None and run_shard is not None:
            pixels = {name: math.prod(store.size(name)) for name in every_name}
            counts = read_counts(out_dir, run_shard[1], run, pixels, store.num_classes)
        with contextlib.ExitStack() as stack:
            roots: dict[str, Path] = {}  # option -> where its files go
            for target, option in ((out_dir, "--out-dir"), (weights_out, "--weights-out")):
                if target is not None:
                    folder = output_folder(
                        target,
                        run_shard,
                        command="relabel",
                        settings=run,
                        overwrite=overwrite,
                        resume=resume,
                        inputs=inputs,
                        option=option,
                    )
                    stack.enter_context(folder)
                    roots[option] = folder.root
            report_notes(ready)  # once the folder is claimed: no warning before its errors
            manifest = relabel_store(
                store,
                ready,
                roots["--out-dir"],
                settings,
                overwrite=overwrite,
                resume=resume,
                device=dev,
                progress=lambda desc: lambda it, n: progress(it, n, f"relabel {desc}"),
                shard=run_shard,
                counts=counts,
                label_files=label_files,
                weights_dir=roots.get("--weights-out"),
            )
    report(manifest, out_dir / manifest_name(run_shard), weights_out=weights_out)


def check_out_suffix(suffix: str) -> str:
    """``--out-suffix``: a file-name ending without ``/``, ``.png`` or unsafe characters."""
    if suffix and ("/" in suffix or _unsafe_suffix(suffix) or suffix.lower().endswith(".png")):
        raise click.BadParameter(
            f"{suffix!r} must be a file-name ending such as _gtFine_labelTrainIds (no '/', "
            "backslash, control character or .png)",
            param_hint="'--out-suffix'",
        )
    return suffix


def _unsafe_suffix(suffix: str) -> bool:
    try:
        check_name(f"x{suffix}", "--out-suffix")
    except InputError:
        return True
    return False


def check_apart(out_dir: Path, weights_out: Path) -> None:
    """Refuse a ``--weights-out`` folder that is, contains or lies inside ``--out-dir``."""
    a, b = out_dir.resolve(), weights_out.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise InputError(
            f"{weights_out}: --weights-out overlaps --out-dir ({out_dir}); give the weights a "
            "folder of their own (e.g. beside it)"
        )


def run_merge(parts: tuple[str, ...], overwrite: bool) -> None:
    """``relabel --merge PARTS``: the shards' manifests added up into ``manifest.json``."""
    from blda_posthoc.pipelines.relabel import MANIFEST, merge_manifests

    manifest, out, count = merge_beside(parts, MANIFEST, "manifests", merge_manifests, overwrite)
    report(manifest, out, merged=count)


def report(
    manifest: dict[str, Any],
    manifest_path: Path,
    *,
    merged: int = 0,
    weights_out: Path | None = None,
) -> None:
    """Summarise a relabelling run (or ``merged`` shards' manifests) on stderr."""
    if merged:
        done = f"merged {merged} shard manifests: {manifest['num_images']} pseudo-labels"
    else:
        written = manifest["images_written"]
        kept = manifest["num_images"] - written
        done = f"wrote {written} pseudo-labels" + (f" (kept {kept} existing)" if kept else "")
    info(f"{done}; ignore fraction {manifest['ignore_fraction']:.4f}")
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
    if weights_out is not None:
        info(f"weights ({manifest['settings']['weights_format']}): {weights_out}")
    info(f"manifest: {manifest_path}")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
