"""Cost of compare's bootstrap intervals: the vectorised resampling against a direct loop.

Synthetic per-image confusion matrices (every image holds a random subset of the classes) for
``--rows`` rows and ``--images`` images; ``gain_intervals`` with ``--resamples`` resamples is
timed against a direct loop that adds the drawn images' confusion matrices up and summarises
each resample (the reference of tests/test_bootstrap.py), run on the first ``--loop-resamples``
resamples and scaled. Prints seconds, the ratio and the peak memory of the vectorised path.

Usage: python scripts/bench_bootstrap.py [--images 500] [--rows 45] [--classes 19]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from blda_posthoc.core.bootstrap import gain_intervals, image_counts
from blda_posthoc.core.evaluate import summarize


def matrices(rng: np.random.Generator, images: int, classes: int) -> np.ndarray:
    """``(I, C, C + 1)`` per-image confusion matrices, a few classes per image."""
    out = np.zeros((images, classes, classes + 1), dtype=np.int64)
    for i in range(images):
        present = rng.choice(classes, size=rng.integers(2, classes + 1), replace=False)
        for t in present:
            out[i, t] = rng.multinomial(int(rng.integers(100, 20000)), np.full(classes + 1, 0.01))
            out[i, t, t] += int(rng.integers(1000, 100000))
    return out


def loop(rows: list[np.ndarray], base: np.ndarray, n: int, seed: int) -> None:
    """The direct resampling of the confusion matrices (timing only)."""
    images = base.shape[0]
    drawn = np.random.default_rng(seed).integers(0, images, size=(n, images))
    for b in range(n):
        none = summarize(base[drawn[b]].sum(0))["miou"]
        for row in rows:
            assert summarize(row[drawn[b]].sum(0))["miou"] is not None and none is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rows", type=int, default=45)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--loop-resamples", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    base = matrices(rng, args.images, args.classes)
    rows = [matrices(rng, args.images, args.classes) for _ in range(args.rows)]
    counts = [image_counts(r) for r in rows]
    base_counts = image_counts(base)
    tracemalloc.start()
    start = time.perf_counter()
    gain_intervals(counts, base_counts, n=args.resamples, seed=0)
    fast = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    start = time.perf_counter()
    loop(rows, base, args.loop_resamples, 0)
    slow = (time.perf_counter() - start) * args.resamples / args.loop_resamples
    print(
        f"{args.images} images x {args.rows} rows x {args.resamples} resamples, "
        f"{args.classes} classes"
    )
    print(f"gain_intervals: {fast:.2f} s, peak {peak / 2**20:.0f} MiB (besides the inputs)")
    print(
        f"direct loop over confusion matrices: {slow:.1f} s (scaled from "
        f"{args.loop_resamples} resamples); vectorised is {slow / fast:.0f}x faster"
    )


if __name__ == "__main__":
    main()
