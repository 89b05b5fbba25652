"""Evaluate a checkpoint on held-out generated scenes.

    python -m dinov.eval.evaluate --checkpoint demo --scenes 40

Generic propagation: every target scene is segmented against all 30 classes, each class given by
1, 4 or 16 examples (full instance masks) taken from other scenes; reported as mIoU (for each
true instance the best IoU among predictions of its class, 0 if none), found (IoU >= 0.5) and
AP50 (COCO's 101-point interpolation, averaged over classes), all at the checkpoint's default
score threshold, and wrong regions per image: predicted regions matched to no true instance of their class
(one to one, best score first, IoU >= 0.5), so that a second region on an instance already matched is wrong.
Every figure comes with its standard error (over instances, or over images for wrong regions).
Class right: with 4 examples per class, for every true instance the object query whose mask overlaps it best
(before any threshold), and whether that query's highest-probability class is the instance's (same scenes).
Scores: among the regions returned (4 examples per class), the area under the ROC curve of the region score
separating right regions from wrong ones (also for the region score times its mask quality, the mean mask
probability inside it), and the Spearman rank correlation between the prediction's score (what the Label Studio
backend reports, `dinov.postprocess.prediction_score`) and the image's mIoU, also for the mean region score.
Referring on the same image: from a click at the instance's innermost pixel, from its box and
from a scribble inside it (IoU of the chosen candidate with the instance, 0 if none); from an
example on another image: one example of each class present, IoU with the best-matching
instance of that class in the target. For clicks, also the fraction of answers that cover at least
a fifth of another instance (a spill onto a neighbour).
The targets use seeds from 10,000,000 and the example pool seeds from 20,000,000; training uses
seeds below 1,000,000 and the threshold calibration (`dinov.eval.calibrate`) seeds from 30,000,000 and 31,000,000.
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from dinov.data.scenes import NUM_CLASSES, generate_scene
from dinov.eval.example_pool import example_pool
from dinov.metrics import InstanceEvaluator, covers_another, iou, mask_iou, region_matches, roc_auc, standard_error
from dinov.modeling.dinov import DINOv
from dinov.postprocess import SCORE_FORMS, prediction_score
from dinov.predictor import DINOvPredictor
from dinov.transforms import ResizeConfig

TARGET_SEED = 10_000_000
POOL_SEED = 20_000_000
EXAMPLE_COUNTS = (1, 4, 16)
CLASS_RIGHT_EXAMPLES = 4  # class right is measured with this many examples per class

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


def image_miou(pred_masks: np.ndarray, pred_classes: Sequence[int], gt_masks: np.ndarray,
               gt_classes: np.ndarray) -> np.ndarray:
    """For each true instance, the best IoU among the predicted regions of its class (0 if none): float [G]."""
    if len(gt_masks) == 0:
        return np.zeros(0)
    if len(pred_masks) == 0:
        return np.zeros(len(gt_masks))
    same = np.asarray(pred_classes)[:, None] == np.asarray(gt_classes)[None, :]
    return np.where(same, mask_iou(pred_masks, gt_masks), 0.0).max(0)


def evaluate_predictor(predictor: DINOvPredictor, num_scenes: int = 40, pool_scenes: int = 120,
                       progress: bool = True) -> dict:
    rng = np.random.default_rng(0)
    # ---- the example pool: prompt embeddings of every instance, by class
    pool = example_pool(predictor, (generate_scene(POOL_SEED + i) for i in
                                    tqdm(range(pool_scenes), desc="example pool", disable=not progress)))
    if len(pool) < NUM_CLASSES:
        logger.warning("the example pool covers only %d of %d classes", len(pool), NUM_CLASSES)
    if num_scenes < 40:
        logger.warning("%d target scenes: the figures of BENCHMARKS.md use at least 40", num_scenes)
    classes = sorted(pool)

    evaluators = {k: InstanceEvaluator() for k in EXAMPLE_COUNTS}
    best_ious: dict[int, list[float]] = defaultdict(list)  # per true instance
    wrong: dict[int, list[int]] = defaultdict(list)  # per image, duplicates included
    regions: dict[int, list[tuple[float, float, bool]]] = defaultdict(list)  # (score, mask quality, right)
    images: dict[int, list[tuple[float, float, float]]] = defaultdict(list)  # (prediction score, mean score, mIoU)
    class_right: list[bool] = []
    best_query_iou: list[float] = []
    refer: dict[str, list[float]] = defaultdict(list)  # per true instance, by prompt kind
    spills: list[bool] = []
    for i in tqdm(range(num_scenes), desc="targets", disable=not progress):
        scene = generate_scene(TARGET_SEED + i)
        encoded = predictor.encode_image(scene.image)
        for k in EXAMPLE_COUNTS:
            bank = [np.stack(pool[c][:k]) for c in classes]
            instances = predictor.segment_generic(encoded, bank)
            masks = np.stack([x.mask for x in instances]) if instances else np.zeros((0, *scene.image.shape[:2]), bool)
            labels = [classes[x.class_index] for x in instances]
            scores = np.array([x.score for x in instances], float)
            quality = np.array([1.0 if x.mask_quality is None else x.mask_quality for x in instances], float)
            evaluators[k].add(masks, scores, labels, scene.masks, scene.classes)
            right = region_matches(masks, scores, labels, scene.masks, scene.classes)
            wrong[k].append(int((~right).sum()))
            regions[k].extend(zip(scores.tolist(), quality.tolist(), right.tolist()))
            per_instance = image_miou(masks, labels, scene.masks, scene.classes)
            best_ious[k].extend(per_instance.tolist())
            images[k].append((prediction_score(scores, getattr(instances, "candidate_score_sum", None)),
                              float(scores.mean()) if len(scores) else 0.0,
                              float(per_instance.mean()) if len(per_instance) else 1.0))
            if k == CLASS_RIGHT_EXAMPLES:
                # the object query whose mask overlaps each true instance best: is its best class the instance's?
                probs, query_masks = predictor.generic_queries(encoded, bank)
                overlap = mask_iou(query_masks, scene.masks)  # [Q, G]
                for g, c in enumerate(scene.classes.tolist()):
                    q = int(overlap[:, g].argmax())
                    best_query_iou.append(float(overlap[q, g]))
                    class_right.append(classes[int(probs[q].argmax())] == c)
        for j, mask in enumerate(scene.masks):
            x, y = innermost_point(mask)
            got = predictor.segment_interactive(encoded, points=[[x, y]], point_labels=[1]).best
            refer["point"].append(iou(got.mask, mask) if got else 0.0)
            others = np.delete(scene.masks, j, axis=0)
            spills.append(got is not None and covers_another(got.mask, others, 0.2))
            ys, xs = np.nonzero(mask)
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            got = predictor.segment_interactive(encoded, boxes=[box]).best
            refer["box"].append(iou(got.mask, mask) if got else 0.0)
            got = predictor.segment_interactive(encoded, stroke=scribble(mask, rng)).best
            refer["scribble"].append(iou(got.mask, mask) if got else 0.0)
        present = sorted(set(scene.classes.tolist()) & set(pool))
        if present:
            examples = np.stack([pool[c][int(rng.integers(0, len(pool[c])))] for c in present])
            for c, match in zip(present, predictor.segment_referring(encoded, examples)):
                truths = scene.masks[scene.classes == c]
                refer["example"].append(max(iou(match.mask, t) for t in truths) if match else 0.0)

    report: dict = {"scenes": num_scenes, "classes_offered": len(classes)}
    for k, evaluator in evaluators.items():
        summary = evaluator.summary()
        values = np.asarray(best_ious[k])
        found = (values >= 0.5).astype(float)
        row = {"miou": float(values.mean()), "miou_se": standard_error(values),
               "found": float(found.mean()), "found_se": standard_error(found),
               "ap50": summary["ap50"], "num_instances": len(values),
               "wrong_per_image": float(np.mean(wrong[k])), "wrong_per_image_se": standard_error(wrong[k])}
        score, quality, right = (np.asarray(v) for v in zip(*regions[k])) if regions[k] else (np.zeros(0),) * 3
        row["regions"] = len(score)
        row["score_auc"] = roc_auc(score, right.astype(bool))
        row["score_x_quality_auc"] = roc_auc(score * quality, right.astype(bool))
        image_score, mean_score, miou_image = (np.asarray(v) for v in zip(*images[k]))
        row["prediction_score_spearman"] = spearman(image_score, miou_image)
        row["mean_region_score_spearman"] = spearman(mean_score, miou_image)
        report[f"generic_{k}"] = row
    right_values = np.asarray(class_right, float)
    report["class_right"] = {"miou": float(np.mean(best_query_iou)), "miou_se": standard_error(best_query_iou),
                             "found": float(right_values.mean()), "found_se": standard_error(right_values),
                             "num_instances": len(right_values)}
    for key, per_instance_ious in refer.items():
        values = np.asarray(per_instance_ious)
        found = (values >= 0.5).astype(float)
        report[f"refer_{key}"] = {"miou": float(values.mean()), "miou_se": standard_error(values),
                                  "found": float(found.mean()), "found_se": standard_error(found),
                                  "num_instances": len(values)}
    spill_values = np.asarray(spills, float)
    report["refer_point"]["covering_another"] = float(spill_values.mean()) if len(spills) else 0.0
    report["refer_point"]["covering_another_se"] = standard_error(spill_values)
    report["score_threshold"] = predictor.default_score_threshold
    report["score_form"] = predictor.score_form
    return report


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (nan when either side is constant)."""
    from scipy.stats import spearmanr

    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


