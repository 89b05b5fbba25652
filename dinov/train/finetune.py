"""Fine-tuning on a project's own labels, and the before/after measure that decides whether it is kept.

    config = finetune_config("decoder", steps=300)
    trainer = Trainer(model, model_config, config, device="cpu")          # the one trainer of dinov.train
    history = finetune(trainer, train_scenes, max_seconds=600, on_progress=report)
    after = measure_propagation(predictor, train_scenes, val_scenes)
    better, reason = is_better(before, after)

Scenes carry the project's instances (class i = the project's i-th label); an instance known only by its box
(a Label Studio rectangle) has ``has_mask`` False and supervises the box, never a mask.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Sequence

import numpy as np

from dinov.calibrate import THRESHOLDS, best_f1_threshold
from dinov.data.scenes import Scene
from dinov.metrics import mask_iou, match_greedily
from dinov.train.trainer import TrainConfig, Trainer, batches

# What a fine-tuning trains; the rest stays frozen.
TRAINABLE = {
    "decoder": {"freeze_backbone": True, "freeze_encoder": True},   # transformer decoder and heads
    "decoder+pixel_decoder": {"freeze_backbone": True, "freeze_encoder": False},
    "all": {"freeze_backbone": False, "freeze_encoder": False},
}
MIN_VALIDATION_TASKS = 3
IOU_FOUND = 0.5
LOWEST_THRESHOLD = 0.05  # regions are collected from this score up; thresholds are applied afterwards


def finetune_config(trainable: str, steps: int, batch_size: int = 2, lr: float = 3e-4, seed: int = 0) -> TrainConfig:
    """The TrainConfig of a fine-tuning: the frozen parts of `trainable`, a short warm-up, no periodic files."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, backbone_lr_scale=0.1,
                       warmup_steps=max(1, steps // 10), seed=seed, log_every=max(1, steps // 10),
                       checkpoint_every=10**9, **TRAINABLE[trainable])


def finetune(trainer: Trainer, scenes: Sequence[Scene], max_seconds: float,
             on_progress: Callable[[int, float], None] | None = None) -> list[dict[str, float]]:
    """Train until trainer.config.steps or max_seconds, whichever comes first; on_progress(step, loss) after each
    step. Returns the losses of every step."""
    if not scenes:
        raise ValueError("no training images")
    config = trainer.config
    rng = np.random.default_rng(config.seed)
    deadline = time.monotonic() + max_seconds
    history: list[dict[str, float]] = []
    for batch in batches(scenes, config, rng):
        if trainer.step >= config.steps or time.monotonic() >= deadline:
            break
        history.append(trainer.train_step(batch))
        if on_progress is not None:
            on_progress(trainer.step, history[-1]["total"])
    trainer.model.eval()
    return history


def _filled_boxes(masks: np.ndarray) -> np.ndarray:
    """Each mask replaced by its filled bounding box (a box-only truth is compared with a region's box)."""
    out = np.zeros_like(masks)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(ys):
            out[i, ys.min(): ys.max() + 1, xs.min(): xs.max() + 1] = True
    return out


def region_ious(pred_masks: np.ndarray, scene: Scene) -> np.ndarray:
    """[P, G] IoU of predicted regions with the scene's instances: mask IoU with an outlined instance, box IoU
    (the region's filled box against the filled box) with a box-only one."""
    if not len(pred_masks) or not len(scene.masks):
        return np.zeros((len(pred_masks), len(scene.masks)))
    outlined = np.ones(len(scene.masks), bool) if scene.has_mask is None else np.asarray(scene.has_mask, bool)
    ious = mask_iou(pred_masks, scene.masks)
    if not outlined.all():
        ious[:, ~outlined] = mask_iou(_filled_boxes(pred_masks), scene.masks[~outlined])
    return ious


