"""Benchmark the correction against the plain argmax and a direct (untabulated) implementation.

All three run in one process on the same random 19-class logits, so the figures are ratios
measured side by side:

* ``argmax``: resize + argmax (what a plain prediction costs);
* ``blda tabulated``: :func:`blda_posthoc.core.correct.correct_image` (maps tabulated once,
  chunked);
* ``direct``: per pixel, every ``F_ij`` evaluated by interpolation on the histogram CDF and every
  anchor quantile by a sorted search, on ``(C, C, N)`` tensors (the straightforward way; the
  reference expands further to ``(B, C, C, K, H, W)`` for its mixtures).

Usage: python scripts/bench_correct.py [--size 512x1024] [--images 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

from blda_posthoc.core.align import build_maps
from blda_posthoc.core.correct import correct_image
from blda_posthoc.core.distributions import hist_cdf
from blda_posthoc.core.fit import Grid, LogitHistogram, make_stats
from blda_posthoc.core.methods import Aligned, Plain

C = 19


def synthetic(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (h // 16, w // 16), generator=g)
    labels = labels.repeat_interleave(16, 0).repeat_interleave(16, 1)
    z = torch.randn(C, h, w, generator=g) * 2 + torch.linspace(-1, 1, C)[:, None, None]
    z.scatter_add_(0, labels[None], torch.full((1, h, w), 4.0))
    return z, labels


def direct_predict(z: torch.Tensor, stats, tau: float, clamp: float = 0.01) -> torch.Tensor:
    """Untabulated correction: CDFs and quantiles evaluated for every pixel and cell."""
    c, h, w = z.shape
    flat = z.reshape(c, -1).double()
    edges = torch.as_tensor(stats.grid.edges)
    cdf = torch.as_tensor(hist_cdf(stats.counts))  # (C, C, G)
    anchor_cdf = torch.as_tensor(hist_cdf(stats.anchor_counts))  # (2, G)
    out = torch.empty(h * w, dtype=torch.long)
    step = 4096
    for s in range(0, flat.shape[1], step):
        zz = flat[:, s : s + step]  # (C_j, n)
        pos = ((zz - edges[0]) / (edges[1] - edges[0])).clamp(0, len(edges) - 1 - 1e-9)
        k = pos.floor().long()
        frac = pos - k
        u = (
            cdf[:, torch.arange(c)[:, None], k] * (1 - frac)
            + cdf[:, torch.arange(c)[:, None], k + 1] * frac
        )  # (C_i, C_j, n)
        u = u.clamp(clamp, 1 - clamp)
        through = []
        for row in anchor_cdf:  # positive, then negative anchor
            idx = torch.searchsorted(row, u).clamp(1, len(edges) - 1)
            c0, c1 = row[idx - 1], row[idx]
            frac_u = (u - c0) / (c1 - c0).clamp_min(1e-300)
            through.append(edges[idx - 1] + frac_u * (edges[1] - edges[0]))
        t = torch.where(torch.eye(c, dtype=torch.bool)[..., None], through[0], through[1])
        shifted = zz[None] + tau * (t - zz[None])
        scores = shifted.diagonal(dim1=0, dim2=1).T - torch.logsumexp(shifted, dim=1)
        out[s : s + step] = scores.argmax(0)
    return out.reshape(h, w)


T = TypeVar("T")


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="512x1024")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--tau", type=float, default=0.2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--direct-pixels",
        type=int,
        default=65536,
        help="pixels of one image run through the slow direct method",
    )
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    device = torch.device(args.device)
    images = [synthetic(h, w, seed) for seed in range(args.images)]
    hist = LogitHistogram(C, Grid.covering(-12, 16, 4096))
    for z, y in images:
        hist.update(z, y)
    stats = make_stats(hist, [str(i) for i in range(C)], settings={"min_pixels": 100})
    t_build, maps = timed(lambda: build_maps(stats, stats), device)
    maps = maps.to(device)
    aligned = Aligned(maps)
    gpu_images = [(z.to(device), y) for z, y in images]
    correct_image(gpu_images[0][0], (h, w), aligned, args.tau)  # warm-up (packs the shift table)
    t_argmax, _ = timed(lambda: [correct_image(z, (h, w), Plain()) for z, _ in gpu_images], device)
    t_blda, preds = timed(
        lambda: [correct_image(z, (h, w), aligned, args.tau)[0] for z, _ in gpu_images], device
    )
    n = args.direct_pixels
    side = int(np.sqrt(n))
    crop = images[0][0][:, :side, :side]
    t_direct, direct = timed(lambda: direct_predict(crop, stats, args.tau), torch.device("cpu"))
    agree = (direct == preds[0][:side, :side].cpu()).float().mean().item()
    mpix = args.images * h * w / 1e6
    print(f"device {device}, {args.images} images of {h}x{w}, C={C}, tau={args.tau}")
    print(f"build maps (once)         {t_build * 1000:8.1f} ms")
    print(f"argmax                    {mpix / t_argmax:8.2f} Mpix/s  (1.00x time)")
    print(f"blda tabulated            {mpix / t_blda:8.2f} Mpix/s  ({t_blda / t_argmax:.1f}x time)")
    direct_rate = side * side / 1e6 / t_direct
    print(
        f"direct (CPU, {side}x{side} crop) {direct_rate:8.2f} Mpix/s  "
        f"({mpix / t_blda / direct_rate:.1f}x slower than tabulated)"
    )
    print(f"agreement tabulated vs direct: {100 * agree:.3f}% of pixels")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if device.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
