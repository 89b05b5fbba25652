"""Before/after figures of a Start Training fine-tuning, without Label Studio: a "project" of generated scenes of
the two shape kinds the demo model never saw (orange hexagons, white crosses: dinov.data.scenes.EXTRA_KINDS), split
as the backend splits a project, trained and measured as the training job does (the job's own functions).

    python benchmarks/finetune_project.py --project 1            # the end-to-end test's project: the job's defaults
    python benchmarks/finetune_project.py --parameters decoder --project 1                # the decoder only
    python benchmarks/finetune_project.py --checkpoint swinT --device cuda --steps 1000 --size 512

The scenes are those of tests/e2e/test_training_e2e.py: seeds 300, 301, ... for the annotated tasks (a scene's seed is
its task id, which with --project decides the split), the next --held-out seeds for the held-out tasks.

Prints the validation figures before and after (mIoU, found, wrong regions per image: the demo model at the threshold
it is served with, the fine-tuned one at the threshold the job chooses on the validation split), the verdict of the better-or-not rule, the training time, and the same figures on held-out scenes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from dinov.build import load_model, save_model
from dinov.data.scenes import generate_extra_scene
from dinov.predictor import DINOvPredictor
from dinov.train.finetune import (
    best_threshold_figures,
    figures_at,
    finetune,
    finetune_config,
    form_thresholds,
    is_better,
)
from dinov.train.trainer import Trainer
from labelstudio_backend.settings import Settings
from labelstudio_backend.training.data import split_tasks
from labelstudio_backend.training.job import served_collector, served_threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--device", default="cpu")
    defaults = Settings()  # the training job's: TRAIN_STEPS, TRAIN_PARAMETERS
    parser.add_argument("--steps", type=int, default=defaults.train_steps)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--tasks", type=int, default=14, help="annotated tasks of the project")
    parser.add_argument("--first-seed", type=int, default=300, help="the first annotated scene's seed")
    parser.add_argument("--held-out", type=int, default=8, help="further scenes to measure on")
    parser.add_argument("--size", type=int, default=160, help="scene side in pixels (height; width is 1.25x)")
    parser.add_argument("--project", type=int, default=1, help="the project id, which decides the split")
    parser.add_argument("--parameters", default=defaults.train_parameters)
    parser.add_argument("--lr", type=float, default=None, help="default: dinov.train.finetune's")
    parser.add_argument("--seed", type=int, default=0, help="the fine-tuning's seed (batches, prompts, noise)")
    parser.add_argument("--cheap", action=argparse.BooleanOptionalAction, default=True,
                        help="the cheap steps of the training job (crops, 256 mask points); --no-cheap: full steps")
    parser.add_argument("--save", type=Path, help="also write the fine-tuned model here (safetensors)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default="model_dir")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    size = (args.size, int(args.size * 1.25))
    seeds = range(args.first_seed, args.first_seed + args.tasks + args.held_out)
    scenes = {seed: generate_extra_scene(seed, size=size, num_objects=(3, 5)) for seed in seeds}
    train_ids, val_ids = split_tasks(list(seeds[: args.tasks]), project_id=args.project)
    train, val = [scenes[t] for t in train_ids], [scenes[t] for t in val_ids]
    held_out = [scenes[seed] for seed in seeds[args.tasks:]]
    settings = Settings()
    collect = served_collector(settings, num_labels=2)

    model, model_config, _ = load_model(args.checkpoint, cache_dir=args.cache_dir)
    _, threshold = served_threshold(settings, model)  # as the backend serves it: the checkpoint's default
    served = DINOvPredictor(model, device=args.device)
    before = figures_at(collect(served, train, val), threshold, lowered_until_found=True)
    before_held = figures_at(collect(served, train, held_out), threshold, lowered_until_found=True)
    trainer = Trainer(model, model_config, finetune_config(model_config, args.parameters, args.steps, seed=args.seed, cheap=args.cheap,
                                                           **({"lr": args.lr} if args.lr else {})), device=args.device)
    started = time.perf_counter()
    history = finetune(trainer, train, args.minutes * 60)
    seconds = time.perf_counter() - started
    predictor = DINOvPredictor(trainer.model.eval(), device=args.device)
    if args.save:
        save_model(trainer.model, model_config, args.save)
    # the new model's threshold is chosen on the validation split, then applied to the held-out scenes
    after = best_threshold_figures(collect(predictor, train, val), before["wrong_per_image"], lowered_until_found=True)
    collected_held = collect(predictor, train, held_out)
    after_held = figures_at(collected_held, after["score_threshold"], lowered_until_found=True)
    better, why = is_better(before, after)
    print(f"{args.checkpoint} on {args.device}: {trainer.step} steps in {seconds:.0f} s "
          f"({seconds / max(1, trainer.step):.2f} s/step), loss {history[0]['total']:.1f} -> {history[-1]['total']:.1f}")
    print(f"{len(train)} training, {len(val)} validation tasks; verdict: {'better' if better else 'rejected'}: {why}")
    print("| split | model | mIoU | found | wrong regions / image | threshold |\n|---|---|---|---|---|---|")
    for split, rows in (("validation", (before, after)), ("held-out", (before_held, after_held))):
        for name, row in zip(("before", "after"), rows):
            print(f"| {split} ({row['tasks']} images) | {name} | {row['miou']:.3f} | {row['found']:.3f} | "
                  f"{row['wrong_per_image']:.2f} | {row['score_threshold']:.2f} |")
    print("held-out, the fine-tuned model at other thresholds (mIoU / wrong regions per image):")
    print(", ".join(f"{t:.2f}: {f['miou']:.3f} / {f['wrong_per_image']:.2f}" for t in form_thresholds(predictor)
                    for f in [figures_at(collected_held, float(t), lowered_until_found=True)]))


if __name__ == "__main__":
    main()
