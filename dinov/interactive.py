"""The interactive candidate rules: which of the model's candidates (six granularities per click or box) is
the object the user pointed at, and what part of it to keep.

    prompts = DrawnPrompts(positive, negative, boxes, stroke)        # in the image's pixels
    result = choose_on_logit_grid(mask_logits, ious, prompts, image_size, input_size, to_original) \
        or choose_on_full_size(mask_logits, ious, prompts, to_original)

DINOvPredictor.segment_interactive runs the model and hands its candidates here; the backend and the evaluation
reuse restrict_to_prompts and choose_candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from dinov.metrics import box_region, point_in_mask
from dinov.prompts import points_to_mask
from dinov.transforms import InputError


@dataclass(frozen=True)
class DrawnPrompts:
    """What the user drew, in the image's pixels: positive and negative clicks [N, 2] (x, y), boxes [B, 4]
    (x0, y0, x1, y1) and a stroke (bool [H, W] or None)."""

    positive: np.ndarray
    negative: np.ndarray
    boxes: np.ndarray
    stroke: np.ndarray | None

    @classmethod
    def parse(cls, points: np.ndarray | Sequence | None, point_labels: np.ndarray | Sequence | None,
              boxes: np.ndarray | Sequence | None, stroke: np.ndarray | None,
              image_size: tuple[int, int]) -> DrawnPrompts:
        """Checked prompts (InputError says what is wrong): labels > 0 are positive clicks, boxes need
        x1 > x0 and y1 > y0, a stroke is a non-empty mask of the image's size; at least one positive prompt."""
        height, width = image_size
        pts = np.zeros((0, 2)) if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 2)
        labels = np.ones(len(pts), dtype=int) if point_labels is None else \
            np.asarray(point_labels, dtype=int).reshape(-1)
        if len(labels) != len(pts):
            raise InputError(f"got {len(pts)} points but {len(labels)} point labels")
        bxs = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if stroke is not None:
            stroke = np.asarray(stroke, dtype=bool)
            if stroke.shape != (height, width) or not stroke.any():
                raise InputError(f"stroke must be a non-empty bool mask of shape {(height, width)}, got {stroke.shape}")
        positive, negative = pts[labels > 0], pts[labels <= 0]
        if len(positive) == 0 and len(bxs) == 0 and stroke is None:
            raise InputError("interactive segmentation needs a positive point, a box or a stroke")
        for x0, y0, x1, y1 in bxs:
            if not (x1 > x0 and y1 > y0):
                raise InputError(f"box must have x1 > x0 and y1 > y0, got {(x0, y0, x1, y1)}")
        return cls(positive, negative, bxs, stroke)

    def as_mask(self, image_size: tuple[int, int]) -> np.ndarray:
        """The drawn prompt as one mask (clicks as small discs, boxes filled, the stroke): what the content query
        is given, so that its match scores are meaningful."""
        height, width = image_size
        mask = np.zeros((height, width), bool)
        if len(self.positive):
            mask |= points_to_mask(self.positive, (height, width), radius=max(3.0, 0.01 * min(height, width)))
        for x0, y0, x1, y1 in self.boxes:
            mask[max(0, int(y0)) : int(np.ceil(y1)), max(0, int(x0)) : int(np.ceil(x1))] = True
        if self.stroke is not None:
            mask |= self.stroke
        return mask


@dataclass
class Candidate:
    mask: np.ndarray  # bool [H, W]
    predicted_iou: float
    granularity: int  # 0..5, which of the six granularity tokens produced it
    query_index: int  # which position query (point or box) it came from
    kept_fraction: float = 1.0  # the share of the model's mask that stayed on the prompted object(s)


@dataclass
class InteractiveResult:
    best: Candidate | None
    candidates: list[Candidate] = field(default_factory=list)


def stroke_sample_points(stroke: np.ndarray, count: int) -> list[tuple[float, float]]:
    """`count` stroke pixels spread along it (in raster order, which follows a stroke well enough)."""
    ys, xs = np.nonzero(stroke)
    picks = np.linspace(0, len(xs) - 1, num=min(count, len(xs))).round().astype(int)
    return [(float(xs[i]), float(ys[i])) for i in picks]


