"""The official DINOv post-processing filters, as plain functions on one image's decoder outputs.

* :func:`filter_referring` picks, for each visual prompt, the best of the referring proposals (position boxes x
  granularities): predicted IoU > 0.5, box NMS at 0.7, masks of more than 50 pixels at stride 4, then the
  highest softmax of the prompt's match score over the survivors.
* :func:`filter_generic` keeps the generic proposals whose best class probability exceeds 0.12 (lowered in
  steps of 0.04 until at least one survives).
* :func:`upsample_masks` brings stride-4 mask logits to the image: bilinear to the padded size, then cropped.
"""

from __future__ import annotations
from dataclasses import dataclass
from typing import Sequence

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
) -> ReferringSelection:
    """Select one referring proposal per prompt (one image: drop the batch dim of ``decode_referring``'s outputs).

    pred_boxes [P*K, 4] cxcywh; pred_ious [P, K]; pred_match_score [N, P*K];
    masks either pred_masks [P*K, h, w], or mask_embed [P*K, C] with mask_features [C, h, w] (then only the
    masks of proposals that pass NMS are computed; same result, much less work).
    levels: granularities to consider (default all K), as the official ``level`` argument.
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
    if pred_masks is None and (mask_embed.shape[0] != num_proposals or mask_features.dim() != 3):
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
        masks = torch.einsum("qc,chw->qhw", mask_embed[ids], mask_features)
    big = (masks > 0).flatten(1).sum(-1) > min_mask_pixels
    ids, masks = ids[big], masks[big]

    num_prompts = pred_match_score.shape[0]
    if ids.numel() == 0:
        empty = pred_boxes.new_zeros((0,))
        return ReferringSelection(index=ids.new_zeros((0,)), mask_logits=masks, scores=empty, kept_index=ids)
    probs = F.softmax(pred_match_score[:, ids], dim=-1)
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
    if pred_masks is None and (mask_embed.shape[0] != num_queries or mask_features.dim() != 3):
        raise ValueError(f"mask_embed must be [{num_queries}, C] and mask_features [C, h, w], got "
                         f"{tuple(mask_embed.shape)} and {tuple(mask_features.shape)}")
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    scores, labels = pred_logits.sigmoid().max(-1)
    keep = scores > threshold
    while not bool(keep.any()):
        threshold = threshold - step
        keep = scores > threshold
    index = torch.nonzero(keep).flatten()
    if pred_masks is not None:
        masks = pred_masks[index]
    else:
        masks = torch.einsum("qc,chw->qhw", mask_embed[index], mask_features)
    return GenericSelection(index=index, scores=scores[index], labels=labels[index], mask_logits=masks,
                            threshold=threshold)


def upsample_masks(mask_logits: Tensor, padded_size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """Stride-4 mask logits [M, h, w] -> [M, H, W] at the image size: bilinear to the padded size, then cropped
    to the top-left image area (the padding is at the bottom/right). A mask is logit > 0."""
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must be [M, h, w], got {tuple(mask_logits.shape)}")
    height, width = image_size
    if height > padded_size[0] or width > padded_size[1]:
        raise ValueError(f"image_size {tuple(image_size)} is larger than padded_size {tuple(padded_size)}")
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros((0, height, width))
    up = F.interpolate(mask_logits[None], size=tuple(padded_size), mode="bilinear", align_corners=False)[0]
    return up[:, :height, :width]
