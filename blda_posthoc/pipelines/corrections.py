"""From stats files to a ready correction: the one place that turns ``--method`` into a corrector.

``--stats`` is the file fitted on the data being corrected (usually target pseudo-labels): its
class-conditional cells, predicted shares, confidence histograms and pixel sample are the
*target* side. ``--anchors`` (default ``--stats``) is the labelled file (usually source ground
truth): its anchors, class priors and calibrations are the *source* side.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blda_posthoc.core.adapt import (
    MAX_SHARE_FACTOR,
    WARN_SHARE_FLOOR,
    predicted_counts,
    self_calibration,
    share_factors,
)
from blda_posthoc.core.align import (
    DEFAULT_CLAMP,
    DEFAULT_MIN_PIXELS,
    ONE_CORRECTION,
    AlignmentMaps,
    Tables,
    build_maps,
    lookup_tables,
)
from blda_posthoc.core.fit import LogitStats, PixelSample, StatsExtras
from blda_posthoc.core.methods import (
    DEFAULT_TAUS,
    METHODS,
    Affine,
    Aligned,
    Blended,
    Corrector,
    Plain,
    Shift,
    has_strength,
    removed_reason,
)
from blda_posthoc.core.priors import (
    em_map_priors,
    em_priors,
    logit_adjustment,
    occurrence_priors,
    prior_shift,
    sinkhorn_offsets,
    smooth_counts,
    smooth_towards,
)
from blda_posthoc.core.relabel import LogOddsGrid, keep_thresholds
from blda_posthoc.core.select import AUTO_GRID, auto_tau
from blda_posthoc.errors import InputError
from blda_posthoc.io.schema import Node
from blda_posthoc.io.stats import read_stats
from blda_posthoc.pipelines.memory import check_correction_memory, check_stats_memory

CBST_PORTION = 0.5
"""``cbst`` divides each class's probability by the median confidence of its predicted pixels."""
CALIBRATION_FOR = {"temperature": "temperature", "vector-scaling": "vector", "bias": "bias"}
"""Affine methods and the calibration of the stats file each one uses."""
ALIGNED = ("blda", "calibrated-blda", "filled-blda")
WITH_TABLES = (*ALIGNED, "self-calibrate")
"""Methods that build BLDA tables (the label-free default may be one of them)."""
NO_TABLES = Tables()


def correction_tables(method: str | None, tau_auto: bool = False) -> Tables:
    """Tables a correction by ``method`` holds (None: the label-free default, which may).

    ``--tau auto`` caches the lookup tables of the strengths it tries.
    """
    if method is not None and method not in WITH_TABLES:
        return Tables()
    return Tables((len(AUTO_GRID) - 1 if tau_auto else 1,))


@dataclass(frozen=True)
class Terms:
    """How messages name the settings: command-line options, or the API's arguments.

    Attributes:
        method: The method setting (``--method``).
        stats: The statistics being corrected (``--stats``).
        anchors: The labelled statistics (``--anchors``).
        tau: The strength (``--tau``).
        clamp: The CDF clamp (``--clamp``).
        fit_gt: How labelled statistics with calibrations are fitted.
        fit_calibrated: How statistics of calibrated logits are fitted, given ``{anchors}``.
        refit: How a version-1 file is fitted again.
        fit_bins: How statistics are fitted with fewer bins (``{bins}`` is filled in).
    """

    method: str = "--method"
    stats: str = "--stats"
    anchors: str = "--anchors"
    tau: str = "--tau"
    clamp: str = "--clamp"
    fit_gt: str = "blda fit-stats --label-source gt"
    fit_calibrated: str = "blda fit-stats --calibration {anchors}"
    refit: str = "this version of blda fit-stats"
    fit_bins: str = "blda fit-stats --bins {bins}"


CLI_TERMS = Terms()
"""The command line's names (every ``blda`` command)."""
API_TERMS = Terms(
    method="method",
    stats="stats",
    anchors="anchors",
    tau="tau",
    clamp="clamp",
    fit_gt="api.fit_stats(labels='gt')",
    fit_calibrated="api.fit_stats(..., calibration=anchors)",
    refit="this version's api.fit_stats",
    fit_bins="api.fit_stats(..., bins={bins})",
)
"""The names of :mod:`blda_posthoc.api`'s arguments."""


@dataclass(frozen=True)
class Provenance:
    """The statistics a ``blda compare`` report chose with, which ``--from-compare`` applies.

    Attributes:
        source: The report (for messages).
        stats: Fingerprint ``--stats`` must have (None: not checked).
        anchors: Fingerprint ``--anchors`` must have (None: not checked).
    """

    source: Path
    stats: str | None = None
    anchors: str | None = None


