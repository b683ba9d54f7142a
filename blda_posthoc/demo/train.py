"""Training the demo network: on the labelled source domain, then optionally self-training.

Two stages, both deterministic for a given seed and thread count:

* :func:`train_source` fits :class:`~blda_posthoc.demo.net.DemoSegNet` on labelled source
  scenes (random crops, flips and generic colour augmentation; class-weighted cross-entropy).
  This is how the shipped ``model.pt`` was made (``scripts/train_demo_model.py``).
* :func:`self_train` continues from a source model the way DAFormer-style UDA methods do:
  each step trains on a labelled source batch plus an unlabelled target batch whose labels
  are the pseudo-labels of a mean teacher (an exponential moving average of the student):
  the teacher's argmax on the clean crop, ignored where its confidence is under a threshold
  (optionally class-balanced, so that rare classes keep some pixels), learnt by the student
  on a colour-augmented copy.

Arrays: images ``(N, H, W, 3)`` uint8 RGB, labels ``(N, H, W)`` uint8 trainIds (255 = ignore).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from blda_posthoc.core.classes import IGNORE_INDEX
from blda_posthoc.demo.net import DemoSegNet, normalise
from blda_posthoc.demo.synthesize import (
    DEFAULT_SIZE,
    class_frequencies,
    gaussian_blur,
    render_indexed,
)

Log = Callable[[str], None]
"""Receives one progress line (e.g. ``print``)."""


@dataclass(frozen=True)
class SourceTraining:
    """Settings of source-only training (the defaults made the shipped ``model.pt``).

    Attributes:
        width: Network width (channels at 1/2 resolution; see ``DemoSegNet``).
        iters: Optimiser steps.
        seed: Seed of the weight initialisation and of the batch sampling.
        batch: Crops per step.
        crop: ``(h, w)`` of a crop.
        lr: Peak learning rate of the one-cycle schedule (AdamW).
    """

    width: int = 16
    iters: int = 600
    seed: int = 1000
    batch: int = 8
    crop: tuple[int, int] = (64, 128)
    lr: float = 3e-3


@dataclass(frozen=True)
class SelfTraining:
    """Settings of mean-teacher self-training on unlabelled target scenes.

    Attributes:
        iters: Optimiser steps (each one source batch and one target batch).
        seed: Seed of the batch sampling and augmentation.
        batch: Crops per domain per step.
        crop: ``(h, w)`` of a crop.
        lr: Peak learning rate of the one-cycle schedule (AdamW).
        threshold: Teacher confidence under which a target pixel is ignored.
        class_balanced: Lower the threshold per class, within each batch, to keep at least
            ``keep`` of the pixels the teacher predicts as that class (CBST-style).
        keep: Share of each predicted class kept when ``class_balanced``.
        ema: Teacher update ``teacher = ema * teacher + (1 - ema) * student``.
        target_weight: Weight of the target pseudo-label loss beside the source loss.
    """

    iters: int = 600
    seed: int = 0
    batch: int = 8
    crop: tuple[int, int] = (64, 128)
    lr: float = 1e-3
    threshold: float = 0.9
    class_balanced: bool = False
    keep: float = 0.5
    ema: float = 0.99
    target_weight: float = 1.0


def render_source(
    seed: int, count: int, size: tuple[int, int] = DEFAULT_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, H, W, 3)`` uint8 images and ``(N, H, W)`` uint8 labels of source scenes 0..N-1."""
    pairs = [render_indexed(seed, "source", i, size) for i in range(count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def random_crops(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray | None,
    batch: int,
    crop: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Random crops with random horizontal flips.

    Args:
        rng: Sampling generator.
        images: ``(N, H, W, 3)`` uint8 images.
        labels: ``(N, H, W)`` uint8 labels, or None for unlabelled images.
        batch: Number of crops B.
        crop: ``(h, w)`` of a crop.

    Returns:
        ``(B, h, w, 3)`` float32 pixels 0..255 and ``(B, h, w)`` uint8 labels (or None).
    """
    n, h, w = images.shape[:3]
    idx = rng.integers(0, n, batch)
    ys = rng.integers(0, h - crop[0] + 1, batch)
    xs = rng.integers(0, w - crop[1] + 1, batch)
    flips = rng.random(batch) < 0.5
    img_list: list[np.ndarray] = []
    lab_list: list[np.ndarray] = []
    for i, y, x, flip in zip(idx, ys, xs, flips, strict=True):
        window = (i, slice(y, y + crop[0]), slice(x, x + crop[1]))
        img = images[window]
        lab = None if labels is None else labels[window]
        if flip:
            img = img[:, ::-1]
            lab = None if lab is None else lab[:, ::-1]
        img_list.append(img)
        if lab is not None:
            lab_list.append(lab)
    pixels = np.stack(img_list).astype(np.float32)
    crops = np.ascontiguousarray(np.stack(lab_list)) if lab_list else None
    return pixels, crops


def sample_batch(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    batch: int,
    crop: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented labelled crops: ``(B, 3, h, w)`` network input and ``(B, h, w)`` int64 target."""
    pixels, crops = random_crops(rng, images, labels, batch, crop)
    assert crops is not None
    x_t = normalise(torch.from_numpy(photometric(rng, pixels)))
    return x_t, torch.from_numpy(crops).long()


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


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Loss weights ``(C,)``: inverse square root of the class frequency, median 1, clipped."""
    freq = np.maximum(class_frequencies(labels, num_classes), 1e-6)
    weights = np.clip(np.sqrt(np.median(freq) / freq), 0.3, 5.0)
    return torch.tensor(weights, dtype=torch.float32)


def train_source(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    settings: SourceTraining = SourceTraining(),
    *,
    log: Log | None = None,
) -> DemoSegNet:
    """Train a fresh network on labelled source scenes.

    Args:
        images: ``(N, H, W, 3)`` uint8 source images.
        labels: ``(N, H, W)`` uint8 source labels.
        num_classes: Number of classes C.
        settings: Width, steps, seed and optimiser settings.
        log: Receives a progress line every 50 steps.

    Returns:
        The trained network, in eval mode.
    """
    torch.manual_seed(settings.seed)
    weights = class_weights(labels, num_classes)
    if log is not None:
        log("class weights: " + " ".join(f"{w:.2f}" for w in weights.tolist()))
    model = DemoSegNet(num_classes, width=settings.width)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, settings.lr, total_steps=settings.iters
    )
    rng = np.random.default_rng(settings.seed)
    start = time.perf_counter()
    model.train()
    for step in range(1, settings.iters + 1):
        x, y = sample_batch(rng, images, labels, settings.batch, settings.crop)
        loss = F.cross_entropy(model(x), y, weight=weights, ignore_index=IGNORE_INDEX)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if log is not None and (step % 50 == 0 or step == settings.iters):
            elapsed = time.perf_counter() - start
            log(f"step {step}/{settings.iters} loss {loss.item():.4f} {elapsed:.0f} s")
    return model.eval()


def pseudo_labels(
    probs: torch.Tensor, threshold: float, class_balanced: bool, keep: float
) -> torch.Tensor:
    """The teacher's argmax, ignored (255) where its confidence is too low.

    Args:
        probs: ``(B, C, h, w)`` teacher probabilities.
        threshold: Confidence under which a pixel is ignored.
        class_balanced: Lower the threshold of each predicted class to its ``1 - keep``
            confidence quantile in this batch when that is lower (never raise it).
        keep: Share of each predicted class kept at least, when ``class_balanced``.

    Returns:
        ``(B, h, w)`` int64 labels, 255 where ignored.
    """
    conf, pred = probs.max(dim=1)
    limit = torch.full_like(conf, threshold)
    if class_balanced:
        for c in pred.unique().tolist():
            mask = pred == c
            quantile = torch.quantile(conf[mask].float(), 1.0 - keep)
            limit[mask] = torch.clamp(quantile, max=threshold).to(limit.dtype)
    return torch.where(conf >= limit, pred, torch.full_like(pred, IGNORE_INDEX))


@torch.no_grad()
def _ema_update(teacher: torch.nn.Module, student: torch.nn.Module, ema: float) -> None:
    for t_param, s_param in zip(teacher.parameters(), student.parameters(), strict=True):
        t_param.mul_(ema).add_(s_param.detach(), alpha=1.0 - ema)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers(), strict=True):
        t_buf.copy_(s_buf)


def self_train(
    model: DemoSegNet,
    source_images: np.ndarray,
    source_labels: np.ndarray,
    target_images: np.ndarray,
    settings: SelfTraining = SelfTraining(),
    *,
    log: Log | None = None,
) -> DemoSegNet:
    """Continue training ``model`` on source labels plus target pseudo-labels of a mean teacher.

    Args:
        model: The source-trained network (not modified; a copy is trained).
        source_images: ``(N, H, W, 3)`` uint8 labelled source images.
        source_labels: ``(N, H, W)`` uint8 source labels.
        target_images: ``(M, H, W, 3)`` uint8 unlabelled target images.
        settings: Steps, seed, threshold and teacher settings.
        log: Receives a progress line every 50 steps (with the share of target pixels kept).

    Returns:
        The self-trained student, in eval mode.
    """
    torch.manual_seed(settings.seed)
    num_classes = model.head.out_channels
    weights = class_weights(source_labels, num_classes)
    student = copy.deepcopy(model).train()
    teacher = copy.deepcopy(model).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    optimiser = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, settings.lr, total_steps=settings.iters
    )
    rng = np.random.default_rng(settings.seed)
    start = time.perf_counter()
    for step in range(1, settings.iters + 1):
        xs, ys = sample_batch(rng, source_images, source_labels, settings.batch, settings.crop)
        clean, _ = random_crops(rng, target_images, None, settings.batch, settings.crop)
        with torch.no_grad():
            probs = torch.softmax(teacher(normalise(torch.from_numpy(clean))), dim=1)
        yt = pseudo_labels(probs, settings.threshold, settings.class_balanced, settings.keep)
        xt = normalise(torch.from_numpy(photometric(rng, clean)))
        loss_src = F.cross_entropy(student(xs), ys, weight=weights, ignore_index=IGNORE_INDEX)
        kept = (yt != IGNORE_INDEX).float().mean()
        loss_tgt = (
            F.cross_entropy(student(xt), yt, ignore_index=IGNORE_INDEX)
            if kept > 0
            else torch.zeros(())
        )
        loss = loss_src + settings.target_weight * loss_tgt
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        _ema_update(teacher, student, settings.ema)
        if log is not None and (step % 50 == 0 or step == settings.iters):
            elapsed = time.perf_counter() - start
            log(
                f"self-train step {step}/{settings.iters} source {loss_src.item():.4f} "
                f"target {loss_tgt.item():.4f} kept {kept.item():.2f} {elapsed:.0f} s"
            )
    return student.eval()