def restrict_to_prompts(mask: np.ndarray, positive: np.ndarray, negative: np.ndarray, boxes: np.ndarray,
                        stroke: np.ndarray | None) -> np.ndarray:
    """The part of a candidate mask that is the object(s) the user pointed at.

    A box keeps only the pixels inside it (inside any box, when several are drawn). Of the connected parts
    (8-connected) of what is left, those touched by a positive click or by the stroke are kept; when none is
    touched, the part nearest to a positive click is kept (a click just beside the mask's edge); with only
    boxes, every part inside them is kept. Parts a negative click touches are dropped.
    """
    mask = np.asarray(mask, dtype=bool)
    if len(boxes):
        inside = np.zeros_like(mask)
        for box in boxes:
            inside |= box_region(box, (mask.shape[0], mask.shape[1]))
        mask = mask & inside
    if not mask.any():
        return mask
    parts, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return mask
    keep = np.zeros(count + 1, dtype=bool)
    anchored = len(positive) > 0 or stroke is not None
    if not anchored:
        keep[1:] = True
    for x, y in positive:
        if point_in_mask(mask, x, y):
            keep[parts[min(max(int(round(y)), 0), mask.shape[0] - 1), min(max(int(round(x)), 0), mask.shape[1] - 1)]] = True
    if stroke is not None:
        keep[np.unique(parts[stroke & mask])] = True
    keep[0] = False
    if anchored and not keep.any() and len(positive):
        # no part under any click: the part nearest to the clicks (distance from each pixel to the nearest click)
        ys, xs = np.nonzero(mask)
        distance = np.min([(xs - x) ** 2 + (ys - y) ** 2 for x, y in positive], axis=0)
        keep[parts[ys[int(np.argmin(distance))], xs[int(np.argmin(distance))]]] = True
    for x, y in negative:
        if point_in_mask(mask, x, y):
            keep[parts[min(max(int(round(y)), 0), mask.shape[0] - 1), min(max(int(round(x)), 0), mask.shape[1] - 1)]] = False
    return keep[parts]


def choose_candidate(
    candidates: list[Candidate], positive: np.ndarray, negative: np.ndarray, stroke: np.ndarray | None
) -> Candidate | None:
    """Pick the candidate a user means: contains no negative click, covers the most positive
    clicks, overlaps the stroke most, then the highest predicted IoU, discounted by how much of
    the model's mask had to be cut off to stay on the object (a candidate that spilled onto
    other objects is a worse guess of the object's extent than one that did not)."""
    best_key, best = None, None
    for candidate in candidates:
        if not candidate.mask.any():
            continue
        if any(point_in_mask(candidate.mask, *p) for p in negative):
            continue
        covered = sum(point_in_mask(candidate.mask, *p) for p in positive)
        overlap = float((candidate.mask & stroke).sum() / stroke.sum()) if stroke is not None else 0.0
        key = (covered, round(overlap, 2), candidate.predicted_iou * candidate.kept_fraction)
        if best_key is None or key > best_key:
            best_key, best = key, candidate
    return best


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight (x0, y0, x1, y1) box of a bool mask, x1/y1 exclusive; None for an empty mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    if len(ys) == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)