@dataclass(frozen=True)
class CompareChoice:
    """The ``selected`` entry of a ``blda compare`` report, checked.

    Attributes:
        method: One of :data:`METHODS`.
        tau: A finite strength >= 0 (None for a method without strength).
        stats: The recorded ``--stats`` path, resolved against the report's folder.
        anchors: The recorded ``--anchors`` path, likewise (None when none is recorded).
        provenance: The recorded fingerprints of both.
    """

    method: str
    tau: float | None
    stats: Path | None
    anchors: Path | None
    provenance: Provenance


COMPARE_FORMAT = "blda-compare"
MAX_FINGERPRINT = 64


def read_compare_choice(path: Path) -> CompareChoice:
    """Read what a ``blda compare --json`` report selected (see :class:`CompareChoice`).

    Every value is checked (:mod:`blda_posthoc.io.schema`): ``format``, an integer
    ``version``, a known method, a finite ``tau >= 0`` (a number, not a bool or string) for
    a method with a strength, string paths and fingerprints. Recorded paths that are
    relative are taken relative to the report's folder (``compare`` records absolute ones).

    Raises:
        InputError: ``{path}: ...`` naming the bad value; also for a shard's report (its
            choice covers its images only).
    """
    root = Node.load(path, context="not a valid 'blda compare' report")
    if not isinstance(root.value, dict) or root.value.get("format") != COMPARE_FORMAT:
        raise InputError(f"{path}: not a 'blda compare' report (format {COMPARE_FORMAT})")
    root["version"].version((1,))
    if "partial" in root.value:
        raise InputError(f"{path}: the report of one shard, chosen on its images only")
    selected = root["selected"]
    method = recorded_method(selected["method"])
    tau_node = selected.get("tau")
    tau = None if tau_node is None else tau_node.number(low=0.0)
    if has_strength(method) and tau is None:
        raise selected.error(f"tau: {method} needs a strength, the report records none")
    settings = root.get("settings")
    folder = Path(path).parent

    def recorded(key: str, length: int = 4096) -> str | None:
        node = None if settings is None else settings.get(key)
        return None if node is None else node.text(max_length=length)

    stats, anchors = recorded("stats"), recorded("anchors")
    return CompareChoice(
        method,
        tau if has_strength(method) else None,
        None if stats is None else folder / stats,
        None if anchors is None else folder / anchors,
        Provenance(
            Path(path),
            recorded("stats_fingerprint", MAX_FINGERPRINT),
            recorded("anchors_fingerprint", MAX_FINGERPRINT),
        ),
    )


def recorded_method(node: Node) -> str:
    """A method name read from a report; one removed in this release is refused with why.

    Raises:
        InputError: ``{file}: {key}: M was removed in this release: why`` for a removed method,
            else as :meth:`Node.text` for a name that is not one of :data:`METHODS`.
    """
    reason = removed_reason(node.value) if isinstance(node.value, str) else None
    if reason is not None:
        raise InputError(f"{node.source}: {node.key}: {reason}")
    return node.text(choices=METHODS)


def check_provenance(statistics: Statistics, expected: Provenance | None) -> None:
    """Refuse statistics whose fingerprints differ from those a report recorded.

    Raises:
        InputError: ``{stats}: fingerprint A differs from B recorded in REPORT ...``.
    """
    if expected is None:
        return
    for path, stats, wanted in (
        (statistics.cond_path, statistics.cond, expected.stats),
        (statistics.anchors_path, statistics.anchors, expected.anchors),
    ):
        if wanted is not None and stats.fingerprint != wanted:
            raise InputError(
                f"{path}: fingerprint {stats.fingerprint} differs from {wanted} recorded in "
                f"{expected.source} (the statistics changed since compare chose; run compare "
                "again)"
            )


@dataclass(frozen=True)
class CorrectionSpec:
    """What the user asked for: method, strength and statistics (one frozen object per run).

    Attributes:
        method: One of :data:`METHODS`, or None for the label-free default
            (:func:`choose_default`: the first of :data:`LABEL_FREE_DEFAULTS` the files support).
        tau: Strength; None for the method's (or the default's) strength.
        tau_auto: Choose ``tau`` label-free on the ``--stats`` pixel sample.
        stats: Stats file of the data being corrected (None only for ``none``).
        anchors: Labelled stats file (default ``stats``).
        clamp: CDF clamp ``r`` of the alignment.
        min_pixels: Cells with fewer pixels get no shift; default the stats file's setting.
        expected: Fingerprints the statistics must have (``--from-compare``), or None.
    """

    method: str | None = "blda"
    tau: float | None = None
    tau_auto: bool = False
    stats: Path | None = None
    anchors: Path | None = None
    clamp: float = DEFAULT_CLAMP
    min_pixels: int | None = None
    expected: Provenance | None = None

    def with_method(self, method: str, tau: float | None = None) -> CorrectionSpec:
        """The same statistics with another method (and strength)."""
        return replace(self, method=method, tau=tau, tau_auto=False)


