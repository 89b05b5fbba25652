"""Evaluation metrics for instance segmentation with in-context examples.

For generic segmentation (every instance of the prompted classes), over all true instances:
  mIoU   for each true instance, the best IoU among the predicted instances of its class in the same
         image (0 if there is none), averaged over instances;
  found  the fraction of true instances whose best IoU is at least 0.5;
  AP50   average precision at mask IoU 0.5 exactly as COCO computes it (per class: detections ranked
         by score over all images, each matched greedily to the unmatched true instance of highest IoU,
         at most 100 per image and class; precision interpolated at 101 recall points), averaged over
         the classes that have true instances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

try:  # accept torch tensors without making torch a requirement of this module
    import torch
    _HAVE_TORCH = True
except ImportError:  # pragma: no cover
    _HAVE_TORCH = False

# masks [N, H, W] (or one [H, W]) and vectors [N], as numpy arrays, torch tensors or sequences
Masks: TypeAlias = "np.ndarray | torch.Tensor | Sequence[np.ndarray]"
Vector: TypeAlias = "np.ndarray | torch.Tensor | Sequence[float]"
Box: TypeAlias = "np.ndarray | torch.Tensor | Sequence[float]"


def _as_masks(masks: Masks, name: str) -> np.ndarray:
    if _HAVE_TORCH and isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"{name} must be masks [N, H, W] (or one [H, W]), got shape {masks.shape}")
    return masks.astype(bool, copy=False)


def _as_vector(values: Vector, name: str, length: int, dtype: npt.DTypeLike) -> np.ndarray:
    if _HAVE_TORCH and isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = np.asarray(values, dtype=dtype).reshape(-1)
    if len(values) != length:
        raise ValueError(f"{name} has {len(values)} entries for {length} masks")
    return values


def mask_iou(a: Masks, b: Masks) -> np.ndarray:
    """IoU of every pair of masks a [P, H, W] and b [G, H, W] -> [P, G] (0 where both are empty).

    A single [H, W] mask counts as [1, H, W]; :func:`iou` gives the number for two single masks.
    """
    a, b = _as_masks(a, "a"), _as_masks(b, "b")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"masks of different sizes: {a.shape[1:]} and {b.shape[1:]}")
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def iou(a: Masks, b: Masks) -> float:
    """IoU of two bool masks [H, W] (0 when both are empty)."""
    if np.ndim(a) != 2 or np.ndim(b) != 2:
        raise ValueError(f"iou compares two [H, W] masks, got shapes {np.shape(a)} and {np.shape(b)}; use mask_iou")
    return float(mask_iou(a, b)[0, 0])


def point_in_mask(mask: npt.ArrayLike, x: float, y: float) -> bool:
    """Whether the pixel under the point (x, y) (pixel coordinates of the mask's image, x to the right) is in
    the mask. The pixel is (round(y), round(x)); a point beyond the border counts as the nearest border pixel
    (a click on the image's edge)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"point_in_mask takes one [H, W] mask, got shape {mask.shape}")
    col = min(max(int(round(float(x))), 0), mask.shape[1] - 1)
    row = min(max(int(round(float(y))), 0), mask.shape[0] - 1)
    return bool(mask[row, col])


def fraction_outside_box(mask: npt.ArrayLike, box: Box) -> float:
    """The fraction of a mask's pixels outside the box (x0, y0, x1, y1) in pixels, x1/y1 exclusive (0 for an
    empty mask); a pixel is inside when its centre is."""
    mask = np.asarray(mask, dtype=bool)
    total = int(mask.sum())
    if total == 0:
        return 0.0
    height, width = mask.shape
    return 1.0 - int(box_region(box, (height, width))[mask].sum()) / total


def box_region(box: Box, size: tuple[int, int]) -> np.ndarray:
    """Bool [H, W]: the pixels whose centre (x + 0.5, y + 0.5) lies in the box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    height, width = size
    cols = (np.arange(width) + 0.5 >= x0) & (np.arange(width) + 0.5 <= x1)
    rows = (np.arange(height) + 0.5 >= y0) & (np.arange(height) + 0.5 <= y1)
    return rows[:, None] & cols[None, :]


def best_ious(pred_masks: Masks, pred_classes: Vector, gt_masks: Masks, gt_classes: Vector) -> np.ndarray:
    """[G]: for each true instance, the best IoU among the predictions of its class (0 if none)."""
    gt = _as_masks(gt_masks, "gt_masks")
    pred = _as_masks(pred_masks, "pred_masks") if len(pred_masks) else np.zeros((0, *gt.shape[1:]), bool)
    gt_cls = _as_vector(gt_classes, "gt_classes", len(gt), np.int64)
    pred_cls = _as_vector(pred_classes, "pred_classes", len(pred), np.int64)
    out = np.zeros(len(gt))
    if len(gt) == 0 or len(pred) == 0:
        return out
    ious = mask_iou(pred, gt)
    same_class = pred_cls[:, None] == gt_cls[None, :]
    return np.where(same_class, ious, 0.0).max(0)


def wrong_regions(pred_masks: Masks, pred_classes: Vector, gt_masks: Masks, gt_classes: Vector,
                  iou_threshold: float = 0.5, pred_scores: Vector | None = None) -> int:
    """How many predicted regions match no true instance of their class: IoU below ``iou_threshold`` with every
    one of them (a region an annotator would delete). With ``pred_scores``, regions are matched one to one
    (:func:`region_matches`), so that a second region on an instance already matched is wrong too."""
    if pred_scores is not None:
        return int((~region_matches(pred_masks, pred_scores, pred_classes, gt_masks, gt_classes,
                                    iou_threshold)).sum())
    gt = _as_masks(gt_masks, "gt_masks")
    if len(pred_masks) == 0:
        return 0
    pred = _as_masks(pred_masks, "pred_masks")
    gt_cls = _as_vector(gt_classes, "gt_classes", len(gt), np.int64)
    pred_cls = _as_vector(pred_classes, "pred_classes", len(pred), np.int64)
    if len(gt) == 0:
        return len(pred)
    ious = np.where(pred_cls[:, None] == gt_cls[None, :], mask_iou(pred, gt), 0.0)
    return int((ious.max(1) < iou_threshold).sum())


def region_matches(pred_masks: Masks, pred_scores: Vector, pred_classes: Vector, gt_masks: Masks,
                   gt_classes: Vector, iou_threshold: float = 0.5) -> np.ndarray:
    """bool [P]: whether each predicted region is right, matched one to one as COCO does: per class, regions in
    descending score order take the not yet matched true instance of that class with the highest IoU >=
    ``iou_threshold``. A duplicate (a second region on a matched instance) is not matched."""
    if len(pred_masks) == 0:
        return np.zeros(0, dtype=bool)
    pred = _as_masks(pred_masks, "pred_masks")
    gt = _as_masks(gt_masks, "gt_masks") if len(gt_masks) else np.zeros((0, *pred.shape[1:]), bool)
    scores = _as_vector(pred_scores, "pred_scores", len(pred), np.float64)
    pred_cls = _as_vector(pred_classes, "pred_classes", len(pred), np.int64)
    gt_cls = _as_vector(gt_classes, "gt_classes", len(gt), np.int64)
    matched = np.zeros(len(pred), dtype=bool)
    if len(gt) == 0:
        return matched
    ious = mask_iou(pred, gt)
    for c in np.unique(pred_cls):
        rows = np.flatnonzero(pred_cls == c)
        rows = rows[np.argsort(-scores[rows], kind="mergesort")]
        cols = np.flatnonzero(gt_cls == c)
        if len(cols):
            matched[rows] = match_greedily(ious[np.ix_(rows, cols)], iou_threshold)
    return matched


def roc_auc(scores: npt.ArrayLike, positive: npt.ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` separating ``positive`` (bool) from the rest: the probability that
    a random positive scores above a random negative (ties count a half); nan without both kinds."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def standard_error(values: npt.ArrayLike) -> float:
    """Standard error of the mean of ``values`` (sample standard deviation / sqrt(n)); nan below two values."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan")
    return float(values.std(ddof=1) / np.sqrt(len(values)))


def covers_another(mask: npt.ArrayLike, others: Masks, fraction: float = 0.2) -> bool:
    """Whether a mask covers at least ``fraction`` of the area of any of the masks ``others`` [N, H, W]."""
    mask = np.asarray(mask, dtype=bool)
    for other in _as_masks(others, "others") if len(others) else ():
        area = int(other.sum())
        if area and int((mask & other).sum()) >= fraction * area:
            return True
    return False


def match_greedily(ious: np.ndarray, iou_threshold: float) -> np.ndarray:
    """COCO's greedy matching for one image and class: detections (rows, already in score order)
    take the unmatched true instance of highest IoU >= the threshold. Returns bool [D] matched."""
    num_dets, num_gts = ious.shape
    matched = np.zeros(num_dets, dtype=bool)
    taken = np.zeros(num_gts, dtype=bool)
    for d in range(num_dets):
        best, best_g = min(iou_threshold, 1 - 1e-10), -1
        for g in range(num_gts):
            # on ties the later instance wins, as in COCO
            if taken[g] or ious[d, g] < best:
                continue
            best, best_g = ious[d, g], g
        if best_g >= 0:
            matched[d] = True
            taken[best_g] = True
    return matched


def coco_average_precision(scores: np.ndarray, matched: np.ndarray, num_gt: int,
                           recall_points: int = 101) -> float:
    """COCO AP from all detections of one class (their scores and whether each matched a true
    instance) and the number of true instances. Returns nan when num_gt == 0."""
    if num_gt == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(matched[order]).astype(float)
    fp = np.cumsum(~matched[order]).astype(float)
    recall = tp / num_gt
    precision = tp / (tp + fp + np.spacing(1))
    # the precision envelope: the best precision at this or any higher recall
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, np.linspace(0.0, 1.0, recall_points), side="left")
    sampled = np.zeros(recall_points)
    reached = idx < len(precision)  # recall levels never reached count as precision 0
    sampled[reached] = precision[idx[reached]]
    return float(sampled.mean())


