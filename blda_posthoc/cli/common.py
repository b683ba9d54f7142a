"""What every command shares: error reporting, common options and option parsing."""

from __future__ import annotations

import functools
import glob
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

# Only light modules at the top: `blda CMD -h` and usage errors must not import torch, h5py or
# numpy; the functions import what they use.
from blda_posthoc.core.defaults import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_CLAMP,
    METHODS,
    has_strength,
    removed_reason,
)
from blda_posthoc.errors import InputError
from blda_posthoc.outputs import abandoned, check_not_input, disk_error
from blda_posthoc.pipelines.console import info, progress, warn

if TYPE_CHECKING:
    import torch

    from blda_posthoc.pipelines.corrections import CompareChoice, Correction, CorrectionSpec


__all__ = ["info", "progress", "warn"]

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` on stderr and exit with status ``code`` (default 1)."""
    click.echo(f"error: {message}", err=True)
    _exit(code)


def _exit(code: int) -> None:
    if abandoned():  # a file whose write failed must not be closed: HDF5 may crash on it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _with_notes(message: str, exc: BaseException) -> str:
    """The message plus what the stopped run keeps (notes attached on the way out)."""
    notes = [n for n in getattr(exc, "__notes__", []) if n]
    return "; ".join([message, *notes])


def handle_errors(func: F) -> F:
    """One rule for how a command ends when it does not succeed.

    - :class:`InputError` (bad input or data): ``error: FILE: problem`` on one line, exit 1.
    - A file that cannot be read or written: ``error: FILE: reason``, exit 1; a full disk
      (or quota, or file size limit) reads ``error: FILE: disk full``.
    - Ctrl-C: ``interrupted; what is kept; how to resume`` on one line, exit 130.
    - A failed allocation (``MemoryError``, torch's "can't allocate memory" or CUDA out of
      memory): ``error: out of memory: ...`` with what lowers it, exit 1. Other errors propagate.

    Outputs claimed by the command record what they keep as notes on the exception.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InputError as exc:
            fail(_with_notes(str(exc), exc))
        except KeyboardInterrupt as exc:
            click.echo(_with_notes("interrupted", exc), err=True)
            _exit(130)
        except OSError as exc:  # a file or folder that cannot be read or written
            full = disk_error(exc, exc.filename or "")
            if full is not None:
                message = str(full) if exc.filename else str(full).lstrip(": ")
            else:
                where = f"{exc.filename}: " if exc.filename else ""
                message = f"{where}{exc.strerror or exc}"
            fail(_with_notes(message, exc))
        except (MemoryError, RuntimeError) as exc:
            if not out_of_memory(exc):
                raise
            fail(_with_notes(OUT_OF_MEMORY, exc))

    return wrapper  # type: ignore[return-value]


#: What a command says when an allocation fails (see docs/safety.md for what memory costs).
OUT_OF_MEMORY = (
    "out of memory: the correction's tables and statistics cost about 16 * C^2 * bins bytes; "
    "fit the statistics with fewer --bins, or run on a machine with more memory"
)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation (Python's, or torch's on the CPU or a GPU)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower()


#: An output or input file: a folder is refused while the options parse.
FILE = click.Path(path_type=Path, dir_okay=False)
#: An input folder: a file is refused while the options parse.
FOLDER = click.Path(path_type=Path, file_okay=False)


def bootstrap_option(gain: str) -> Callable[[F], F]:
    """``--bootstrap N``: resamples of the 95% paired bootstrap interval of ``gain`` (0: off)."""
    return click.option(
        "--bootstrap",
        type=click.IntRange(min=0),
        default=DEFAULT_BOOTSTRAP,
        show_default=True,
        metavar="N",
        help=f"Resamples of the 95% paired bootstrap interval (over images) of {gain}; "
        "0 turns it off.",
    )


def labels_dir_option(func: F) -> F:
    """``--labels DIR``: a folder of trainId label PNGs (the command receives ``labels_dir``)."""
    return click.option(
        "--labels",
        "labels_dir",
        type=FOLDER,
        default=None,
        metavar="DIR",
        help="Folder of NAME.png trainId labels (255 = ignore).",
    )(func)


def label_suffix_option(func: F) -> F:
    """``--label-suffix``: the stem ending of label files (received as ``label_suffix``)."""
    return click.option(
        "--label-suffix",
        default="",
        help="Stem ending of the label files after NAME, e.g. _gtFine_labelTrainIds.",
    )(func)


def class_names_option(func: F) -> F:
    """``--class-names``: preset, comma-separated list, text file or JSON file."""
    return click.option(
        "--class-names",
        "class_names",
        default=None,
        metavar="NAMES",
        help="Preset (cityscapes), comma-separated names, a text file with one name per line, "
        'or a JSON file ({"classes": [...]} or a list).',
    )(func)


def parse_class_names(spec: str | None) -> list[str] | None:
    """Resolve ``--class-names`` (None stays None)."""
    from blda_posthoc.io.names import read_class_names

    return None if spec is None else read_class_names(spec)


def device_option(func: F) -> F:
    """``--device auto|cpu|cuda[:k]`` and ``--threads N`` (applied while the options parse)."""
    func = click.option(
        "--threads",
        type=click.IntRange(1),
        default=None,
        expose_value=False,
        callback=_set_threads,
        help="CPU threads torch computes with and stores are decompressed in (default: the cores "
        "torch sees).",
    )(func)
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        callback=_check_device,
        help="auto (CUDA when present), cpu, or cuda[:k].",
    )(func)


DEVICE_CHOICES = "auto, cpu, cuda or cuda:K (K = 0, 1, ...)"


def _device_spelling_ok(spec: str) -> bool:
    kind, colon, index = spec.partition(":")
    if not colon:
        return spec in ("auto", "cpu", "cuda")
    return kind == "cuda" and index.isdigit() and index.isascii()


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Refuse a ``--device`` other than the ones this tool runs on while the options parse."""
    if not _device_spelling_ok(value):
        raise click.BadParameter(f"{value!r} is not a device: use {DEVICE_CHOICES}", ctx, param)
    return value


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    import torch

    if value is not None:
        torch.set_num_threads(value)


def resolve_device(spec: str) -> torch.device:
    """Turn a ``--device`` value into a torch device, checking CUDA is really there."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _device_spelling_ok(spec):
        raise InputError(f"--device: {spec!r} is not a device: use {DEVICE_CHOICES}")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {spec}: CUDA is not available on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise InputError(
            f"--device {spec}: this machine has {count} CUDA device(s), 0..{count - 1}"
        )
    return device


class FiniteFloatRange(click.FloatRange):
    """A ``click.FloatRange`` that also refuses NaN and infinities (which pass range checks)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Parse and range-check ``value``, then refuse non-finite numbers."""
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def color_option(func: F) -> F:
    """``--color``: also write colour previews (the command receives ``color``)."""
    return click.option(
        "--color", is_flag=True, help="Also write NAME_color.png palette previews."
    )(func)


def cityscapes_ids_option(func: F) -> F:
    """``--cityscapes-ids``: also write Cityscapes labelIds (received as ``cityscapes_ids``)."""
    return click.option(
        "--cityscapes-ids",
        "cityscapes_ids",
        is_flag=True,
        help="Also write NAME_labelIds.png: Cityscapes labelIds (ignore becomes 0, 'unlabeled') "
        "for cityscapesScripts' evaluation; needs the 19 Cityscapes classes.",
    )(func)


def overwrite_option(func: F) -> F:
    """``--overwrite``: replace existing outputs."""
    return click.option("--overwrite", is_flag=True, help="Replace existing outputs.")(func)


class MethodChoice(click.Choice[str]):
    """``--method``: one of :data:`METHODS`; a removed method is refused with why it went."""

    def __init__(self) -> None:
        super().__init__(METHODS)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        reason = removed_reason(str(value))
        if reason is not None:
            raise click.UsageError(f"--method {reason}", ctx)
        return super().convert(value, param, ctx)


class ShardType(click.ParamType):
    """``K/N`` with ``1 <= K <= N``."""

    name = "K/N"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, int]:
        from blda_posthoc.io.schema import MAX_PARTS

        if isinstance(value, tuple):
            return value
        parts = str(value).split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            self.fail(f"{value!r} is not K/N (e.g. 1/4)", param, ctx)
        k, n = int(parts[0]), int(parts[1])
        if not 1 <= k <= n:
            self.fail(f"{value!r}: need 1 <= K <= N", param, ctx)
        if n > MAX_PARTS:
            self.fail(f"{value!r}: at most {MAX_PARTS} shards", param, ctx)
        return k, n


def explicit(name: str) -> bool:
    """Whether option ``name`` of the running command was given (not left at its default)."""
    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, click.core.ParameterSource.DEFAULT)


def shard_option(func: F) -> F:
    """``--shard K/N``: process shard K of N (see :func:`resolve_shard`)."""
    return click.option(
        "--shard",
        type=ShardType(),
        default=None,
        help="Process shard K of N (1-based): the name-sorted images K, K+N, K+2N, ...; "
        "default from torchrun's RANK/WORLD_SIZE.",
    )(func)


def resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int] | None:
    """``--shard``, else the shard from torchrun's environment; None for a single process."""
    from blda_posthoc.pipelines.dump_logits import torchrun_shard

    from_env = torchrun_shard()
    if shard is not None and from_env is not None and shard != from_env:
        warn(f"--shard {shard[0]}/{shard[1]} overrides torchrun's {from_env[0]}/{from_env[1]}")
    chosen = shard if shard is not None else from_env
    return None if chosen is None or chosen[1] == 1 else chosen


def check_output_file(
    path: Path, overwrite: bool, inputs: Iterable[str | Path | None] = (), option: str = "output"
) -> None:
    """Refuse any input as the output file, and an existing one unless ``--overwrite``.

    Args:
        path: The output file.
        overwrite: ``--overwrite`` was given.
        inputs: The command's input files and folders (store arguments may be globs).
        option: How the output is named in the message (e.g. ``--scores-out``).
    """
    files: list[Path | None] = []
    for item in inputs:
        if isinstance(item, str):
            files.extend(Path(p) for p in glob.glob(item) or [item])
        else:
            files.append(item)
    check_not_input(path, files, option=option)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists (use --overwrite to replace it)")


def parse_tau(text: str | None, option: str = "--tau") -> tuple[float | None, bool]:
    """``--tau`` as ``(value or None, auto)``: ``auto`` or a finite number >= 0."""
    if text is None:
        return None, False
    if text.strip().lower() == "auto":
        return None, True
    try:
        value = float(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a number nor 'auto'", param_hint=option
        ) from None
    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"{text!r} must be a finite number >= 0", param_hint=option)
    return value, False


def statistics_options(func: F) -> F:
    """``--stats``, ``--anchors``, ``--clamp``, ``--min-pixels``: where corrections come from.

    The wrapped command receives ``stats``, ``anchors``, ``clamp`` and ``min_pixels``.
    """
    options = [
        click.option(
            "--stats",
            type=click.Path(path_type=Path, dir_okay=False),
            help="Stats file of the data being corrected (usually target pseudo-labels).",
        ),
        click.option(
            "--anchors",
            type=click.Path(path_type=Path, dir_okay=False),
            help="Labelled stats file (usually source ground truth): anchors, class priors "
            "and calibrations [default: --stats].",
        ),
        click.option(
            "--clamp",
            type=FiniteFloatRange(0.0, 0.5, max_open=True),
            default=DEFAULT_CLAMP,
            show_default=True,
            help="BLDA methods: CDF values are clamped to [r, 1 - r].",
        ),
        click.option(
            "--min-pixels",
            type=click.IntRange(min=1),
            default=None,
            help="BLDA methods: cells with fewer pixels get no shift [default: the stats "
            "file's setting].",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def correction_options(func: F) -> F:
    """``--method``, ``--tau``, ``--from-compare`` and :func:`statistics_options`, as one spec.

    The wrapped command receives ``correction``: a :class:`CorrectionSpec`, or None when none
    of ``--method``, ``--stats`` and ``--from-compare`` was given (plain argmax only).
    """

    @functools.wraps(func)
    @handle_errors
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["correction"] = build_spec(
            method=kwargs.pop("method"),
            tau=kwargs.pop("tau"),
            stats=kwargs.pop("stats"),
            anchors=kwargs.pop("anchors"),
            clamp=kwargs.pop("clamp"),
            min_pixels=kwargs.pop("min_pixels"),
            from_compare=kwargs.pop("from_compare"),
        )
        return func(*args, **kwargs)

    options = [
        click.option(
            "--method",
            type=MethodChoice(),
            default=None,
            help="Correction to apply [default: the label-free default: calibrated-blda τ 0.7 when "
            "the files hold calibrated statistics, else cbst τ 1, else blda τ 0.2; see "
            "docs/methods.md]. "
            "'blda compare' measures them against each other.",
        ),
        click.option(
            "--tau",
            default=None,
            metavar="T|auto",
            help="Strength of the correction (0 = plain argmax; 'auto': chosen label-free on "
            "--stats' pixel sample) [default: per method, see docs/methods.md; ignored by "
            "temperature].",
        ),
        click.option(
            "--from-compare",
            type=click.Path(path_type=Path, dir_okay=False),
            default=None,
            help="Use the method and strength selected by 'blda compare --json FILE' (and its "
            "--stats/--anchors unless given).",
        ),
    ]
    decorated: Any = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return statistics_options(decorated)


def build_spec(
    *,
    method: str | None,
    tau: str | None,
    stats: Path | None,
    anchors: Path | None,
    clamp: float,
    min_pixels: int | None,
    from_compare: Path | None,
) -> CorrectionSpec | None:
    """Check the correction options together and freeze them into one spec."""
    from blda_posthoc.pipelines.corrections import CALIBRATION_FOR, CorrectionSpec, Provenance

    tau_value, auto = parse_tau(tau)
    expected = None
    if from_compare is not None:
        chosen = read_compare_selection(from_compare)
        if method is not None or tau is not None:
            raise click.UsageError("--from-compare sets --method and --tau; give neither")
        method, tau_value = chosen.method, chosen.tau
        # The recorded fingerprints are checked for the statistics taken from the report.
        expected = Provenance(
            chosen.provenance.source,
            chosen.provenance.stats if stats is None else None,
            chosen.provenance.anchors if anchors is None else None,
        )
        stats = stats or chosen.stats
        anchors = anchors or chosen.anchors
    if method is None and stats is None:
        if anchors is not None:
            raise click.UsageError("--anchors needs --stats")
        if tau is not None:
            raise click.UsageError("--tau needs --stats")
        return None
    if stats is None and method in CALIBRATION_FOR:
        if anchors is None:  # a calibration reads the labelled file only
            raise click.UsageError(
                f"--method {method} needs --anchors (a stats file fitted with --label-source gt)"
            )
    elif stats is None and method != "none":
        raise click.UsageError(f"--method {method} needs --stats")
    if auto and method is not None and not has_strength(method):
        raise click.UsageError(f"--tau auto: --method {method} has no strength")
    return CorrectionSpec(
        method, tau_value, auto, stats, anchors, clamp, min_pixels, expected=expected
    )


def read_compare_selection(path: Path) -> CompareChoice:
    """The checked ``selected`` entry of a ``blda compare`` JSON (see ``read_compare_choice``).

    A shard's report is refused with the ``--merge`` command that makes the report of all images.
    """
    from blda_posthoc.io.jsonfiles import read_report
    from blda_posthoc.pipelines.corrections import read_compare_choice

    data = read_report(path, "blda-compare", "'blda compare' report")
    if "partial" in data:  # only a shard's report has raw counts to merge
        partial = data["partial"]
        shard = partial.get("shard") if isinstance(partial, dict) else None
        raise InputError(
            f"{path}: the report of one shard ({shard_text(shard)}), chosen on its images only; "
            f"merge the shards first: {compare_merge_hint(Path(path), shard)}"
        )
    return read_compare_choice(path)


def merge_beside(
    parts: Iterable[str],
    name: str,
    what: str,
    merge: Callable[[list[Path]], dict[str, Any]],
    overwrite: bool,
) -> tuple[dict[str, Any], Path, int]:
    """The shards' summaries of one output folder, added up and written beside them.

    ``correct --merge`` and ``relabel --merge``: ``merge`` adds up the parts (``what``, for
    messages) and the result is written as ``name`` in their folder.

    Returns:
        The merged summary, where it was written, and how many parts it adds up.
    """
    from blda_posthoc.io.jsonfiles import write_json
    from blda_posthoc.io.store import expand_store_paths

    paths = expand_store_paths(list(parts))
    if len({p.resolve().parent for p in paths}) > 1:
        raise click.UsageError(f"--merge: give the {what} of one folder")
    out = paths[0].parent / name
    check_output_file(out, overwrite)
    merged = merge(paths)
    write_json(out, merged, sort_keys=True)
    return merged, out, len(paths)


def shard_text(shard: Any) -> str:
    """``K/N`` of a report's ``[K, N]`` (as recorded, whatever it holds)."""
    try:
        return f"{int(shard[0])}/{int(shard[1])}"
    except (TypeError, ValueError, IndexError, KeyError):
        return repr(shard)


def compare_merge_hint(path: Path, shard: Any) -> str:
    """The ``blda compare --merge`` command for the shard report ``path`` (``c-1-of-3.json``)."""
    try:
        suffix = f"-{int(shard[0])}-of-{int(shard[1])}"
        n = int(shard[1])
    except (TypeError, ValueError, IndexError, KeyError):
        return "blda compare --merge 'JSON-*-of-N.json' --json JSON"
    stem = path.stem[: -len(suffix)] if path.stem.endswith(suffix) else path.stem
    parts = path.with_name(f"{stem}-*-of-{n}{path.suffix}")
    return f"blda compare --merge '{parts}' --json {path.with_name(stem + path.suffix)}"


def report_changes(
    flow: Any, labels: list[str], total: int, against: str = "plain argmax", top: int = 3
) -> None:
    """Say on stderr how many pixels changed class and the largest class-to-class flows.

    Args:
        flow: ``(K, K)`` pixel counts from ``labels[a]`` to ``labels[b]`` (diagonal ignored).
        labels: The K class names (and ``ignore`` where the flows include it).
        total: Pixels in all, for the fraction.
        against: What the labels changed from.
        top: How many flows to name.
    """
    import numpy as np

    counts = np.asarray(flow, dtype=np.int64)
    counts = counts - np.diag(np.diag(counts))
    changed = int(counts.sum())
    share = 100.0 * changed / max(total, 1)
    line = f"{changed} of {total} pixels ({share:.2f}%) changed class vs {against}"
    order = np.argsort(-counts, axis=None, kind="stable")[:top]  # ties: first pair first
    flows = [
        f"{labels[a]}->{labels[b]} {int(counts[a, b])}"
        for a, b in (np.unravel_index(i, counts.shape) for i in order)
        if counts[a, b] > 0
    ]
    info(line + ("; largest: " + ", ".join(flows) if flows else ""))


def report_notes(correction: Correction) -> None:
    """Show what the user should know about a correction (on stderr)."""
    default = correction.settings.get("default")
    if default is not None:
        info(f"default: {default['reason']}")
    for note in correction.notes:
        warn(note)
    tau = correction.settings.get("tau_auto")
    if tau is not None:
        info(f"--tau auto chose {tau['tau']:g} ({tau['criterion']})")