def choose_on_logit_grid(mask_logits: torch.Tensor, ious: torch.Tensor, prompts: DrawnPrompts,
                     image_size: tuple[int, int], input_size: tuple[int, int],
                     to_original: Callable[[torch.Tensor], np.ndarray]) -> InteractiveResult | None:
    """mask_logits [P * 6, h, w] at stride 4, ious [P, 6]; to_original(logits) -> bool mask at the image's size.

    Choose the candidate on the stride-4 logit grid (the model's own resolution), then upsample only it.

    Each candidate's mask is its positive logits over the cells that cover the image; the prompts are mapped
    onto that grid (a click to the cell under it, boxes scaled, the stroke to the cells it touches), and the
    rule of :func:`restrict_to_prompts` and :func:`choose_candidate` runs there. The chosen candidate is then
    upsampled like before (bilinear to the input, to the original size) and restricted at full size; the
    others keep their grid masks enlarged (nearest cell) to the original size. None when no candidate
    survives on the grid (the caller then decides on full-size masks) or the chosen one vanishes at full
    size.
    """
    positive, negative, boxes, stroke = prompts.positive, prompts.negative, prompts.boxes, prompts.stroke
    height, width = image_size
    in_h, in_w = input_size
    grid_h, grid_w = -(-in_h // 4), -(-in_w // 4)
    # original pixel centre -> grid coordinates (cell i spans input pixels [4i, 4i + 4))
    fy, fx = in_h / height / 4, in_w / width / 4
    grid = (mask_logits[:, :grid_h, :grid_w] > 0).cpu().numpy()

    def to_grid(points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return np.stack([(points[:, 0] + 0.5) * fx - 0.5, (points[:, 1] + 0.5) * fy - 0.5], 1)

    grid_boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.array([fx, fy, fx, fy])
    grid_stroke = None
    if stroke is not None:
        ys, xs = np.nonzero(stroke)
        grid_stroke = np.zeros((grid_h, grid_w), bool)
        grid_stroke[np.minimum(((ys + 0.5) * fy).astype(int), grid_h - 1),
                    np.minimum(((xs + 0.5) * fx).astype(int), grid_w - 1)] = True
    grid_positive, grid_negative = to_grid(positive), to_grid(negative)
    num_tokens = ious.shape[1]
    grid_candidates = []
    for q in range(ious.shape[0]):
        for g in range(num_tokens):
            raw = grid[q * num_tokens + g]
            mask = restrict_to_prompts(raw, grid_positive, grid_negative, grid_boxes, grid_stroke)
            grid_candidates.append(Candidate(mask=mask, predicted_iou=float(ious[q, g]), granularity=g,
                                             query_index=q, kept_fraction=float(mask.sum() / max(1, raw.sum()))))
    best = choose_candidate(grid_candidates, grid_positive, grid_negative, grid_stroke)
    if best is None:
        return None
    index = next(i for i, candidate in enumerate(grid_candidates) if candidate is best)
    raw = to_original(mask_logits[best.query_index * num_tokens + best.granularity])
    mask = restrict_to_prompts(raw, positive, negative, boxes, stroke)
    if not mask.any():
        return None
    rows = np.minimum(((np.arange(height) + 0.5) * fy).astype(int), grid_h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * fx).astype(int), grid_w - 1)
    candidates = []
    for i, candidate in enumerate(grid_candidates):
        if i == index:
            candidates.append(Candidate(mask=mask, predicted_iou=best.predicted_iou, granularity=best.granularity,
                                        query_index=best.query_index,
                                        kept_fraction=float(mask.sum() / max(1, raw.sum()))))
        else:
            candidate.mask = candidate.mask[rows[:, None], cols[None, :]]
            candidates.append(candidate)
    return InteractiveResult(best=candidates[index], candidates=candidates)


def choose_on_full_size(mask_logits: torch.Tensor, ious: torch.Tensor, prompts: DrawnPrompts,
                        to_original: Callable[[torch.Tensor], np.ndarray]) -> InteractiveResult:
    """Decide on every candidate's full-size mask (when no candidate survives on the stride-4 grid)."""
    candidates = []
    for q in range(ious.shape[0]):
        for g in range(ious.shape[1]):
            raw = to_original(mask_logits[q * ious.shape[1] + g])
            mask = restrict_to_prompts(raw, prompts.positive, prompts.negative, prompts.boxes, prompts.stroke)
            candidates.append(Candidate(mask=mask, predicted_iou=float(ious[q, g]), granularity=g, query_index=q,
                                        kept_fraction=float(mask.sum() / max(1, raw.sum()))))
    best = choose_candidate(candidates, prompts.positive, prompts.negative, prompts.stroke)
    return InteractiveResult(best=best, candidates=candidates)
