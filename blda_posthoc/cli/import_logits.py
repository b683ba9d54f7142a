"""``blda import-logits``: a logits store from ``.npy`` files."""

from __future__ import annotations

from pathlib import Path

import click

from blda_posthoc.cli.common import (
    FILE,
    class_names_option,
    handle_errors,
    info,
    label_suffix_option,
    labels_dir_option,
    overwrite_option,
    parse_class_names,
    progress,
)


@click.command("import-logits")
@click.argument("logits_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", required=True, type=FILE, help="Store to write.")
@labels_dir_option
@label_suffix_option
@class_names_option
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="Storage dtype of the logits.",
)
@click.option(
    "--resume", is_flag=True, help="Continue an interrupted import, keeping the images done."
)
@overwrite_option
@handle_errors
def command(
    logits_dir: Path,
    out: Path,
    labels_dir: Path | None,
    label_suffix: str,
    class_names: str | None,
    dtype: str,
    resume: bool,
    overwrite: bool,
) -> None:
    """Import NAME.npy logits of shape (C, h, w) found recursively under LOGITS_DIR.

    Names are paths relative to LOGITS_DIR without extension; labels match by name.

    Example: blda import-logits target/logits --labels target/labels --out tgt.h5
    """
    from blda_posthoc.io.names import unnamed_classes_note
    from blda_posthoc.io.store import LogitStore
    from blda_posthoc.pipelines.import_logits import import_npy_folder

    if resume and overwrite:
        raise click.UsageError("give --resume or --overwrite, not both")
    count = import_npy_folder(
        logits_dir,
        out,
        labels_dir=labels_dir,
        label_suffix=label_suffix,
        class_names=parse_class_names(class_names),
        dtype=dtype,
        overwrite=overwrite,
        resume=resume,
        progress=lambda it, n: progress(it, n, "import"),
    )
    info(f"wrote {out}: {count} images")
    if class_names is None:
        with LogitStore([out]) as store:
            info(unnamed_classes_note(store.num_classes, out))
