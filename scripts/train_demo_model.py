"""Train the demo network on the synthetic source domain (optionally self-train it) and save it.

Reproducible: fixed seeds, deterministic algorithms, a fixed thread count. The training scenes
use their own seed (``--data-seed``, default 1000), disjoint from the demo's data seed (0).

    .venv/bin/python scripts/train_demo_model.py            # writes blda_posthoc/demo/model.pt

A narrower or wider network, trained longer or with another seed (``--width``, ``--iters``,
``--seed``), or a DAFormer-style self-trained one: start from a saved network (``--init``),
then train on source labels plus mean-teacher pseudo-labels of unlabelled target scenes::

    .venv/bin/python scripts/train_demo_model.py --init blda_posthoc/demo/model.pt \\
        --self-train --iters 600 --threshold 0.9 --class-balanced --out selftrained.pt

The output is a state dict (what ``blda_posthoc.demo.net:build`` loads for width 16); with
``--whole-module`` it is the pickled network, which ``blda dump-logits --model
blda_posthoc.demo.net:DemoSegNet --checkpoint FILE`` uses as is at any width.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from blda_posthoc.demo.cases import load_network, save_network
from blda_posthoc.demo.net import WEIGHTS
from blda_posthoc.demo.synthesize import DEFAULT_SIZE, DEMO_CLASSES, render_indexed
from blda_posthoc.demo.train import (
    SelfTraining,
    SourceTraining,
    render_source,
    self_train,
    train_source,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument(
        "--data-seed", type=int, default=1000, help="seed of the training scenes (both domains)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of initialisation and sampling (default: --data-seed)",
    )
    parser.add_argument("--images", type=int, default=400, help="source scenes to train on")
    parser.add_argument("--width", type=int, default=16, help="network width")
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--lr", type=float, default=None, help="default 3e-3, 1e-3 self-training")
    parser.add_argument("--threads", type=int, default=2, help="1 is fastest on a busy CPU")
    parser.add_argument("--whole-module", action="store_true", help="save the pickled network")
    group = parser.add_argument_group("self-training")
    group.add_argument("--self-train", action="store_true", help="self-train the --init network")
    group.add_argument("--init", type=Path, default=None, help="saved network to start from")
    group.add_argument("--target-images", type=int, default=400, help="unlabelled target scenes")
    group.add_argument("--threshold", type=float, default=0.9, help="pseudo-label confidence")
    group.add_argument("--class-balanced", action="store_true", help="per-class thresholds")
    group.add_argument("--keep", type=float, default=0.5, help="share of each class kept")
    group.add_argument("--ema", type=float, default=0.99, help="mean-teacher momentum")
    args = parser.parse_args()
    if args.self_train and args.init is None:
        parser.error("--self-train needs --init (the source-trained network)")
    return args


def main() -> None:
    args = parse_args()
    seed = args.data_seed if args.seed is None else args.seed
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    images, labels = render_source(args.data_seed, args.images)
    print(f"rendered {len(images)} source scenes in {time.time() - start:.1f} s", flush=True)
    crop = (args.crop[0], args.crop[1])
    if args.self_train:
        assert args.init is not None
        model = load_network(args.init, width=args.width)
        target = np.stack(
            [
                render_indexed(args.data_seed, "target", i, DEFAULT_SIZE)[0]
                for i in range(args.target_images)
            ]
        )
        print(f"rendered {len(target)} unlabelled target scenes", flush=True)
        settings = SelfTraining(
            iters=args.iters,
            seed=seed,
            batch=args.batch,
            crop=crop,
            lr=1e-3 if args.lr is None else args.lr,
            threshold=args.threshold,
            class_balanced=args.class_balanced,
            keep=args.keep,
            ema=args.ema,
        )
        model = self_train(model, images, labels, target, settings, log=print)
    else:
        if args.init is not None:
            raise SystemExit("--init applies to --self-train only")
        source = SourceTraining(
            width=args.width,
            iters=args.iters,
            seed=seed,
            batch=args.batch,
            crop=crop,
            lr=3e-3 if args.lr is None else args.lr,
        )
        model = train_source(images, labels, len(DEMO_CLASSES), source, log=print)
    save_network(model, args.out, whole_module=args.whole_module)
    print(
        f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)",
        f"after {time.time() - start:.0f} s",
    )


if __name__ == "__main__":
    main()
