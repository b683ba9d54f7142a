"""Train the demo network on the synthetic SOURCE domain only and save its state dict.

Reproducible: fixed seeds, deterministic algorithms, a fixed thread count. The training scenes
use their own seed (``--seed``), disjoint from the demo's default data seed.

    .venv/bin/python scripts/train_demo_model.py            # writes blda_posthoc/demo/model.pt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blda_posthoc.core.classes import IGNORE_INDEX
from blda_posthoc.core.synthesize import (
    DEFAULT_SIZE,
    DEMO_CLASSES,
    class_frequencies,
    gaussian_blur,
    render_indexed,
)
from blda_posthoc.demo.net import WEIGHTS, DemoSegNet, normalise


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--seed", type=int, default=1000, help="seed of the training scenes")
    parser.add_argument("--images", type=int, default=400, help="source scenes to train on")
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def make_data(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(N, H, W, 3)`` uint8 images and ``(N, H, W)`` uint8 labels of the source domain."""
    pairs = [render_indexed(seed, "source", i, DEFAULT_SIZE) for i in range(count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def sample_batch(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    batch: int,
    crop: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops with random horizontal flips: ``(B, 3, h, w)`` input, ``(B, h, w)`` target."""
    n, h, w = labels.shape
    idx = rng.integers(0, n, batch)
    ys = rng.integers(0, h - crop[0] + 1, batch)
    xs = rng.integers(0, w - crop[1] + 1, batch)
    flips = rng.random(batch) < 0.5
    img_list, lab_list = [], []
    for i, y, x, flip in zip(idx, ys, xs, flips, strict=True):
        img = images[i, y : y + crop[0], x : x + crop[1]]
        lab = labels[i, y : y + crop[0], x : x + crop[1]]
        if flip:
            img, lab = img[:, ::-1], lab[:, ::-1]
        img_list.append(img)
        lab_list.append(lab)
    pixels = photometric(rng, np.stack(img_list).astype(np.float32))
    x_t = normalise(torch.from_numpy(pixels))
    y_t = torch.from_numpy(np.ascontiguousarray(np.stack(lab_list))).long()
    return x_t, y_t


def photometric(rng: np.random.Generator, batch: np.ndarray) -> np.ndarray:
    """Generic colour augmentation of ``(B, h, w, 3)`` 0..255 floats.

    Brightness, contrast, saturation and per-channel gain jitter, an occasional mild blur and
    sensor noise (the usual source-only augmentation, not a model of the target domain).
    """
    out = np.empty_like(batch)
    for i, img in enumerate(batch):
        grey = img.mean(axis=-1, keepdims=True)
        img = grey + rng.uniform(0.6, 1.3) * (img - grey)
        img = img.mean() + rng.uniform(0.7, 1.2) * (img - img.mean())
        img = img * rng.uniform(0.65, 1.2) * rng.uniform(0.9, 1.1, 3)
        if rng.random() < 0.3:
            img = gaussian_blur(img, float(rng.uniform(0.3, 1.0)))
        img = img + rng.normal(0.0, rng.uniform(0.0, 6.0), img.shape)
        out[i] = np.clip(img, 0.0, 255.0)
    return out


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """Loss weights ``(C,)``: inverse square root of the class frequency, median 1, clipped."""
    freq = np.maximum(class_frequencies(labels), 1e-6)
    weights = np.clip(np.sqrt(np.median(freq) / freq), 0.3, 5.0)
    return torch.tensor(weights, dtype=torch.float32)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    images, labels = make_data(args.seed, args.images)
    print(f"rendered {len(images)} source scenes in {time.time() - start:.1f} s", flush=True)
    weights = class_weights(labels)
    print("class weights:", " ".join(f"{w:.2f}" for w in weights.tolist()), flush=True)
    model = DemoSegNet(len(DEMO_CLASSES))
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, args.lr, total_steps=args.iters)
    rng = np.random.default_rng(args.seed)
    model.train()
    for step in range(1, args.iters + 1):
        x, y = sample_batch(rng, images, labels, args.batch, tuple(args.crop))
        loss = F.cross_entropy(model(x), y, weight=weights, ignore_index=IGNORE_INDEX)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0 or step == args.iters:
            print(
                f"step {step}/{args.iters} loss {loss.item():.4f} {time.time() - start:.0f} s",
                flush=True,
            )
    model.eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, args.out)
    print(
        f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)",
        f"after {time.time() - start:.0f} s",
    )


if __name__ == "__main__":
    main()