@dataclass
class Statistics:
    """The two stats files of a correction, read once.

    Attributes:
        cond: ``--stats`` (target side).
        anchors: ``--anchors`` (source side; the same object as ``cond`` when not given).
        cond_path: Where ``cond`` came from.
        anchors_path: Where ``anchors`` came from.
        terms: How messages name the settings.
    """

    cond: LogitStats
    anchors: LogitStats
    cond_path: Path
    anchors_path: Path
    terms: Terms = CLI_TERMS
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def settings(self) -> dict[str, Any]:
        """Paths and fingerprints, for reports (the content hashes computed once)."""
        if "fingerprints" not in self.cache:
            self.cache["fingerprints"] = (self.cond.fingerprint, self.anchors.fingerprint)
        cond, anchors = self.cache["fingerprints"]
        return {
            "stats": str(self.cond_path),
            "stats_fingerprint": cond,
            "stats_labels": self.cond.settings.get("labels"),
            "anchors": str(self.anchors_path),
            "anchors_fingerprint": anchors,
            "estimator": self.cond.estimator,
        }


def read_statistics(
    stats: Path, anchors: Path | None, class_names: list[str], *, tables: Tables = NO_TABLES
) -> Statistics:
    """Read ``--stats`` and ``--anchors``, which must share the store's class names.

    Their memory, with ``tables`` corrections' tables on them, is checked against the budget
    (:func:`~blda_posthoc.pipelines.memory.check_correction_memory`) before anything is read.
    """
    check_stats_memory([*dict.fromkeys([stats, anchors or stats])], tables)
    cond = read_stats(stats)
    anchor_stats = cond if anchors is None else read_stats(anchors)
    for path, read in ((stats, cond), (anchors or stats, anchor_stats)):
        if read.class_names != class_names:
            hint = (
                f" (same count: set the names with `blda info --rename-classes NAMES {path}` "
                "or on the store)"
                if len(read.class_names) == len(class_names)
                else ""
            )
            raise InputError(
                f"{path}: class names {read.class_names} differ from the store's "
                f"{class_names}{hint}"
            )
    return Statistics(cond, anchor_stats, Path(stats), Path(anchors or stats))


