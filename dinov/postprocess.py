"""The official DINOv post-processing filters, as plain functions on one image's decoder outputs.

* :func:`filter_referring` picks, for each visual prompt, the best of the referring proposals (position boxes x
  granularities): predicted IoU > 0.5, box NMS at 0.7, masks of more than 50 pixels at stride 4, then the
  highest softmax of the prompt's match score over the survivors.
* :func:`filter_generic` keeps the generic proposals whose best class probability exceeds 0.12 (lowered in
  steps of 0.04 until at least one survives).
* :func:`dinov.mask_upsampling.upsample_masks` brings stride-4 mask logits to the image: bilinear to the padded
  size, then cropped.

The predictor's generic path does the same work only where it can change the result: :func:`select_generic`
picks the instances that can be returned (threshold, best first, at most ``max_instances``) before any mask is
computed, and :class:`dinov.mask_upsampling.MaskResizer` turns one stride-4 mask into its bool mask at the original image size, upsampling
only the window around the mask's positive cells (everything outside it is provably background).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms

from .modeling.box_ops import box_cxcywh_to_xyxy


@dataclass
class ReferringSelection:
    """Result of :func:`filter_referring` for N prompts.

    index: [N] the chosen proposal of each prompt (index into the P*K proposals, position-major);
    mask_logits: [N, h, w] its stride-4 mask logits; scores: [N] its softmax probability among the survivors;
    kept_index: [M] the proposals that survived the IoU, NMS and size filters (in NMS order).
    When no proposal survives, every tensor has length 0.
    """

    index: Tensor
    mask_logits: Tensor
    scores: Tensor
    kept_index: Tensor


@dataclass
class GenericSelection:
    """Result of :func:`filter_generic`: index [M] of the kept object queries, scores [M] (best class probability),
    labels [M] (that class), mask_logits [M, h, w] (stride 4), threshold: the score threshold finally used."""

    index: Tensor
    scores: Tensor
    labels: Tensor
    mask_logits: Tensor
    threshold: float


def filter_referring(
    pred_boxes: Tensor,
    pred_ious: Tensor,
    pred_match_score: Tensor,
    pred_masks: Tensor | None = None,
    mask_embed: Tensor | None = None,
    mask_features: Tensor | None = None,
    levels: Sequence[int] | None = None,
    iou_threshold: float = 0.5,
    nms_threshold: float = 0.7,
    min_mask_pixels: int = 50,
    shape_logits: Callable[[Tensor], Tensor] | None = None,
) -> ReferringSelection:
    """Select one referring proposal per prompt (one image: drop the batch dim of ``decode_referring``'s outputs).

    pred_boxes [P*K, 4] cxcywh; pred_ious [P, K]; pred_match_score [N, P*K];
    masks either pred_masks [P*K, h, w], or mask_embed [P*K, C] with mask_features [C, h, w] (then only the
    masks of proposals that pass NMS are computed; same result, much less work).
    levels: granularities to consider (default all K), as the official ``level`` argument.
    shape_logits: the shape extension: from the surviving proposals' mask logits [M, h, w], the [N, M] term
        added to their match scores (the prompts' shapes against each proposal's mask); None: content alone,
        as the official code.
    """
    if pred_ious.dim() != 2:
        raise ValueError(f"pred_ious must be [P, K], got {tuple(pred_ious.shape)}")
    num_points, num_levels = pred_ious.shape
    num_proposals = num_points * num_levels
    if pred_boxes.shape != (num_proposals, 4):
        raise ValueError(f"pred_boxes must be [{num_proposals}, 4], got {tuple(pred_boxes.shape)}")
    if pred_match_score.dim() != 2 or pred_match_score.shape[1] != num_proposals:
        raise ValueError(f"pred_match_score must be [N, {num_proposals}], got {tuple(pred_match_score.shape)}")
    if pred_masks is None and (mask_embed is None or mask_features is None):
        raise ValueError("give pred_masks, or mask_embed together with mask_features")
    if pred_masks is not None and pred_masks.shape[0] != num_proposals:
        raise ValueError(f"pred_masks must be [{num_proposals}, h, w], got {tuple(pred_masks.shape)}")
    if pred_masks is None and mask_embed is not None and mask_features is not None and (
            mask_embed.shape[0] != num_proposals or mask_features.dim() != 3):
        raise ValueError(f"mask_embed must be [{num_proposals}, C] and mask_features [C, h, w], got "
                         f"{tuple(mask_embed.shape)} and {tuple(mask_features.shape)}")

    device = pred_boxes.device
    # proposal ids in the official order: position-major, then the selected levels
    level_index = torch.arange(num_levels, device=device) if levels is None else \
        torch.as_tensor(list(levels), dtype=torch.long, device=device)
    ids = (torch.arange(num_points, device=device)[:, None] * num_levels + level_index[None]).flatten()
    ious = pred_ious[:, level_index].flatten()

    keep = ious > iou_threshold
    ids, ious = ids[keep], ious[keep]
    order = nms(box_cxcywh_to_xyxy(pred_boxes[ids]), ious, nms_threshold)
    ids = ids[order]

    if pred_masks is not None:
        masks = pred_masks[ids]
    else:
        assert mask_embed is not None and mask_features is not None  # checked above
        masks = torch.einsum("qc,chw->qhw", mask_embed[ids], mask_features)
    big = (masks > 0).flatten(1).sum(-1) > min_mask_pixels
    ids, masks = ids[big], masks[big]

    if ids.numel() == 0:
        empty = pred_boxes.new_zeros((0,))
        return ReferringSelection(index=ids.new_zeros((0,)), mask_logits=masks, scores=empty, kept_index=ids)
    match = pred_match_score[:, ids]
    if shape_logits is not None:
        match = match + shape_logits(masks).to(match)
    probs = F.softmax(match, dim=-1)
    scores, best = probs.topk(1, dim=-1)
    scores, best = scores[:, 0], best[:, 0]
    return ReferringSelection(index=ids[best], mask_logits=masks[best], scores=scores, kept_index=ids)


def filter_generic(pred_logits: Tensor, pred_masks: Tensor | None = None, threshold: float = 0.12,
                   step: float = 0.04, mask_embed: Tensor | None = None, mask_features: Tensor | None = None
                   ) -> GenericSelection:
    """Keep the object queries whose best class probability (sigmoid of the logit) exceeds ``threshold``,
    lowering it by ``step`` until at least one survives.

    pred_logits [Q, C]; masks either pred_masks [Q, h, w], or mask_embed [Q, C'] with mask_features [C', h, w]
    (then only the kept queries' masks are computed).
    """
    if pred_logits.dim() != 2 or pred_logits.shape[0] == 0 or pred_logits.shape[1] == 0:
        raise ValueError(f"pred_logits must be [Q>=1, C>=1], got {tuple(pred_logits.shape)}")
    num_queries = pred_logits.shape[0]
    if pred_masks is None and (mask_embed is None or mask_features is None):
        raise ValueError("give pred_masks, or mask_embed together with mask_features")
    if pred_masks is not None and pred_masks.shape[0] != num_queries:
        raise ValueError(f"pred_masks must have {num_queries} masks, got {tuple(pred_masks.shape)}")
    if pred_masks is None and mask_embed is not None and mask_features is not None and (
            mask_embed.shape[0] != num_queries or mask_features.dim() != 3):
        raise ValueError(f"mask_embed must be [{num_queries}, C] and mask_features [C, h, w], got "
                         f"{tuple(mask_embed.shape)} and {tuple(mask_features.shape)}")
    scores, labels = pred_logits.sigmoid().max(-1)
    threshold = official_threshold(scores, threshold, step)
    index = torch.nonzero(scores > threshold).flatten()
    if pred_masks is not None:
        masks = pred_masks[index]
    else:
        assert mask_embed is not None and mask_features is not None  # checked above
        masks = torch.einsum("qc,chw->qhw", mask_embed[index], mask_features)
    return GenericSelection(index=index, scores=scores[index], labels=labels[index], mask_logits=masks,
                            threshold=threshold)


def official_threshold(scores: Tensor, threshold: float = 0.12, step: float = 0.04) -> float:
    """The official demo's score threshold: ``threshold``, lowered by ``step`` until some score exceeds it."""
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    if scores.numel() == 0:
        raise ValueError("no scores to threshold")
    while not bool((scores > threshold).any()):
        threshold = threshold - step
    return threshold


@dataclass
class GenericPick:
    """The generic instances that can be returned, best first: index [M] of the object queries, their scores [M]
    (best class probability) and labels [M] (that class)."""

    index: Tensor
    scores: Tensor
    labels: Tensor


# What a generic region's score can be:
#   class_probability  the official score: the sigmoid of the query's similarity to its best class;
#   quality_x_margin   the mask's quality (mean probability inside it) times the margin of the best class's
#                      probability over the second best: low for a vague mask and for a region whose label is a
#                      toss-up between two classes (same colour, other shape). Chosen on calibration scenes
#                      (BENCHMARKS.md "The demo model"); it needs every query's mask before the threshold.
# The thresholds a calibration or a fine-tuning chooses among (dinov.eval.calibrate, dinov.train.finetune).
SCORE_THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)
# Per score form (SCORE_FORMS below): a quality x margin score runs lower than a class probability.
FORM_THRESHOLDS = {"class_probability": SCORE_THRESHOLD_GRID,
                   "quality_x_margin": np.round(np.arange(0.01, 0.951, 0.01), 2)}
SCORE_FORMS = ("class_probability", "quality_x_margin")


def region_scores(pred_logits: Tensor, mask_logits: Tensor | None, form: str) -> tuple[Tensor, Tensor]:
    """(scores [Q], labels [Q]) of generic object queries: pred_logits [Q, C], mask_logits [Q, h, w] (only needed
    by the forms other than class_probability)."""
    if form not in SCORE_FORMS:
        raise ValueError(f"unknown score form {form!r}; use one of {', '.join(SCORE_FORMS)}")
    probs = pred_logits.sigmoid()
    best, labels = probs.max(-1)
    if form == "class_probability":
        return best, labels
    if mask_logits is None or len(mask_logits) != len(probs):
        raise ValueError(f"score form {form} needs the mask logits of every query")
    second = probs.topk(2, dim=-1).values[:, 1] if probs.shape[-1] > 1 else torch.zeros_like(best)
    return mask_quality(mask_logits) * (best - second), labels


def select_generic(pred_logits: Tensor, score_threshold: float | None, max_instances: int,
                   default_threshold: float = 0.12, scores: Tensor | None = None) -> GenericPick:
    """Which object queries can become instances, before any mask is computed.

    ``score_threshold=None`` is the official rule with the checkpoint's ``default_threshold``
    (:func:`official_threshold`: scores strictly above it, lowered until one survives); a number
    keeps scores at or above it. Of those, the ``max_instances`` best, best first (the order the predictor always
    used: a descending argsort over the kept queries in query order). ``scores`` [Q]: region scores of another
    form (:func:`region_scores`) instead of the class probability; the labels are the best classes either way.
    """
    if pred_logits.dim() != 2 or pred_logits.shape[0] == 0 or pred_logits.shape[1] == 0:
        raise ValueError(f"pred_logits must be [Q>=1, C>=1], got {tuple(pred_logits.shape)}")
    probs, labels = pred_logits.sigmoid().max(-1)
    scores = probs if scores is None else scores
    if score_threshold is None:
        keep = scores > official_threshold(scores, default_threshold)
    else:
        keep = scores >= score_threshold
    index = torch.nonzero(keep).flatten()
    order = torch.argsort(scores[index], descending=True)[:max_instances]
    index = index[order]
    return GenericPick(index=index, scores=scores[index], labels=labels[index])


# Generic regions overlapping a better one by more than this IoU are duplicates (one region per object).
DEFAULT_NMS_IOU = 0.5


def mask_nms(mask_logits: Tensor, iou_threshold: float = DEFAULT_NMS_IOU) -> Tensor:
    """Class-agnostic mask NMS: of masks [M, h, w] (logits, > 0 inside) ordered best first, the positions [K]
    (ascending) of those whose IoU with every better mask kept is at most ``iou_threshold``. An empty mask
    overlaps nothing and is kept (the caller drops empty masks)."""
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must be [M, h, w], got {tuple(mask_logits.shape)}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    binary = (mask_logits > 0).flatten(1).float()
    area = binary.sum(1)
    inter = binary @ binary.T
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1.0)
    kept: list[int] = []
    for i in range(len(binary)):
        if all(float(iou[i, j]) <= iou_threshold for j in kept):
            kept.append(i)
    return torch.tensor(kept, dtype=torch.long, device=mask_logits.device)


