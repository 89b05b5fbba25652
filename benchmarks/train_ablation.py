"""What each change of the training recipe buys, at a fixed short budget.

    python benchmarks/train_ablation.py --init runs/demo_9d4e02a.safetensors --steps 100 --scenes 10

Every row fine-tunes the same starting weights for the same number of steps with the same seed, adding one
change to the row above, then evaluates on held-out scenes (`dinov.eval.evaluate`, 4 examples per class for the
generic task) and measures how often the object query that overlaps an instance best carries its class
(`benchmarks/class_matching.py`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from class_matching import diagnose  # noqa: E402

from dinov.build import load_model  # noqa: E402
from dinov.data.scenes import SceneDataset  # noqa: E402
from dinov.eval.evaluate import evaluate_predictor  # noqa: E402
from dinov.predictor import DINOvPredictor  # noqa: E402
from dinov.train.config import TrainConfig  # noqa: E402
from dinov.train.sampling import batches  # noqa: E402
from dinov.train.trainer import Trainer  # noqa: E402

OLD = dict(dn_queries=0, cross_image_examples=False, max_examples=4, batch_classes=0, spill_weight=0.0)
ROWS = [
    ("previous recipe", OLD),
    ("+ examples from other images, 1..16 averaged", dict(OLD, cross_image_examples=True, max_examples=16)),
    ("+ batches sharing 10 classes", dict(OLD, cross_image_examples=True, max_examples=16, batch_classes=10)),
    ("+ denoising queries", dict(OLD, cross_image_examples=True, max_examples=16, batch_classes=10, dn_queries=100)),
    ("+ interactive spill loss", dict(OLD, cross_image_examples=True, max_examples=16, batch_classes=10,
                                      dn_queries=100, spill_weight=2.0)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--scenes", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rows", default="", help="comma-separated row numbers (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    wanted = [int(r) for r in args.rows.split(",")] if args.rows else range(len(ROWS))
    print("| recipe | steps | generic mIoU (4 ex.) | found | AP50 | class right (best query) | click | box |"
          " example from another image | min |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for index in wanted:
        name, options = ROWS[index]
        start = time.time()
        torch.manual_seed(args.seed)
        model, model_config, _ = load_model(args.init)
        config = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=10, seed=args.seed, **options)
        trainer = Trainer(model, model_config, config)
        data = batches(SceneDataset(range(0, 1_000_000)), config, np.random.default_rng(args.seed))
        while trainer.step < args.steps:
            trainer.train_step(next(data))
        predictor = DINOvPredictor(trainer.model.eval(), device="cpu")
        report = evaluate_predictor(predictor, args.scenes, progress=False)
        classes = diagnose(predictor, args.scenes, 60, 4)["other images"]
        g = report["generic_4"]
        print(f"| {name} | {args.steps} | {g['miou']:.3f} | {g['found']:.3f} | {g['ap50']:.3f} | "
              f"{classes['class right']:.3f} | {report['refer_point']['miou']:.3f} | {report['refer_box']['miou']:.3f} | "
              f"{report['refer_example']['miou']:.3f} | {(time.time() - start) / 60:.0f} |", flush=True)


if __name__ == "__main__":
    main()