@dataclass
class Correction:
    """A correction ready to apply, and how it was set up.

    Attributes:
        method: The method name.
        tau: The strength used (0 for methods without one).
        corrector: The correction (on the device asked for).
        settings: Method, strength, statistics and fingerprints, for reports.
        notes: Things the user should know (cells without shift, ignored options).
    """

    method: str
    tau: float
    corrector: Corrector
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def load_correction(
    spec: CorrectionSpec,
    class_names: list[str],
    device: torch.device | str = "cpu",
    statistics: Statistics | None = None,
    *,
    check_shares: bool = False,
) -> Correction:
    """Read the statistics (unless given) and build the correction ``spec`` asks for.

    Args:
        spec: Method, strength and statistics.
        class_names: The store's class names.
        device: Where the correction runs.
        statistics: Already read statistics (``compare`` builds many corrections from one read).
        check_shares: Add a note naming the classes whose predicted share the correction
            changes more than 10-fold on the ``--stats`` pixel sample (:func:`share_change`).

    Returns:
        The correction; a strength the statistics cannot take is an :class:`InputError` here,
        before any output is written.
    """
    terms = CLI_TERMS if statistics is None else statistics.terms
    reason = None if spec.method is None else removed_reason(spec.method)
    if reason is not None:
        raise InputError(f"{terms.method} {reason}")
    if spec.method is not None and spec.method not in METHODS:
        raise InputError(f"{terms.method} must be one of {', '.join(METHODS)}, got {spec.method!r}")
    notes = []
    if spec.method == "none":
        return Correction("none", 0.0, Plain(), {"method": "none", "tau": None})
    if statistics is None:
        stats, anchors = spec.stats, spec.anchors
        if stats is None and spec.method in CALIBRATION_FOR:
            stats, anchors = anchors, None  # a calibration reads the labelled file only
        if stats is None:
            needs = "--anchors" if spec.method in CALIBRATION_FOR else "--stats"
            raise InputError(f"--method {spec.method or 'default'} needs {needs}")
        statistics = read_statistics(
            stats, anchors, class_names, tables=correction_tables(spec.method, spec.tau_auto)
        )
    check_provenance(statistics, spec.expected)
    default = None
    if spec.method is None:
        default, (corrector, details) = choose_default(
            statistics, spec.clamp, spec.min_pixels, spec.tau, spec.tau_auto
        )
        spec = replace(spec, method=default["method"], tau=default["tau"])
    else:
        corrector, details = build_corrector(spec.method, statistics, spec.clamp, spec.min_pixels)
    assert spec.method is not None
    notes.extend(details.pop("notes", []))
    if not has_strength(spec.method):
        if spec.tau is not None or spec.tau_auto:
            notes.append(f"{terms.tau} is ignored: {spec.method} has no strength")
        tau = 0.0
    elif spec.tau_auto:
        choice = choose_tau(corrector, statistics, DEFAULT_TAUS[spec.method])
        tau = choice["tau"]
        details["tau_auto"] = choice
    else:
        tau = DEFAULT_TAUS[spec.method] if spec.tau is None else spec.tau
    if isinstance(corrector, Aligned) and tau:
        try:
            lookup_tables(corrector.maps, tau)
        except ValueError as exc:
            raise InputError(f"{statistics.cond_path}: {exc}") from exc
    settings: dict[str, Any] = {
        "method": spec.method,
        "tau": tau if has_strength(spec.method) else None,
    }
    if default is not None:
        settings["default"] = default
    settings.update(statistics.settings())
    settings.update(details)
    ready = Correction(spec.method, tau, corrector.to(device), settings, notes)
    if check_shares:
        changed = share_change(ready, statistics)
        if changed:
            listed = ", ".join(f"{name} {factor:.0f}x" for name, factor in changed)
            notes.append(
                f"the correction changes the predicted share of {listed} on the --stats pixel "
                f"sample (more than {MAX_SHARE_FACTOR:g}x: the signature of a collapse)"
            )
    return ready


LABEL_FREE_DEFAULTS: tuple[tuple[str, float], ...] = (
    ("calibrated-blda", 0.7),
    ("cbst", 1.0),
    ("blda", 0.2),
)
"""Without ``--method``: the first of these the statistics support, in this order (chosen by
the rule of docs/methods.md, "How the label-free default is chosen", on the benchmark)."""


def choose_default(
    statistics: Statistics,
    clamp: float,
    min_pixels: int | None,
    tau: float | None = None,
    tau_auto: bool = False,
) -> tuple[dict[str, Any], tuple[Corrector, dict[str, Any]]]:
    """The label-free default for these files, and why.

    Args:
        statistics: The two stats files.
        clamp: CDF clamp of the alignment methods.
        min_pixels: Smallest usable cell.
        tau: A strength the user gave without a method (kept), or None.
        tau_auto: ``--tau auto`` was given without a method.

    Returns:
        ``{"method", "tau", "reason"}``: the first of :data:`LABEL_FREE_DEFAULTS` the files
        support (``tau`` None with ``tau_auto``) and one line saying why (what the preferred
        default lacked when it falls back); and its corrector with details, as
        :func:`build_corrector` returns them.
    """
    missing = []
    for method, strength in LABEL_FREE_DEFAULTS:
        try:
            built = build_corrector(method, statistics, clamp, min_pixels)
        except InputError as exc:
            missing.append(f"{method} τ {strength:g} needs what the files lack: {exc}")
            continue
        teacher = built[1].get("pseudo_labels", {}).get("method")
        if method == "self-calibrate" and teacher != "calibrated-blda":
            # measured only with calibrated-blda pseudo-labels: not the default without them
            missing.append(f"{method} τ {strength:g} needs calibrated-blda statistics")
            continue
        used = None if tau_auto else (strength if tau is None else tau)
        strength_text = "auto" if tau_auto else f"{used:g}"
        source = " (--tau given)" if tau is not None else ""
        reason = f"{method} τ {strength_text}{source}: the label-free default (docs/methods.md)"
        if missing:
            reason += "; fallback: " + "; ".join(missing)
        return {"method": method, "tau": used, "reason": reason}, built
    raise InputError("; ".join(missing))


