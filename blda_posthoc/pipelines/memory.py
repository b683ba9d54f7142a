"""The memory budget of a command, and the check of a correction against it before it is read.

The budget is set in one place: the environment variable ``BLDA_MEMORY_GIB`` (GiB, ``2**30``
bytes); without it, the smallest of this machine's memory, the process's address-space limit
(``ulimit -v``) and its control group's limit (containers, Slurm).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
from collections.abc import Sequence
from pathlib import Path

from blda_posthoc.core.align import ONE_CORRECTION, Tables, correction_memory, fitting_bins
from blda_posthoc.core.fit import LogitStats
from blda_posthoc.errors import InputError
from blda_posthoc.io.stats import read_stats, stats_size

MEMORY_ENV = "BLDA_MEMORY_GIB"
"""Environment variable that sets the memory budget in GiB."""
CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")
"""The control group's memory limit (cgroup v2), when there is one."""


def memory_budget() -> tuple[int, str]:
    """Bytes a command may use, and where that figure comes from (for messages).

    Raises:
        InputError: ``BLDA_MEMORY_GIB`` is not a finite number above 0.
    """
    text = os.environ.get(MEMORY_ENV, "").strip()
    if text:
        try:
            gib = float(text)
        except ValueError:
            gib = math.nan
        if not (math.isfinite(gib) and gib > 0):
            raise InputError(f"{MEMORY_ENV} must be a number of GiB above 0, got {text!r}")
        return int(gib * 2**30), MEMORY_ENV
    limits = [(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append((soft, "the address-space limit, ulimit -v"))
    with contextlib.suppress(OSError, ValueError):  # no cgroup v2 file, or "max"
        limits.append((int(CGROUP_LIMIT.read_text().strip()), "the control group's limit"))
    return min(limits)


def check_correction_memory(
    where: str | Path,
    num_classes: int,
    bins: int,
    *,
    groups: int,
    tables: Tables,
    fit_bins: str = "blda fit-stats --bins {bins}",
    what: str = "the correction",
) -> None:
    """Refuse, before anything is read or allocated, a correction that needs more than the budget.

    Args:
        where: The statistics (for the message).
        num_classes: ``C``.
        bins: Histogram bins of the statistics.
        groups: ``(C, C, B)`` count arrays held (see
            :func:`~blda_posthoc.core.align.correction_memory`).
        tables: The corrections' tables held at once.
        fit_bins: How the message names fitting with fewer bins (``{bins}`` is filled in).
        what: What needs the memory, for the message.

    Raises:
        InputError: One line with the estimate, the budget and the bin count that fits.
    """
    over = over_budget(num_classes, bins, groups=groups, tables=tables)
    if over is None:
        return
    need, budget, source, fits = over
    remedy = (
        f"fit the statistics with fewer bins ({fit_bins.format(bins=fits)} fits)"
        if fits
        else "use a machine with more memory"
    )
    raise InputError(
        f"{where}: {what} needs about {need / 2**30:.2f} GiB ({num_classes} classes x "
        f"{bins} bins), more than the memory budget of {budget / 2**30:.2f} GiB ({source}); "
        f"{remedy}, or set {MEMORY_ENV} if more is free"
    )


def check_stats_memory(paths: Sequence[Path], tables: Tables, what: str = "the correction") -> None:
    """:func:`check_correction_memory` of stats files from their declared shapes, unread.

    Args:
        paths: The files held at once (each once); the first is named in the message.
        tables: The corrections' tables held with them.
        what: What needs the memory, for the message.

    A file whose shapes cannot be read this way is left to ``read_stats``, which names what is
    wrong with it.
    """
    sizes = [stats_size(path) for path in paths]
    known = [size for size in sizes if size is not None]
    if len(known) < len(sizes):
        return
    check_correction_memory(
        paths[0],
        max(size[0] for size in known),
        max(size[1] for size in known),
        groups=sum(size[2] for size in known),
        tables=tables,
        what=what,
    )


def read_stats_within_budget(path: Path) -> LogitStats:
    """``read_stats``, after checking its declared count arrays against the budget.

    For the commands that read a stats file without building a correction from it (``info``,
    ``diagnose`` without ``--anchors``, merges); those that correct go through
    :func:`~blda_posthoc.pipelines.corrections.read_statistics`, which counts their tables too.

    Raises:
        InputError: The file's arrays alone need more than the budget (one line), or the file is
            not valid statistics.
    """
    check_stats_memory([path], Tables(), what="reading it")
    return read_stats(path)


def applying_warning(path: Path, num_classes: int, bins: int, *, groups: int) -> str | None:
    """What ``fit-stats`` says when the file it wrote is too large to apply within the budget.

    The estimate is the file alone with one correction's tables (``--anchors``, when another
    file, adds its own groups), so it is the least that applying it needs.

    Returns:
        One line naming the file, the estimate and the ``--bins`` that fits; None when it fits.
    """
    over = over_budget(num_classes, bins, groups=groups, tables=ONE_CORRECTION)
    if over is None:
        return None
    need, budget, source, fits = over
    remedy = f"fit it with --bins {fits} or fewer" if fits else "no bin count fits"
    return (
        f"{path}: applying it with a BLDA method needs at least {need / 2**30:.2f} GiB "
        f"({num_classes} classes x {bins} bins), more than the memory budget of "
        f"{budget / 2**30:.2f} GiB ({source}): correct, relabel, evaluate and compare will "
        f"refuse it; {remedy}, or set {MEMORY_ENV} if more is free"
    )


def over_budget(
    num_classes: int, bins: int, *, groups: int, tables: Tables
) -> tuple[int, int, str, int | None] | None:
    """``(estimate, budget, where the budget comes from, bins that fit)``, or None when it fits."""
    budget, source = memory_budget()
    need = correction_memory(num_classes, bins, groups=groups, tables=tables)
    if need <= budget:
        return None
    fits = fitting_bins(num_classes, groups=groups, tables=tables, budget=budget)
    return need, budget, source, fits
