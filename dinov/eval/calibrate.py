"""Calibrate a checkpoint's default score threshold and store it in the checkpoint's metadata.

    python -m dinov.eval.calibrate --checkpoint runs/x/final.safetensors --scenes 40 --write

The threshold maximises instance F1 (a predicted region is right when its IoU with a not yet matched true
instance of its class is >= 0.5, matched greedily by score as COCO does) of generic segmentation on generated
scenes of a seed range of its own (targets from 30,000,000, examples from 31,000,000), disjoint from both training
(seeds below 1,000,000) and evaluation (`dinov.eval.evaluate`: 10,000,000 and 20,000,000), in the setting of the evaluation: every one of the 30 classes
offered, each by 4 full-mask examples from other scenes. `--write` stores it under "default_score_threshold",
which `load_model` reads (`DINOvPredictor.default_score_threshold`); the released swinT/swinL files are not
calibrated here and keep the official demo's 0.12.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from dinov.build import SCORE_FORM_METADATA_KEY, SCORE_THRESHOLD_METADATA_KEY
from dinov.checkpoint import write_metadata
from dinov.data.scenes import generate_scene
from dinov.eval.example_pool import example_pool
from dinov.metrics import mask_iou, match_greedily
from dinov.postprocess import FORM_THRESHOLDS, SCORE_FORMS, SCORE_THRESHOLD_GRID
from dinov.predictor import DINOvPredictor

CALIBRATION_TARGET_SEED = 30_000_000
CALIBRATION_POOL_SEED = 31_000_000
THRESHOLDS = SCORE_THRESHOLD_GRID
# the thresholds tried for each score form: a quality x margin score runs lower than a class probability


def best_f1_threshold(scores: np.ndarray, matched: np.ndarray, num_truths: int,
                      thresholds: np.ndarray = THRESHOLDS) -> tuple[float, float]:
    """(threshold, F1) maximising F1 = 2 TP / (predictions + truths) over `thresholds`, where predictions are
    those scoring >= the threshold. Greedy matching in score order makes a prediction's match independent of
    the ones scoring lower, so one matching at the lowest threshold serves every threshold."""
    best = (float(thresholds[0]), -1.0)
    for t in thresholds:
        kept = scores >= t
        f1 = 2 * float(matched[kept].sum()) / max(1, int(kept.sum()) + num_truths)
        if f1 > best[1] + 1e-12:
            best = (float(t), f1)
    return best


def collect(predictor: DINOvPredictor, num_scenes: int, pool_scenes: int, examples: int = 4,
            lowest: float = float(THRESHOLDS[0])) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores and matched flags of every region above the lowest threshold, and the number of true instances."""
    pool = example_pool(predictor, (generate_scene(CALIBRATION_POOL_SEED + i) for i in range(pool_scenes)))
    classes = sorted(pool)
    bank = [np.stack(pool[c][:examples]) for c in classes]
    scores, matched, truths = [], [], 0
    for i in range(num_scenes):
        scene = generate_scene(CALIBRATION_TARGET_SEED + i)
        encoded = predictor.encode_image(scene.image)
        found = predictor.segment_generic(encoded, bank, score_threshold=lowest)
        truths += len(scene.masks)
        if not found:
            continue
        masks = np.stack([x.mask for x in found])
        labels = np.array([classes[x.class_index] for x in found])
        region_scores = np.array([x.score for x in found])
        ious = mask_iou(masks, scene.masks)
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            rows = rows[np.argsort(-region_scores[rows], kind="mergesort")]
            cols = np.flatnonzero(scene.classes == c)
            scores.extend(region_scores[rows].tolist())
            matched.extend(match_greedily(ious[np.ix_(rows, cols)], 0.5).tolist())
    return np.asarray(scores, float), np.asarray(matched, bool), truths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint (or demo)")
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--pool", type=int, default=120)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--score-form", choices=SCORE_FORMS, default=None,
                        help="what a region's score is (default: the checkpoint's; written with --write)")
    parser.add_argument("--write", action="store_true", help="store the threshold in the checkpoint's metadata")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = DINOvPredictor.from_checkpoint(args.checkpoint, device="cpu")
    if args.score_form is not None:
        predictor.model.score_form = args.score_form
    grid = FORM_THRESHOLDS[predictor.score_form]
    scores, matched, truths = collect(predictor, args.scenes, args.pool, lowest=float(grid[0]))
    threshold, f1 = best_f1_threshold(scores, matched, truths, grid)
    at_official = best_f1_threshold(scores, matched, truths, np.array([0.12]))[1]
    print(f"score {predictor.score_form}, best threshold {threshold:.2f}: instance F1 {f1:.3f} (at 0.12: {at_official:.3f}; "
          f"{truths} instances, {args.scenes} scenes from seed {CALIBRATION_TARGET_SEED})")
    if args.write:
        from dinov.build import DEMO_CHECKPOINT

        path = DEMO_CHECKPOINT if args.checkpoint == "demo" else args.checkpoint
        write_metadata(path, {SCORE_THRESHOLD_METADATA_KEY: f"{threshold:.2f}",
                              SCORE_FORM_METADATA_KEY: predictor.score_form})
        print(f"wrote {SCORE_THRESHOLD_METADATA_KEY}={threshold:.2f}, {SCORE_FORM_METADATA_KEY}={predictor.score_form} "
              f"into {path}")


if __name__ == "__main__":
    main()