def prediction_score(region_scores: Sequence[float] | np.ndarray, candidate_score_sum: float | None) -> float:
    """One image's prediction score from the scores of the regions returned: with ``candidate_score_sum`` (the
    summed scores of every candidate region, one per object after mask NMS, whatever the threshold) the share of
    the candidates' score mass that was returned, which falls when likely objects are left out or uncertain (it
    ranks images by their quality; BENCHMARKS.md); without it the mean region score (0 with no region)."""
    scores = [float(x) for x in region_scores]
    if candidate_score_sum is not None and candidate_score_sum > 0:
        return min(1.0, sum(scores) / candidate_score_sum)
    return float(np.mean(scores)) if scores else 0.0


def mask_quality(mask_logits: Tensor) -> Tensor:
    """[M]: each mask's mean probability over its positive cells (Mask2Former's mask score; 0 for an empty one)."""
    inside = (mask_logits > 0).flatten(1).float()
    probs = mask_logits.flatten(1).sigmoid()
    return (probs * inside).sum(1) / inside.sum(1).clamp(min=1.0)


def mask_logits_of(mask_embed: Tensor, mask_features: Tensor, index: Tensor) -> Tensor:
    """Stride-4 mask logits [M, h, w] of the chosen queries only: mask_embed [Q, C], mask_features [C, h, w]."""
    return torch.einsum("qc,chw->qhw", mask_embed[index], mask_features)
