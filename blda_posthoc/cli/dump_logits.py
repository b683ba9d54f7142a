"""``blda dump-logits``: run a frozen segmenter over an image folder into a logits store."""

from __future__ import annotations

import math
from pathlib import Path

import click

from blda_posthoc.cli.common import (
    FiniteFloatRange,
    ShardType,
    class_names_option,
    device_option,
    handle_errors,
    info,
    label_suffix_option,
    labels_dir_option,
    overwrite_option,
    parse_class_names,
    progress,
    resolve_device,
    resolve_shard,
    warn,
)
from blda_posthoc.core.defaults import IMAGENET_MEAN, IMAGENET_STD, PRECISION_NAMES
from blda_posthoc.errors import InputError


class _Floats3(click.ParamType):
    """Three comma-separated numbers, e.g. ``123.675,116.28,103.53``."""

    name = "R,G,B"

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[float, float, float]:
        if isinstance(value, tuple):
            return value
        try:
            parts = [float(p) for p in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not three comma-separated numbers", param, ctx)
        if len(parts) != 3 or not all(math.isfinite(p) for p in parts):
            self.fail(f"{value!r} is not three comma-separated finite numbers", param, ctx)
        if self.positive and min(parts) <= 0:
            self.fail(f"{value!r}: every value must be positive", param, ctx)
        return parts[0], parts[1], parts[2]


class _Size(click.ParamType):
    """``HxW`` in pixels, e.g. ``512x1024``."""

    name = "HxW"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, int]:
        from blda_posthoc.io.store import MAX_SIDE

        if isinstance(value, tuple):
            return value
        parts = str(value).lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            self.fail(f"{value!r} is not HxW with positive integers (e.g. 512x1024)", param, ctx)
        if max(int(parts[0]), int(parts[1])) > MAX_SIDE:
            self.fail(f"{value!r}: sides of at most {MAX_SIDE} pixels", param, ctx)
        return int(parts[0]), int(parts[1])


def _fmt(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


@click.command("dump-logits")
@click.option(
    "--model",
    "model_spec",
    required=True,
    help="TorchScript file (.pt/.pth/.ts), ONNX file (.onnx), or package.module:factory.",
)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    default=None,
    help="Weights for a factory model (a state dict, or {'state_dict': ...}).",
)
@click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Allow loading a whole pickled module (torch.save(model)) from --model or "
    "--checkpoint. Unpickling can run any code: use only for files you trust.",
)
@click.option(
    "--output-key",
    default=None,
    metavar="KEY",
    help="Which model output holds the logits: a dict entry (Hugging Face 'logits'), an "
    "attribute, an ONNX output name, or a tuple position (0, 1, ...). Default: the output "
    "itself if it is a tensor, else 'out', then 'logits', then the first tensor.",
)
@click.option(
    "--images",
    "images_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of PNG/JPEG images, searched recursively.",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Logits store (.h5) to write; shards write OUT-K-of-N.h5.",
)
@labels_dir_option
@click.option("--image-suffix", default="", help="Stem ending stripped from image names.")
@label_suffix_option
@class_names_option
@click.option(
    "--num-classes",
    type=click.IntRange(1, 255),
    default=None,
    help="Number of output channels when --class-names is not given.",
)
@click.option("--bgr", is_flag=True, help="Feed channels in BGR order (mean/std in that order).")
@click.option(
    "--mean",
    type=_Floats3(),
    default=_fmt(IMAGENET_MEAN),
    show_default=True,
    help="Channel means on the 0-255 scale.",
)
@click.option(
    "--std",
    type=_Floats3(positive=True),
    default=_fmt(IMAGENET_STD),
    show_default=True,
    help="Channel standard deviations on the 0-255 scale.",
)
@click.option(
    "--scale",
    type=FiniteFloatRange(min=0, min_open=True, max=16),
    default=None,
    help="Resize images by this factor (at most 16) before the model.",
)
@click.option("--size", type=_Size(), default=None, help="Resize images to HxW before the model.")
@click.option(
    "--window",
    type=_Size(),
    default=None,
    help="Sliding-window inference with HxW windows (default: whole image).",
)
@click.option(
    "--stride",
    type=_Size(),
    default=None,
    help="Sliding-window step HxW (default: the window size).",
)
@click.option(
    "--logits-scale",
    default="native",
    show_default=True,
    help="Store logits at this fraction of the image size, or 'native': the model's own output "
    "size (later commands upsample bilinearly to the image size either way).",
)
@device_option
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Images per forward pass.",
)
@click.option(
    "--precision",
    type=click.Choice(list(PRECISION_NAMES)),
    default="fp32",
    show_default=True,
    help="fp32 (true float32, TF32 off), tf32 (TF32 CUDA kernels allowed), or fp16/bf16 "
    "autocast (fp16 needs CUDA).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="Storage dtype of the logits.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Image-decoding worker processes (0: decode in the main process).",
)
@click.option(
    "--shard",
    type=ShardType(),
    default=None,
    help="Process shard K of N (1-based); default from torchrun's RANK/WORLD_SIZE.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run, skipping done images.")
