"""Evaluate a checkpoint on held-out generated scenes.

    python -m dinov.eval.evaluate --checkpoint demo --scenes 40

Generic propagation: every target scene is segmented against all 30 classes, each class given by
1, 4 or 16 examples (full instance masks) taken from other scenes; reported as mIoU (for each
true instance the best IoU among predictions of its class, 0 if none), found (IoU >= 0.5) and
AP50 (COCO's 101-point interpolation, averaged over classes), all at the checkpoint's default
score threshold, and wrong regions per image (predicted regions whose IoU with every true instance
of their class is below 0.5).
Referring on the same image: from a click at the instance's innermost pixel, from its box and
from a scribble inside it (IoU of the chosen candidate with the instance, 0 if none); from an
example on another image: one example of each class present, IoU with the best-matching
instance of that class in the target. For clicks, also the fraction of answers that cover at least
a fifth of another instance (a spill onto a neighbour).
The targets use seeds from 10,000,000 and the example pool seeds from 20,000,000; training uses
seeds below 1,000,000.
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from dinov.data.scenes import NUM_CLASSES, generate_scene
from dinov.eval.example_pool import example_pool
from dinov.metrics import InstanceEvaluator, covers_another, iou, wrong_regions
from dinov.modeling.dinov import DINOv
from dinov.predictor import DINOvPredictor
from dinov.transforms import ResizeConfig

TARGET_SEED = 10_000_000
POOL_SEED = 20_000_000
EXAMPLE_COUNTS = (1, 4, 16)

logger = logging.getLogger(__name__)


def innermost_point(mask: np.ndarray) -> tuple[float, float]:
    """The pixel farthest from the instance's boundary: where a person clicks."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(np.argmax(distance), distance.shape)
    return float(x), float(y)


def scribble(mask: np.ndarray, rng: np.random.Generator, width: int = 3) -> np.ndarray:
    """A short stroke through the instance's interior (kept inside the instance)."""
    from dinov.prompts import stroke_to_mask

    inner = ndimage.binary_erosion(mask, iterations=2)
    ys, xs = np.nonzero(inner if inner.sum() >= 2 else mask)
    a, b = rng.choice(len(xs), size=2, replace=len(xs) < 2)
    stroke = stroke_to_mask([(xs[a], ys[a]), (xs[b], ys[b])], mask.shape, width=width) & mask
    return stroke if stroke.any() else mask


def evaluate_predictor(predictor: DINOvPredictor, num_scenes: int = 40, pool_scenes: int = 120,
                       progress: bool = True) -> dict:
    rng = np.random.default_rng(0)
    # ---- the example pool: prompt embeddings of every instance, by class
    pool = example_pool(predictor, (generate_scene(POOL_SEED + i) for i in
                                    tqdm(range(pool_scenes), desc="example pool", disable=not progress)))
    if len(pool) < NUM_CLASSES:
        logger.warning("the example pool covers only %d of %d classes", len(pool), NUM_CLASSES)
    classes = sorted(pool)

    evaluators = {k: InstanceEvaluator() for k in EXAMPLE_COUNTS}
    wrong = {k: 0 for k in EXAMPLE_COUNTS}
    refer = defaultdict(list)
    spills = []
    for i in tqdm(range(num_scenes), desc="targets", disable=not progress):
        scene = generate_scene(TARGET_SEED + i)
        encoded = predictor.encode_image(scene.image)
        for k in EXAMPLE_COUNTS:
            bank = [np.stack(pool[c][:k]) for c in classes]
            instances = predictor.segment_generic(encoded, bank)
            masks = np.stack([x.mask for x in instances]) if instances else np.zeros((0, *scene.image.shape[:2]), bool)
            labels = [classes[x.class_index] for x in instances]
            evaluators[k].add(masks, [x.score for x in instances], labels, scene.masks, scene.classes)
            wrong[k] += wrong_regions(masks, labels, scene.masks, scene.classes)
        for j, mask in enumerate(scene.masks):
            x, y = innermost_point(mask)
            got = predictor.segment_interactive(encoded, points=[[x, y]], point_labels=[1]).best
            refer["point"].append(iou(got.mask, mask) if got else 0.0)
            others = np.delete(scene.masks, j, axis=0)
            spills.append(bool(got) and covers_another(got.mask, others, 0.2))
            ys, xs = np.nonzero(mask)
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            got = predictor.segment_interactive(encoded, boxes=[box]).best
            refer["box"].append(iou(got.mask, mask) if got else 0.0)
            got = predictor.segment_interactive(encoded, stroke=scribble(mask, rng)).best
            refer["scribble"].append(iou(got.mask, mask) if got else 0.0)
        present = sorted(set(scene.classes.tolist()) & set(pool))
        if present:
            examples = np.stack([pool[c][int(rng.integers(0, len(pool[c])))] for c in present])
            for c, got in zip(present, predictor.segment_referring(encoded, examples)):
                truths = scene.masks[scene.classes == c]
                refer["example"].append(max(iou(got.mask, t) for t in truths) if got else 0.0)

    report = {}
    for k, evaluator in evaluators.items():
        summary = evaluator.summary()
        report[f"generic_{k}"] = {key: summary[key] for key in ("miou", "found", "ap50", "num_instances")}
        report[f"generic_{k}"]["wrong_per_image"] = wrong[k] / max(1, num_scenes)
    for key, values in refer.items():
        report[f"refer_{key}"] = {"miou": float(np.mean(values)), "found": float(np.mean(np.asarray(values) >= 0.5)),
                                  "num_instances": len(values)}
    report["refer_point"]["covering_another"] = float(np.mean(spills)) if spills else 0.0
    report["score_threshold"] = predictor.default_score_threshold
    return report


def evaluate_model(model: DINOv, num_scenes: int = 40, resize: ResizeConfig | None = None) -> dict:
    was_training = model.training
    predictor = DINOvPredictor(model.eval(), device=next(model.parameters()).device, resize=resize)
    try:
        return evaluate_predictor(predictor, num_scenes)
    finally:
        model.train(was_training)


def format_report(report: dict) -> str:
    lines = [f"default score threshold: {report.get('score_threshold', float('nan')):.2f}", "",
             "| task | mIoU | found (IoU>=0.5) | AP50 | wrong regions / image | masks covering >= 1/5 of another "
             "instance | instances |", "|---|---|---|---|---|---|---|"]
    for name, row in report.items():
        if not isinstance(row, dict):
            continue
        ap = f"{row['ap50']:.3f}" if "ap50" in row else "-"
        wrong = f"{row['wrong_per_image']:.2f}" if "wrong_per_image" in row else "-"
        spill = f"{row['covering_another']:.3f}" if "covering_another" in row else "-"
        lines.append(f"| {name} | {row['miou']:.3f} | {row['found']:.3f} | {ap} | {wrong} | {spill} | "
                     f"{row['num_instances']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a DINOv checkpoint on held-out generated scenes")
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--pool", type=int, default=120, help="scenes the examples are taken from")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="generic score threshold instead of the checkpoint's default (same rule otherwise)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = DINOvPredictor.from_checkpoint(args.checkpoint, device=args.device)
    if args.score_threshold is not None:
        predictor.model.default_score_threshold = args.score_threshold
    print(format_report(evaluate_predictor(predictor, args.scenes, args.pool)))


if __name__ == "__main__":
    main()