def build_corrector(
    method: str, statistics: Statistics, clamp: float, min_pixels: int | None
) -> tuple[Corrector, dict[str, Any]]:
    """The corrector of one method and what it was built from.

    Args:
        method: A method other than ``none``.
        statistics: The two stats files.
        clamp: CDF clamp of the alignment methods.
        min_pixels: Smallest usable cell; default the ``--stats`` file's setting.

    Returns:
        The corrector (on the CPU) and details for the report (``notes`` is removed by the
        caller and shown to the user).
    """
    if method in ALIGNED:
        return _aligned(method, statistics, clamp, min_pixels)
    if method in CALIBRATION_FOR:
        scale, bias = _calibration(statistics, CALIBRATION_FOR[method])
        affine = Affine if method == "temperature" else Blended
        return affine(scale, bias), {"calibration": CALIBRATION_FOR[method]}
    if method == "cbst":
        return Shift(_cbst_shift(statistics)), {"cbst_portion": CBST_PORTION}
    if method == "logit-adjust":
        return _logit_adjust(statistics)
    if method == "em-map":
        return _em_map(statistics)
    if method == "ot-prior":
        return _ot_prior(statistics)
    if method == "occurrence-adjust":
        return _occurrence_adjust(statistics)
    if method == "self-calibrate":
        return _self_calibrate(statistics, clamp, min_pixels)
    raise InputError(f"unknown method {method!r}")


def _extras(stats: LogitStats, path: Path, method: str, terms: Terms) -> StatsExtras:
    if stats.extras is None:
        raise InputError(
            f"{path}: a version 1 stats file holds no statistics for {method} "
            f"(fit it again with {terms.refit})"
        )
    return stats.extras


def _sample(statistics: Statistics, method: str) -> PixelSample:
    """The ``--stats`` pixel sample ``method`` estimates on; refused when there is none."""
    terms = statistics.terms
    sample = _extras(statistics.cond, statistics.cond_path, method, terms).sample
    if not len(sample.labels):
        raise InputError(
            f"{statistics.cond_path}: holds no pixel sample, which {method} estimates on "
            f"(fit the statistics with {terms.refit}, which keeps one)"
        )
    return sample


