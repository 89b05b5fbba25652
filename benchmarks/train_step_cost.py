"""CPU seconds per training step (process CPU time, one thread), the recipe given by TrainConfig flags.

    OMP_NUM_THREADS=1 python benchmarks/train_step_cost.py --steps 12                 # the previous recipe
    OMP_NUM_THREADS=1 python benchmarks/train_step_cost.py --steps 12 --cheap          # crops, points, DN, queries
    OMP_NUM_THREADS=1 python benchmarks/train_step_cost.py --steps 12 --cheap --shape-dim 32   # + shape extension

Starts from the demo model, batch 4 of generated scenes with shared classes (as the demo's training); the first
two steps are not counted (allocation warm-up). Prints the mean and the standard error of the counted steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    from dinov.build import load_model
    from dinov.data.scenes import SceneDataset
    from dinov.train.config import CHEAP_RECIPE, TrainConfig
    from dinov.train.sampling import batches
    from dinov.train.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cheap", action="store_true", help="the cheap recipe (dinov.train.config.CHEAP_RECIPE)")
    parser.add_argument("--shape-dim", type=int, default=0, help="add a shape encoder of this width (0: none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, config, _ = load_model(args.checkpoint)
    overrides = dict(CHEAP_RECIPE) if args.cheap else {}
    if args.shape_dim:
        from dinov.train.trainer import with_shape_encoder

        model, config = with_shape_encoder(model, config, args.shape_dim)
    train_config = TrainConfig(steps=args.steps + args.warmup, batch_size=4, batch_classes=10, seed=3, **overrides)
    trainer = Trainer(model, config, train_config)
    times = []
    source = batches(SceneDataset(range(0, 1000)), train_config, np.random.default_rng(3))
    for step in range(args.warmup + args.steps):
        batch = next(source)
        start = time.process_time()
        trainer.train_step(batch)
        if step >= args.warmup:
            times.append(time.process_time() - start)
    t = np.asarray(times)
    name = ("cheap" if args.cheap else "previous") + (f" + shape extension ({args.shape_dim})" if args.shape_dim else "")
    print(f"{name} recipe: {t.mean():.3f} s CPU per step "
          f"(+- {t.std(ddof=1) / np.sqrt(len(t)):.3f}, {len(t)} steps, batch 4, one thread)")


if __name__ == "__main__":
    main()