@overwrite_option
@handle_errors
def command(
    model_spec: str,
    checkpoint: Path | None,
    trust_checkpoint: bool,
    output_key: str | None,
    images_dir: Path,
    out: Path,
    labels_dir: Path | None,
    image_suffix: str,
    label_suffix: str,
    class_names: str | None,
    num_classes: int | None,
    bgr: bool,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    scale: float | None,
    size: tuple[int, int] | None,
    window: tuple[int, int] | None,
    stride: tuple[int, int] | None,
    logits_scale: str,
    device: str,
    batch_size: int,
    precision: str,
    dtype: str,
    workers: int,
    shard: tuple[int, int] | None,
    resume: bool,
    overwrite: bool,
) -> None:
    """Run a frozen segmenter over images and store its logits (and labels).

    Image names are paths relative to --images without extension and --image-suffix: with
    `--images leftImg8bit/val --image-suffix _leftImg8bit` the file
    `frankfurt/frankfurt_000000_000294_leftImg8bit.png` is named
    `frankfurt/frankfurt_000000_000294`.
    """
    from blda_posthoc.core.infer import OutputKey, Preprocess
    from blda_posthoc.io.models import load_model, model_identity
    from blda_posthoc.pipelines.dump_logits import (
        DumpOptions,
        check_output,
        collect_items,
        dump_logits,
        shard_path,
        torchrun_device,
    )

    if scale is not None and size is not None:
        raise click.UsageError("give --scale or --size, not both")
    if stride is not None and window is None:
        raise click.UsageError("--stride needs --window")
    if resume and overwrite:
        raise click.UsageError("give --resume or --overwrite, not both")
    try:
        pre = Preprocess(
            mean, std, bgr, scale, size, window, stride, parse_logits_scale(logits_scale)
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    torch_device = torchrun_device(device, resolve_device(device))
    if precision == "fp16" and torch_device.type == "cpu":
        raise InputError("--precision fp16: needs a CUDA device (use bf16 or fp32 on CPU)")
    run_shard = resolve_shard(shard)
    check_output(shard_path(out, run_shard), resume=resume, overwrite=overwrite)
    items = collect_items(images_dir, labels_dir, image_suffix, label_suffix)
    loaded = load_model(
        model_spec,
        checkpoint,
        torch_device,
        warn=warn,
        trust_checkpoint=trust_checkpoint,
        device_chosen=device != "auto",
    )
    if not loaded.autocast and precision != "fp32":
        warn(f"{model_spec}: --precision {precision} applies to torch models only; ignored")
        precision = "fp32"
    options = DumpOptions(
        out=out,
        preprocess=pre,
        class_names=parse_class_names(class_names),
        num_classes=num_classes,
        device=torch_device,
        batch_size=batch_size,
        precision=precision,
        dtype=dtype,
        workers=workers,
        resume=resume,
        overwrite=overwrite,
        shard=run_shard,
        model_id=model_identity(model_spec, checkpoint),
    )
    forward = loaded.forward if output_key is None else OutputKey(loaded.forward, output_key)
    result = dump_logits(
        forward, items, options, model_name=model_spec, progress=progress, log=info
    )
    info(
        f"wrote {result.path}: {result.written} images computed, {result.skipped} already done, "
        f"{len(result.class_names)} classes on {torch_device}"
    )


def parse_logits_scale(value: str) -> float | None:
    """``--logits-scale``: ``native`` (None) or a fraction in (0, 1]."""
    if value == "native":
        return None
    try:
        scale = float(value)
    except ValueError:
        scale = -1.0
    if not 0 < scale <= 1:
        raise click.BadParameter(
            f"{value!r} is not 'native' or a number in (0, 1]", param_hint="--logits-scale"
        )
    return scale
