"""Names and defaults the command line shows before any work is done (no torch, no numpy).

``blda CMD -h`` and usage errors build every option from these, so they must import nothing
heavy; the modules that do the work re-export them (``core.methods.METHODS`` is this tuple).
"""

from __future__ import annotations

METHODS = (
    "none",
    "blda",
    "calibrated-blda",
    "filled-blda",
    "temperature",
    "vector-scaling",
    "bias",
    "cbst",
    "em-map",
    "ot-prior",
    "occurrence-adjust",
    "self-calibrate",
    "logit-adjust",
)
"""Every method name ``--method`` takes."""

REMOVED_METHODS = {
    "em-prior": "its plain EM prior collapses on some data (demo: -2.7 mIoU); use em-map "
    "(EM with a Dirichlet prior)",
}
"""Methods of earlier releases, and why they went (docs/methods.md, "Removed: em-prior"): naming
one gets this reason, not a plain "unknown"."""


def removed_reason(method: str) -> str | None:
    """``"M was removed in this release: why"`` for a removed method ``M``, else None."""
    why = REMOVED_METHODS.get(method)
    return None if why is None else f"{method} was removed in this release: {why}"


NOT_IN_COMPARE_DEFAULT = (
    "filled-blda",
    "temperature",
    "vector-scaling",
    "bias",
    "ot-prior",
    "occurrence-adjust",
    "logit-adjust",
)
"""Methods ``compare --methods all`` leaves out: on the benchmark none was the best held-out row
of any case (docs/methods.md; ``temperature`` never changes the argmax at all). ``blda`` and
``cbst`` never won either but stay: they are the defaults for statistics without calibrations.
Name a method to compare it."""
COMPARE_DEFAULT = tuple(m for m in METHODS if m not in NOT_IN_COMPARE_DEFAULT)
"""What ``compare --methods all`` (its default) compares."""

DEFAULT_TAUS = {
    "blda": 0.2,
    "calibrated-blda": 0.7,
    "filled-blda": 0.1,
    "vector-scaling": 0.1,
    "bias": 0.1,
    "cbst": 1.0,
    "em-map": 0.1,
    "ot-prior": 0.1,
    "occurrence-adjust": 0.2,
    "self-calibrate": 1.0,
    "logit-adjust": 0.1,
}
"""Methods with a strength, and the strength used when ``--tau`` is not given: ``blda``'s is the
paper's; every other is the benchmark's best worst case over its cases (docs/methods.md)."""


def has_strength(method: str) -> bool:
    """Whether ``method`` takes ``tau``."""
    return method in DEFAULT_TAUS


DEFAULT_TAU = 0.2
"""BLDA's strength when none is given (the reference post-hoc code's)."""
DEFAULT_CLAMP = 0.01
"""CDF values are clamped to ``[r, 1 - r]`` with this ``r``."""
DEFAULT_MIN_PIXELS = 100
"""Cells with fewer pixels get no shift."""

DEFAULT_TAU_GRID = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
"""The strengths ``compare`` tries by default."""
DEFAULT_BOOTSTRAP = 1000
"""Resamples of the paired bootstrap interval of every gain."""
METRICS = ("miou", "macc")
"""Metrics a gain can be measured in."""

ESTIMATORS = ("hist", "gmm")
"""How ``fit-stats`` models each distribution."""
LABEL_SOURCES = ("gt", "pseudo")
"""Where ``fit-stats`` takes the labels from."""
DEFAULT_BINS = 4096
"""Histogram bins of ``fit-stats``."""
DEFAULT_SAMPLE_PIXELS = 200_000
"""Pixels of the seeded sample kept in a stats file."""

IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
"""ImageNet channel means (RGB) on the 0-255 scale."""
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
"""ImageNet channel standard deviations (RGB) on the 0-255 scale."""
PRECISION_NAMES = ("fp32", "tf32", "fp16", "bf16")
"""``dump-logits --precision`` values (``core.infer.PRECISIONS`` maps them to dtypes)."""
MAX_SIDE = 1 << 16
"""Largest image height or width."""
WEIGHT_FORMATS = {"png": ".png", "npy": ".npy"}
"""``relabel --weights-format``: the file extension of each per-pixel weight format."""