def evaluate_model(model: DINOv, num_scenes: int = 40, resize: ResizeConfig | None = None) -> dict:
    was_training = model.training
    predictor = DINOvPredictor(model.eval(), device=next(model.parameters()).device, resize=resize)
    try:
        return evaluate_predictor(predictor, num_scenes)
    finally:
        model.train(was_training)


def format_report(report: dict) -> str:
    """Markdown tables of a report: each figure with its standard error."""
    def pm(row: dict, key: str) -> str:
        se = row.get(f"{key}_se")
        return f"{row[key]:.3f}" + ("" if se is None or np.isnan(se) else f" +- {se:.3f}")

    lines = [f"score: {report.get('score_form', 'class_probability')}, default threshold "
             f"{report.get('score_threshold', float('nan')):.2f}; "
             f"{report.get('scenes', '?')} scenes, {report.get('classes_offered', '?')} classes offered", "",
             "| task | mIoU | found (IoU>=0.5) | AP50 | wrong regions / image (duplicates count) | masks covering >= 1/5 "
             "of another instance | instances |", "|---|---|---|---|---|---|---|"]
    for name, row in report.items():
        if not isinstance(row, dict) or name == "class_right":
            continue
        ap = f"{row['ap50']:.3f}" if "ap50" in row else "-"
        wrong = pm(row, "wrong_per_image") if "wrong_per_image" in row else "-"
        spill = pm(row, "covering_another") if "covering_another" in row else "-"
        lines.append(f"| {name} | {pm(row, 'miou')} | {pm(row, 'found')} | {ap} | {wrong} | {spill} | "
                     f"{row['num_instances']} |")
    if "class_right" in report:
        row = report["class_right"]
        lines += ["", f"class right for the best-overlapping object query ({CLASS_RIGHT_EXAMPLES} examples per class): "
                      f"{pm(row, 'found')} (its IoU {pm(row, 'miou')}; {row['num_instances']} instances)"]
    lines += ["", "| generic | regions returned | region score AUC right vs wrong | score x mask quality AUC | "
                  "prediction score vs image mIoU (Spearman) | mean region score vs image mIoU (Spearman) |",
              "|---|---|---|---|---|---|"]
    for name, row in report.items():
        if isinstance(row, dict) and "score_auc" in row:
            lines.append(f"| {name} | {row['regions']} | {row['score_auc']:.3f} | {row['score_x_quality_auc']:.3f} | "
                         f"{row['prediction_score_spearman']:.3f} | {row['mean_region_score_spearman']:.3f} |")
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
    parser.add_argument("--score-form", choices=SCORE_FORMS, default=None,
                        help="what a region's score is, instead of the checkpoint's (dinov.postprocess.SCORE_FORMS)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = DINOvPredictor.from_checkpoint(args.checkpoint, device=args.device)
    if args.score_threshold is not None:
        predictor.model.default_score_threshold = args.score_threshold
    if args.score_form is not None:
        predictor.model.score_form = args.score_form
    print(format_report(evaluate_predictor(predictor, args.scenes, args.pool)))


if __name__ == "__main__":
    main()
