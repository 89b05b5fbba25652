"""Hungarian matching of predicted queries to target instances (as in DINOv / MaskDINO).

The cost of assigning query q to target t is a weighted sum of
  class: focal-style cost of the target's class for the query's logits,
  mask:  binary cross-entropy and dice between the query's mask logits and the target mask, on points
         sampled uniformly at random (the same points for every pair),
  box:   L1 distance of the cxcywh boxes and the negative generalised IoU.
The assignment minimising the total cost is found with scipy's ``linear_sum_assignment``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from .losses import pairwise_dice_loss, pairwise_sigmoid_ce_loss, point_sample

# the cost of a pair the target forbids (its "allowed" matrix is False there)
FORBIDDEN_COST = 1e6


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """[Q, C] logits, [N] labels -> [Q, N]: the focal loss of calling each query the target's class,
    minus its focal loss of calling it not that class."""
    prob = logits.sigmoid()
    # the 1e-6 keeps the logs finite for saturated probabilities
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-6).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-6).log()
    return pos[:, labels] - neg[:, labels]


def interactive_allowed(targets_per_prompt: Sequence[int], tokens_per_prompt: int = 6) -> Tensor:
    """The "allowed" matrix for interactive queries: prompt i owns queries i * tokens .. (i + 1) * tokens - 1
    (one per granularity) and may only be matched to its own targets, which come in prompt order
    (prompt 0's targets first). Returns bool [num_prompts * tokens, total targets]."""
    counts = [int(n) for n in targets_per_prompt]
    if min(counts, default=0) < 0 or max(counts, default=0) > tokens_per_prompt:
        raise ValueError(f"each prompt needs 0..{tokens_per_prompt} targets (one query per granularity), "
                         f"got {counts}")
    allowed = torch.zeros(len(counts) * tokens_per_prompt, sum(counts), dtype=torch.bool)
    start = 0
    for i, n in enumerate(counts):
        allowed[i * tokens_per_prompt:(i + 1) * tokens_per_prompt, start:start + n] = True
        start += n
    return allowed


class HungarianMatcher(nn.Module):
    """One-to-one matching of the queries of each image to its target instances.

    Defaults are the weights of the released DINOv training config (COST_CLASS 4, COST_MASK 5,
    COST_DICE 5, COST_BOX 5, COST_GIOU 2, TRAIN_NUM_POINTS 12544).
    """

    def __init__(self, cost_class: float = 4.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 cost_box: float = 5.0, cost_giou: float = 2.0, num_points: int = 12544,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("cost_class, cost_mask and cost_dice cannot all be 0")
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.cost_box = cost_box
        self.cost_giou = cost_giou
        self.num_points = num_points
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, outputs: dict[str, Tensor], target: dict[str, Tensor], batch_index: int,
                    costs: Sequence[str] = ("cls", "box", "mask"),
                    point_coords: Tensor | None = None) -> Tensor:
        """The [Q, N] cost of every (query, target) pair of one image.

        point_coords: [P, 2] normalised (x, y) points for the mask costs; drawn uniformly when None.
        """
        unknown = set(costs) - {"cls", "box", "mask"}
        if unknown:
            raise ValueError(f"unknown costs {sorted(unknown)}; use any of 'cls', 'box', 'mask'")
        b = batch_index
        num_queries = _num_queries(outputs)
        num_targets = _num_targets(target)
        ref = next(v for k, v in outputs.items() if k.startswith("pred_") and isinstance(v, Tensor))
        cost = torch.zeros(num_queries, num_targets, device=ref.device, dtype=torch.float32)

        if "cls" in costs and self.cost_class != 0:
            logits = outputs["pred_logits"][b].float()
            labels = target["labels"].long()
            if num_targets and labels.max() >= logits.shape[-1]:
                raise ValueError(f"target label {int(labels.max())} >= number of classes {logits.shape[-1]}")
            cost += self.cost_class * focal_class_cost(logits, labels, self.focal_alpha, self.focal_gamma)

        if "box" in costs and (self.cost_box != 0 or self.cost_giou != 0):
            out_boxes = outputs["pred_boxes"][b].float()
            tgt_boxes = target["boxes"].to(out_boxes)
            cost += self.cost_box * torch.cdist(out_boxes, tgt_boxes, p=1)
            giou = generalized_box_iou(box_convert(out_boxes, "cxcywh", "xyxy"),
                                       box_convert(tgt_boxes, "cxcywh", "xyxy"))
            cost -= self.cost_giou * giou

        if "mask" in costs and (self.cost_mask != 0 or self.cost_dice != 0):
            out_masks = outputs["pred_masks"][b].float()
            tgt_masks = target["masks"].to(out_masks)
            if point_coords is None:
                point_coords = torch.rand(self.num_points, 2, device=out_masks.device)
            coords = point_coords.to(out_masks)[None]
            # every mask is sampled at the same points, so all pairs compare like with like
            out_points = point_sample(out_masks[:, None], coords.expand(len(out_masks), -1, -1))[:, 0]
            tgt_points = point_sample(tgt_masks[:, None], coords.expand(len(tgt_masks), -1, -1))[:, 0]
            cost += self.cost_mask * pairwise_sigmoid_ce_loss(out_points, tgt_points)
            cost += self.cost_dice * pairwise_dice_loss(out_points, tgt_points)

        allowed = target.get("allowed")
        if allowed is not None:
            if allowed.shape != (num_queries, num_targets):
                raise ValueError(f"target 'allowed' must be bool [{num_queries}, {num_targets}], "
                                 f"got {tuple(allowed.shape)}")
            cost = torch.where(allowed.to(cost.device, torch.bool), cost, torch.full_like(cost, FORBIDDEN_COST))
        return cost

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]],
                costs: Sequence[str] = ("cls", "box", "mask"),
                generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        outputs: "pred_logits" [B, Q, C] (for the class cost), "pred_masks" [B, Q, h, w] mask logits,
          "pred_boxes" [B, Q, 4] normalised cxcywh.
        targets: one dict per image with "labels" [N] int, "masks" [N, H, W] (covering the same image
          extent as pred_masks, any resolution), "boxes" [N, 4] normalised cxcywh, and optionally
          "allowed" bool [Q, N]: the pairs that may be matched (others cost 1e6).
        costs: which terms to use ("cls", "box", "mask").
        generator: the random source of the mask-cost points (None: torch's global one).

        Returns one (query indices, target indices) pair of int64 tensors per image, sorted by query,
        each of length min(Q, N).
        """
        if len(targets) != _batch_size(outputs):
            raise ValueError(f"got {len(targets)} targets for a batch of {_batch_size(outputs)} images")
        indices = []
        for b, target in enumerate(targets):
            if _num_targets(target) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            points = None
            if "mask" in costs and (self.cost_mask != 0 or self.cost_dice != 0):
                device = outputs["pred_masks"].device
                points = torch.rand(self.num_points, 2, device=device, generator=generator)
            cost = self.cost_matrix(outputs, target, b, costs, points).cpu()
            # a NaN (e.g. from a degenerate box) would make the solver fail: treat it as forbidden
            cost = torch.nan_to_num(cost, nan=FORBIDDEN_COST, posinf=FORBIDDEN_COST, neginf=-FORBIDDEN_COST)
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
                f"cost_box={self.cost_box}, cost_giou={self.cost_giou}, num_points={self.num_points}")


def _batch_size(outputs: dict[str, Tensor]) -> int:
    for key in ("pred_masks", "pred_boxes", "pred_logits"):
        if key in outputs:
            return outputs[key].shape[0]
    raise ValueError("outputs need at least one of 'pred_masks', 'pred_boxes', 'pred_logits'")


def _num_queries(outputs: dict[str, Tensor]) -> int:
    for key in ("pred_masks", "pred_boxes", "pred_logits"):
        if key in outputs:
            return outputs[key].shape[1]
    raise ValueError("outputs need at least one of 'pred_masks', 'pred_boxes', 'pred_logits'")


def _num_targets(target: dict[str, Tensor]) -> int:
    for key in ("labels", "masks", "boxes"):
        if key in target:
            return len(target[key])
    raise ValueError("a target needs at least one of 'labels', 'masks', 'boxes'")