def _calibration(statistics: Statistics, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    terms = statistics.terms
    extras = _extras(statistics.anchors, statistics.anchors_path, f"{kind} calibration", terms)
    if kind not in extras.calibrations:
        raise InputError(
            f"{statistics.anchors_path}: holds no {kind} calibration (it is fitted by "
            f"{terms.fit_gt} on labelled, usually source, logits)"
        )
    scale, bias = extras.calibrations[kind]
    return (
        torch.tensor(np.asarray(scale), dtype=torch.float32),
        torch.tensor(np.asarray(bias), dtype=torch.float32),
    )


def _min_pixels(stats: LogitStats, min_pixels: int | None) -> int:
    return (
        int(stats.settings.get("min_pixels", DEFAULT_MIN_PIXELS))
        if min_pixels is None
        else min_pixels
    )


def _aligned(
    method: str, statistics: Statistics, clamp: float, min_pixels: int | None
) -> tuple[Corrector, dict[str, Any]]:
    cond, anchors, pre = statistics.cond, statistics.anchors, None
    terms = statistics.terms
    if method == "calibrated-blda":
        cond = _calibrated(statistics.cond, statistics.cond_path, terms)
        anchors = _calibrated(statistics.anchors, statistics.anchors_path, terms)
        if _calibration_id(cond) != _calibration_id(anchors):
            fit = terms.fit_calibrated.format(anchors=statistics.anchors_path)
            raise InputError(
                f"{statistics.cond_path}: its calibrated statistics were made with another "
                f"calibration than {statistics.anchors_path}'s (fit it with {fit})"
            )
        pre = Affine(*_calibration(statistics, "vector"))
    min_px = _min_pixels(statistics.cond, min_pixels)
    anchor_pixels = anchors.anchor_counts.sum(-1)
    if (anchor_pixels < max(min_px, 1)).any():
        raise InputError(
            f"{statistics.anchors_path}: anchors hold too few pixels "
            f"(positive {anchor_pixels[0]}, negative {anchor_pixels[1]}; need {min_px})"
        )
    if not 0.0 <= clamp < 0.5:
        raise InputError(f"{terms.clamp} must lie in [0, 0.5), got {clamp}")
    fallback = anchors if method == "filled-blda" else None
    held = held_groups(statistics)
    check_correction_memory(
        statistics.cond_path,
        cond.num_classes,
        max(group.grid.bins for group in held),
        groups=len(held),
        tables=ONE_CORRECTION,
        fit_bins=terms.fit_bins,
    )
    maps = build_maps(cond, anchors, clamp, min_px, fallback=fallback)
    details: dict[str, Any] = {
        "clamp": clamp,
        "min_pixels": min_px,
        "skipped_cells": [list(ij) for ij in maps.skipped],
        "notes": _skipped_note(maps, cond.class_names, terms),
    }
    if pre is not None:
        details["calibration"] = "vector"
    return Aligned(maps, pre), details


def held_groups(statistics: Statistics) -> list[LogitStats]:
    """The histogram groups the two files hold in memory (each file once)."""
    files = [statistics.cond]
    if statistics.anchors is not statistics.cond:
        files.append(statistics.anchors)
    groups = []
    for stats in files:
        groups.append(stats)
        if stats.extras is not None and stats.extras.calibrated is not None:
            groups.append(stats.extras.calibrated)
    return groups


def _calibration_id(stats: LogitStats) -> str | None:
    return (stats.settings.get("calibration") or {}).get("fingerprint")


def _calibrated(stats: LogitStats, path: Path, terms: Terms) -> LogitStats:
    extras = _extras(stats, path, "calibrated-blda", terms)
    if extras.calibrated is None:
        fit = terms.fit_calibrated.format(anchors="SOURCE_STATS")
        raise InputError(
            f"{path}: holds no statistics of calibrated logits (fit it with {terms.fit_gt}, "
            f"or with {fit})"
        )
    return extras.calibrated


def _skipped_note(maps: AlignmentMaps, class_names: list[str], terms: Terms) -> list[str]:
    skipped = maps.skipped
    if not skipped:
        return []
    own = [class_names[i] for i, j in skipped if i == j]
    return [
        f"{len(skipped)} of {len(class_names) ** 2} cells hold too few pixels and get no shift"
        + (
            f" (positive cells of: {', '.join(own)}; {terms.method} filled-blda borrows them "
            f"from {terms.anchors})"
            if own
            else ""
        )
    ]


def _cbst_shift(statistics: Statistics) -> torch.Tensor:
    extras = _extras(statistics.cond, statistics.cond_path, "cbst", statistics.terms)
    lo, hi, bins = extras.confidence_grid
    thresholds = keep_thresholds(extras.confidence, LogOddsGrid(lo, hi, bins), CBST_PORTION)
    present = thresholds.pixels > 0
    # -log(sigmoid(l)) = softplus(-l); a threshold in the lowest bin reads as its lower edge.
    logodds = np.maximum(thresholds.logodds[present], lo)
    shift = np.zeros(len(present))
    shift[present] = np.logaddexp(0.0, -logodds)
    # A class never predicted gets the largest boost of the others.
    shift[~present] = shift[present].max() if present.any() else 0.0
    return torch.as_tensor(shift, dtype=torch.float32)


def target_priors(statistics: Statistics) -> tuple[np.ndarray, np.ndarray, Affine | None]:
    """EM estimate of the target class priors on the ``--stats`` pixel sample.

    The sample's probabilities are calibrated first with the ``--anchors`` vector scaling when
    it has one (EM on raw, under-confident probabilities tends to collapse onto one class).

    Returns:
        ``(target priors (C,), source priors (C,), calibration or None)``, computed once per
        :class:`Statistics`.
    """
    if "priors" not in statistics.cache:
        statistics.cache["priors"] = _target_priors(statistics)
    result: tuple[np.ndarray, np.ndarray, Affine | None] = statistics.cache["priors"]
    return result


def _target_priors(statistics: Statistics) -> tuple[np.ndarray, np.ndarray, Affine | None]:
    z, pre = _calibrated_sample(statistics, "the EM prior estimate")
    source = smooth_counts(statistics.anchors.label_pixels)
    probs = torch.softmax(z.double(), dim=-1).numpy()
    target, _ = em_priors(probs, source)
    return target, source, pre


def _prior_correction(shift: np.ndarray, pre: Affine | None) -> Corrector:
    """A prior shift, on calibrated logits when ``pre`` is given, applied ``tau`` of the way.

    With a calibration the whole map ``a z + b + shift`` is blended with the raw logits
    (:class:`Blended`), so ``tau = 0`` is the plain argmax and ``tau = 1`` the full correction.

    Args:
        shift: ``(C,)`` per-class shift ``log target prior - log source prior``.
        pre: The calibration the priors were estimated with, or None.
    """
    delta = torch.as_tensor(shift, dtype=torch.float32)
    if pre is None:
        return Shift(delta)
    return Blended(pre.scale, pre.bias + delta)


def choose_tau(corrector: Corrector, statistics: Statistics, fallback: float) -> dict[str, Any]:
    """``--tau auto``: the strength chosen on the ``--stats`` pixel sample.

    The strength whose predicted class shares come closest to the EM estimate of the target
    priors (see :func:`blda_posthoc.core.select.auto_tau`).
    """
    terms = statistics.terms
    sample = _sample(statistics, f"{terms.tau} auto")
    target, _, pre = target_priors(statistics)
    if pre is None:
        raise InputError(
            f"{statistics.anchors_path}: {terms.tau} auto needs a source calibration (fit the "
            f"anchors with {terms.fit_gt})"
        )
    z = torch.as_tensor(sample.logits[:: _stride(len(sample.labels))])
    return auto_tau(corrector, z.float(), target, fallback, AUTO_GRID)


AUTO_PIXELS = 50_000
"""Pixels of the sample ``--tau auto`` corrects per candidate strength (an even subset)."""


def _stride(count: int) -> int:
    return max(1, -(-count // AUTO_PIXELS))


LOGIT_ADJUST_WEIGHT = 0.1
"""``logit-adjust`` smooths the predicted shares towards the source prior with this many
pseudo-pixels per pixel: a class never predicted keeps ``0.1 / 1.1`` of its source prior."""
LOGIT_ADJUST_BOUND = 1.0
"""``logit-adjust``'s shift at ``tau = 1`` is clipped to ``[-1, 1]`` per class."""


def _logit_adjust(statistics: Statistics) -> tuple[Corrector, dict[str, Any]]:
    source = smooth_counts(statistics.anchors.label_pixels)
    extras = _extras(statistics.cond, statistics.cond_path, "logit-adjust", statistics.terms)
    predicted = extras.predicted
    target = smooth_towards(predicted, source, LOGIT_ADJUST_WEIGHT)
    shift = np.clip(logit_adjustment(source, target, 1.0), -LOGIT_ADJUST_BOUND, LOGIT_ADJUST_BOUND)
    details = {"smoothing": LOGIT_ADJUST_WEIGHT, "bound": LOGIT_ADJUST_BOUND}
    return Shift(torch.as_tensor(shift, dtype=torch.float32)), details


EM_MAP_WEIGHT = 0.1
"""``em-map``: the Dirichlet hyper-prior's pseudo-pixels, as a fraction of the sample."""
OT_EPSILON = 0.1
"""``ot-prior``: Sinkhorn's entropic regularisation (log-probability scale)."""


def _calibrated_sample(statistics: Statistics, method: str) -> tuple[torch.Tensor, Affine | None]:
    """The ``--stats`` pixel sample's logits, calibrated by the anchors' vector scaling if any."""
    sample = _sample(statistics, method)
    pre = None
    anchor_extras = statistics.anchors.extras
    if anchor_extras is not None and "vector" in anchor_extras.calibrations:
        pre = Affine(*_calibration(statistics, "vector"))
    z = torch.as_tensor(sample.logits, dtype=torch.float32)
    return (z if pre is None else pre.apply(z)), pre


def map_priors(statistics: Statistics) -> tuple[np.ndarray, np.ndarray, Affine | None]:
    """The EM-MAP estimate of the target priors (Dirichlet hyper-prior), computed once.

    Returns:
        ``(target priors (C,), source priors (C,), calibration or None)``.
    """
    if "map_priors" not in statistics.cache:
        z, pre = _calibrated_sample(statistics, "em-map")
        source = smooth_counts(statistics.anchors.label_pixels)
        probs = torch.softmax(z.double(), dim=-1).numpy()
        target, _ = em_map_priors(probs, source, weight=EM_MAP_WEIGHT)
        statistics.cache["map_priors"] = (target, source, pre)
    result: tuple[np.ndarray, np.ndarray, Affine | None] = statistics.cache["map_priors"]
    return result


def _em_map(statistics: Statistics) -> tuple[Corrector, dict[str, Any]]:
    target, source, pre = map_priors(statistics)
    details: dict[str, Any] = {
        "calibration": "vector" if pre is not None else None,
        "dirichlet_weight": EM_MAP_WEIGHT,
        "target_priors": [round(float(p), 6) for p in target],
    }
    return _prior_correction(prior_shift(source, target), pre), details


def _ot_prior(statistics: Statistics) -> tuple[Corrector, dict[str, Any]]:
    sample = _sample(statistics, "ot-prior")
    target, _, _ = map_priors(statistics)
    z = torch.as_tensor(sample.logits[:: _stride(len(sample.labels))])
    offsets = sinkhorn_offsets(torch.log_softmax(z.double(), -1), target, epsilon=OT_EPSILON)
    details: dict[str, Any] = {
        "epsilon": OT_EPSILON,
        "target_priors": [round(float(p), 6) for p in target],
    }
    return Shift(torch.as_tensor(offsets, dtype=torch.float32)), details


def image_mean_probs(
    stats: LogitStats, path: Path, method: str, terms: Terms = CLI_TERMS
) -> np.ndarray:
    """``(M, C)`` mean softmax probability per image of a stats file's pixel sample."""
    sample = _extras(stats, path, method, terms).sample
    if sample.image_counts is None or not len(sample.image_counts):
        raise InputError(
            f"{path}: its pixel sample does not record which image each pixel came from "
            f"(needed by {terms.method} {method}; fit it again with {terms.refit})"
        )
    probs = torch.softmax(torch.as_tensor(sample.logits).double(), dim=-1)
    counts = torch.as_tensor(sample.image_counts)
    keep = counts > 0
    image = torch.repeat_interleave(torch.arange(len(counts)), counts)
    sums = torch.zeros(len(counts), probs.shape[1], dtype=torch.float64)
    sums.index_add_(0, image, probs)
    return (sums[keep] / counts[keep, None]).numpy()


def _occurrence_adjust(statistics: Statistics) -> tuple[Corrector, dict[str, Any]]:
    method = "occurrence-adjust"
    pixel_prior = smooth_counts(statistics.anchors.label_pixels)
    target = occurrence_priors(
        image_mean_probs(statistics.cond, statistics.cond_path, method, statistics.terms),
        pixel_prior,
    )
    source = occurrence_priors(
        image_mean_probs(statistics.anchors, statistics.anchors_path, method, statistics.terms),
        pixel_prior,
    )
    shift = np.log(target) - np.log(source)
    details: dict[str, Any] = {
        "target_occurrence": [round(float(p), 6) for p in target],
        "source_occurrence": [round(float(p), 6) for p in source],
    }
    return Shift(torch.as_tensor(shift, dtype=torch.float32)), details


SELF_CALIBRATION_FROM = ("calibrated-blda", 0.5)
"""``self-calibrate`` takes its pseudo-labels from this correction (``blda`` τ 0.5 when the
files hold no calibrated statistics)."""
SELF_CALIBRATION_KEEP = 0.5
"""``self-calibrate`` keeps this portion of each predicted class as pseudo-labels."""


def _self_calibrate(
    statistics: Statistics, clamp: float, min_pixels: int | None
) -> tuple[Corrector, dict[str, Any]]:
    method, tau = SELF_CALIBRATION_FROM
    notes = []
    try:
        teacher, _ = _aligned(method, statistics, clamp, min_pixels)
    except InputError as exc:
        notes.append(f"self-calibrate: pseudo-labels from blda τ {tau:g} ({exc})")
        method = "blda"
        teacher, _ = _aligned(method, statistics, clamp, min_pixels)
    sample = _sample(statistics, "self-calibrate")
    z = torch.as_tensor(sample.logits[:: _stride(len(sample.labels))]).float()
    scores = teacher.log_scores(z, tau)
    scale, bias, shrink = self_calibration(z, scores, keep=SELF_CALIBRATION_KEEP)
    details: dict[str, Any] = {
        "pseudo_labels": {"method": method, "tau": tau, "keep_portion": SELF_CALIBRATION_KEEP},
        "guard_shrink": shrink,
        "notes": notes,
    }
    corrector = Blended(
        torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32)
    )
    return corrector, details


def share_change(correction: Correction, statistics: Statistics) -> list[tuple[str, float]]:
    """Classes whose predicted share the correction changes more than 10-fold, with the factor.

    Measured on (up to :data:`AUTO_PIXELS` pixels of) the ``--stats`` pixel sample, so it
    costs one correction of a small sample; the limit is
    :data:`~blda_posthoc.core.adapt.MAX_SHARE_FACTOR`. A share that falls counts down to one
    pixel of that sample (:data:`~blda_posthoc.core.adapt.WARN_SHARE_FLOOR`), so a class the
    correction removes is named even when it was rare; a share that rises counts from 0.1 %,
    so a class that goes from one pixel to a few dozen is not.
    """
    extras = statistics.cond.extras
    if extras is None or not len(extras.sample.labels) or correction.method == "none":
        return []
    z = torch.as_tensor(extras.sample.logits[:: _stride(len(extras.sample.labels))]).float()
    corrector = correction.corrector.to("cpu")
    before = predicted_counts(z)
    after = predicted_counts(corrector.log_scores(z, correction.tau))
    floor = max(WARN_SHARE_FLOOR, 1.0 / max(len(z), 1))
    factors = share_factors(before, after, loss_floor=floor)
    names = statistics.cond.class_names
    return [(names[c], float(factors[c])) for c in np.flatnonzero(factors > MAX_SHARE_FACTOR)]