@dataclass
class _ClassRecords:
    scores: list[float] = field(default_factory=list)
    matched: list[bool] = field(default_factory=list)
    num_gt: int = 0
    best_ious: list[float] = field(default_factory=list)


class InstanceEvaluator:
    """Accumulates images of predicted and true instances; :meth:`summary` gives mIoU, found, AP50.

    iou_threshold: the IoU for a true instance to count as found, and for AP's matching (0.5).
    """

    def __init__(self, iou_threshold: float = 0.5, max_detections: int = 100) -> None:
        self.iou_threshold = iou_threshold
        self.max_detections = max_detections
        self._classes: dict[int, _ClassRecords] = {}
        self.num_images = 0

    def add(self, pred_masks: Masks, pred_scores: Vector, pred_classes: Vector, gt_masks: Masks,
            gt_classes: Vector) -> None:
        """One image: predictions (bool masks [P, H, W], scores [P], class ids [P]) and the truth
        (bool masks [G, H, W], class ids [G])."""
        gt = _as_masks(gt_masks, "gt_masks")
        pred = _as_masks(pred_masks, "pred_masks") if len(pred_masks) else np.zeros((0, *gt.shape[1:]), bool)
        if pred.shape[1:] != gt.shape[1:]:
            raise ValueError(f"predicted masks are {pred.shape[1:]}, true masks {gt.shape[1:]}: resize first")
        scores = _as_vector(pred_scores, "pred_scores", len(pred), np.float64)
        pred_cls = _as_vector(pred_classes, "pred_classes", len(pred), np.int64)
        gt_cls = _as_vector(gt_classes, "gt_classes", len(gt), np.int64)
        ious = mask_iou(pred, gt) if len(pred) and len(gt) else np.zeros((len(pred), len(gt)))
        self.num_images += 1
        for c in np.union1d(pred_cls, gt_cls).tolist():
            rec = self._classes.setdefault(c, _ClassRecords())
            p = np.flatnonzero(pred_cls == c)
            g = np.flatnonzero(gt_cls == c)
            rec.num_gt += len(g)
            class_ious = ious[np.ix_(p, g)]
            rec.best_ious.extend(class_ious.max(0).tolist() if len(p) else [0.0] * len(g))
            order = np.argsort(-scores[p], kind="mergesort")[: self.max_detections]
            rec.scores.extend(scores[p][order].tolist())
            rec.matched.extend(match_greedily(class_ious[order], self.iou_threshold).tolist())

    def summary(self) -> dict:
        """{"miou", "found", "ap50", "num_instances", "num_images", "per_class": {class: {...}}};
        the averages are nan when no true instance was added."""
        per_class: dict[int, dict[str, float]] = {}
        all_best_list: list[float] = []
        for c, rec in sorted(self._classes.items()):
            ap = coco_average_precision(np.asarray(rec.scores, float), np.asarray(rec.matched, bool), rec.num_gt)
            best = np.asarray(rec.best_ious, float)
            all_best_list.extend(rec.best_ious)
            per_class[c] = {
                "num_instances": rec.num_gt,
                "miou": float(best.mean()) if len(best) else float("nan"),
                "found": float((best >= self.iou_threshold).mean()) if len(best) else float("nan"),
                "ap50": ap,
            }
        all_best = np.asarray(all_best_list, float)
        aps = [v["ap50"] for v in per_class.values() if v["num_instances"] > 0]
        return {
            "miou": float(all_best.mean()) if len(all_best) else float("nan"),
            "found": float((all_best >= self.iou_threshold).mean()) if len(all_best) else float("nan"),
            "ap50": float(np.mean(aps)) if aps else float("nan"),
            "num_instances": int(len(all_best)),
            "num_images": self.num_images,
            "per_class": per_class,
        }