def measure_propagation(predictor, examples: Sequence[Scene], targets: Sequence[Scene], max_examples: int = 16,
                        score_threshold: float | None = None, max_instances: int = 100,
                        select: Callable[[list], list] | None = None, max_wrong_per_image: float | None = None) -> dict:
    """Generic propagation as the backend does it: every target segmented against the classes of `examples`
    (each by up to max_examples of its instances), its regions passed through `select` (the backend's
    selection of what it returns: a function of the predictor's Instances, best first, that keeps some of them,
    possibly with smaller masks; a region's fate depends only on better ones, so selecting once and applying a
    threshold afterwards is selecting at that threshold). Returns mIoU (per true instance the best IoU among regions
    of its class), found (IoU >= 0.5), wrong regions per image (IoU < 0.5 with every true instance of their
    class), at `score_threshold`. None: the threshold is calibrated on these targets: with `max_wrong_per_image`,
    the one with the best mIoU among those that make at most that many wrong regions per image (a new model is
    served where it errs no more than the old one); otherwise, or when none does, the one that maximises
    instance F1. Reported as "score_threshold"."""
    pool: dict[int, list[np.ndarray]] = defaultdict(list)
    for scene in examples:
        if len(scene.masks) == 0:
            continue
        encoded = predictor.encode_image(scene.image)
        for c, e in zip(scene.classes.tolist(), predictor.encode_prompts(encoded, scene.masks)):
            if len(pool[c]) < max_examples:
                pool[c].append(e)
    classes = sorted(pool)
    bank = [np.stack(pool[c]) for c in classes]
    per_target = []  # (scores [P], labels [P], ious [P, G], truth classes [G])
    for scene in targets:
        found = predictor.segment_generic(predictor.encode_image(scene.image), bank, score_threshold=LOWEST_THRESHOLD,
                                          max_instances=max_instances, max_examples=max_examples) if bank else []
        if select is not None:
            found = select(found)
        masks = np.stack([x.mask for x in found]) if found else np.zeros((0, *scene.image.shape[:2]), bool)
        per_target.append((np.array([x.score for x in found]), np.array([classes[x.class_index] for x in found]),
                           region_ious(masks, scene), np.asarray(scene.classes)))
    if score_threshold is None and max_wrong_per_image is not None:
        figures = [_figures(per_target, t) for t in THRESHOLDS]
        allowed = [f for f in figures if f["wrong_per_image"] <= max_wrong_per_image]
        if allowed:
            return max(allowed, key=lambda f: (f["miou"], -f["score_threshold"]))
    if score_threshold is None:
        score_threshold = _calibrated_threshold(per_target)
    return _figures(per_target, score_threshold)


def _figures(per_target: list, score_threshold: float) -> dict:
    """mIoU, found and wrong regions per image of collected regions at one score threshold."""
    best, wrong = [], 0
    for scores, labels, ious, truth in per_target:
        kept = scores >= score_threshold
        same = (labels[kept][:, None] == truth[None, :]) if len(truth) else np.zeros((int(kept.sum()), 0), bool)
        matched = np.where(same, ious[kept], 0.0)
        best.extend(matched.max(0).tolist() if len(matched) else [0.0] * len(truth))
        wrong += int((matched.max(1) < IOU_FOUND).sum()) if matched.shape[1] else int(kept.sum())
    best_arr = np.asarray(best, float)
    return {"miou": float(best_arr.mean()) if len(best_arr) else 0.0,
            "found": float((best_arr >= IOU_FOUND).mean()) if len(best_arr) else 0.0,
            "wrong_per_image": wrong / max(1, len(per_target)), "tasks": len(per_target),
            "instances": len(best_arr), "score_threshold": float(score_threshold)}


def _calibrated_threshold(per_target: list) -> float:
    """The score threshold that maximises instance F1 (greedy matching by score, as dinov.calibrate)."""
    scores_all, matched_all, truths = [], [], 0
    for scores, labels, ious, truth in per_target:
        truths += len(truth)
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            rows = rows[np.argsort(-scores[rows], kind="mergesort")]
            cols = np.flatnonzero(truth == c)
            scores_all.extend(scores[rows].tolist())
            matched_all.extend(match_greedily(ious[np.ix_(rows, cols)], IOU_FOUND).tolist())
    if not scores_all:
        return LOWEST_THRESHOLD
    return best_f1_threshold(np.asarray(scores_all, float), np.asarray(matched_all, bool), truths)[0]


def is_better(before: dict, after: dict, min_tasks: int = MIN_VALIDATION_TASKS) -> tuple[bool, str]:
    """The rule a fine-tuned model must pass to be served: at least `min_tasks` validation tasks, mIoU higher and
    wrong regions per image not higher. A tie is not better. Returns (better, why)."""
    figures = (f"mIoU {before['miou']:.3f} -> {after['miou']:.3f}, wrong regions per image "
               f"{before['wrong_per_image']:.2f} -> {after['wrong_per_image']:.2f}")
    if after["tasks"] < min_tasks:
        return False, f"only {after['tasks']} validation tasks; at least {min_tasks} are needed to tell"
    if not after["miou"] > before["miou"]:
        return False, f"mIoU is not higher ({figures})"
    if after["wrong_per_image"] > before["wrong_per_image"]:
        return False, f"more wrong regions ({figures})"
    return True, figures
