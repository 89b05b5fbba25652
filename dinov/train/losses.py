"""DINOv training losses (as the official criteria compute them) and the set criterion that combines them.

Loss terms, each normalised by the number of target instances in the batch:
  loss_mask_cls     sigmoid focal loss of the class logits of all queries (matched ones -> their
                    target's class, the rest -> no class);
  loss_mask_bce     binary cross-entropy of the matched masks, on points sampled by uncertainty;
  loss_mask_dice    dice loss of the matched masks, on the same points;
  loss_bbox         L1 distance of the matched normalised cxcywh boxes;
  loss_giou         1 - generalised IoU of the matched boxes;
  iou_score_loss    squared error of the predicted IoU against the (soft, point-sampled) dice score
                    of the mask it goes with (interactive queries);
  loss_match_score  cross-entropy of the content queries' match scores over the interactive
                    predictions kept by NMS (referring from an example).
Names end in "_{layer}" (0: the final decoder layer, i: auxiliary output i-1), "_interm" for the
encoder's proposals, and "_dn" for the denoising queries, as in the official code, so logs compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, nms

# Loss weights of the released training config (configs/dinov_sam_coco_train.yaml).
DEFAULT_WEIGHTS: dict[str, float] = {
    "loss_mask_cls": 4.0,
    "loss_mask_bce": 5.0,
    "loss_mask_dice": 5.0,
    "loss_bbox": 5.0,
    "loss_giou": 2.0,
    "iou_score_loss": 1.0,
    "loss_match_score": 2.0,
}


# ---------------------------------------------------------------------------------------------
# point sampling


def point_sample(features: Tensor, coords: Tensor, align_corners: bool = False) -> Tensor:
    """Bilinear samples of features [N, C, H, W] at points [N, P, 2] given as normalised (x, y) in
    [0, 1] over the whole map -> [N, C, P]."""
    grid = 2.0 * coords[:, :, None, :] - 1.0
    return F.grid_sample(features, grid.to(features.dtype), align_corners=align_corners)[:, :, :, 0]


def uncertain_point_coords(mask_logits: Tensor, num_points: int, oversample_ratio: float = 3.0,
                           importance_sample_ratio: float = 0.75,
                           generator: torch.Generator | None = None) -> Tensor:
    """Points [R, num_points, 2] for masks [R, 1, H, W]: of num_points * oversample_ratio uniform
    points, the importance_sample_ratio * num_points with logits closest to 0 (the most uncertain),
    then uniform points for the rest."""
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError("need oversample_ratio >= 1 and 0 <= importance_sample_ratio <= 1")
    num_masks = mask_logits.shape[0]
    device = mask_logits.device
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(num_masks, num_sampled, 2, device=device, generator=generator)
    uncertainty = -point_sample(mask_logits, coords)[:, 0].abs()
    num_uncertain = int(importance_sample_ratio * num_points)
    top = uncertainty.topk(num_uncertain, dim=1).indices
    coords_uncertain = coords.gather(1, top[:, :, None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random == 0:
        return coords_uncertain
    coords_random = torch.rand(num_masks, num_random, 2, device=device, generator=generator)
    return torch.cat([coords_uncertain, coords_random], dim=1)


# ---------------------------------------------------------------------------------------------
# loss functions


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (RetinaNet) of logits against 0/1 targets of the same shape."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def sigmoid_ce_loss(point_logits: Tensor, point_labels: Tensor, num_masks: float) -> Tensor:
    """Mean binary cross-entropy over the points of each mask [N, P], summed over masks / num_masks."""
    loss = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(point_logits: Tensor, point_labels: Tensor) -> Tensor:
    """Per-mask soft dice loss [N] of logits [N, P] against labels [N, P] (+1 smoothing)."""
    prob = point_logits.sigmoid().flatten(1)
    numerator = 2 * (prob * point_labels).sum(-1)
    denominator = prob.sum(-1) + point_labels.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def pairwise_sigmoid_ce_loss(point_logits: Tensor, point_labels: Tensor) -> Tensor:
    """[Q, P] logits, [N, P] labels -> [Q, N]: the mean point BCE of every pair."""
    pos = F.binary_cross_entropy_with_logits(point_logits, torch.ones_like(point_logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(point_logits, torch.zeros_like(point_logits), reduction="none")
    loss = pos @ point_labels.T + neg @ (1 - point_labels).T
    return loss / point_logits.shape[1]


def pairwise_dice_loss(point_logits: Tensor, point_labels: Tensor) -> Tensor:
    """[Q, P] logits, [N, P] labels -> [Q, N]: the soft dice loss of every pair."""
    prob = point_logits.sigmoid().flatten(1)
    numerator = 2 * prob @ point_labels.T
    denominator = prob.sum(-1)[:, None] + point_labels.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def box_losses(src_boxes: Tensor, tgt_boxes: Tensor, num_boxes: float) -> tuple[Tensor, Tensor]:
    """(L1, 1 - GIoU) of matched normalised cxcywh boxes [M, 4], summed / num_boxes."""
    l1 = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
    giou = torch.diag(generalized_box_iou(box_convert(src_boxes, "cxcywh", "xyxy"),
                                          box_convert(tgt_boxes, "cxcywh", "xyxy")))
    return l1, (1 - giou).sum() / num_boxes


def iou_score_loss(pred_ious: Tensor, target_ious: Tensor) -> Tensor:
    """Element-wise squared error of predicted against target IoUs."""
    return F.mse_loss(pred_ious, target_ious, reduction="none")


# ---------------------------------------------------------------------------------------------
# the criterion


@dataclass
class Denoising:
    """The outputs of the denoising queries and their layout (``num_groups`` noised copies of the
    targets, each group ``group_size`` queries long; in group g, query g * group_size + i denoises
    target i of the image)."""

    outputs: dict
    num_groups: int
    group_size: int


def _pad_masks(masks: Sequence[Tensor], height: int, width: int) -> Tensor:
    """Concatenate masks [N_i, H_i, W_i] of several images zero-padded (bottom, right) to height x width."""
    # concatenated in their own dtype (bool targets: a quarter of the bytes) and converted once
    return torch.cat([m if m.shape[-2:] == (height, width) else
                      F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in masks]).float()


def loss_base_name(name: str) -> str:
    """"loss_giou_3_dn" -> "loss_giou": the name without its layer and denoising suffixes."""
    if name.endswith("_dn"):
        name = name[: -len("_dn")]
    return name.rsplit("_", 1)[0]


class SetCriterion(nn.Module):
    """Matches the queries to the targets and computes the losses, for every decoder layer.

    matcher: a :class:`~dinov.train.matcher.HungarianMatcher` (or anything with its call signature).
    losses: which groups to compute: "labels" (focal class loss), "masks" (BCE + dice, plus the IoU
      loss when ``iou_loss``), "boxes" (L1 + GIoU), "match_score" (referring from an example).
    match_costs: the matcher cost terms ("cls", "box", "mask"); drop "cls" for class-agnostic queries.
    rematch_aux: match every auxiliary layer anew (generic queries) or reuse the final layer's
      matching (interactive queries, as the official referring criterion does).
    weights: loss weight per base name (see DEFAULT_WEIGHTS); used by :meth:`total_loss`.
    nms_threshold: box IoU above which interactive predictions are suppressed before the match-score
      loss (NMS_THRESHOLD of the released config).
    """

    def __init__(self, matcher: nn.Module, losses: Sequence[str] = ("labels", "masks", "boxes"),
                 weights: dict[str, float] | None = None, num_points: int = 12544,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, iou_loss: bool = False,
                 match_costs: Sequence[str] = ("cls", "box", "mask"), rematch_aux: bool = True,
                 dn_losses: Sequence[str] = ("masks", "boxes"), nms_threshold: float = 0.7) -> None:
        super().__init__()
        unknown = set(losses) - {"labels", "masks", "boxes", "match_score"}
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; use 'labels', 'masks', 'boxes', 'match_score'")
        self.matcher = matcher
        self.losses = tuple(losses)
        self.weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.iou_loss = iou_loss
        self.match_costs = tuple(match_costs)
        self.rematch_aux = rematch_aux
        self.dn_losses = tuple(dn_losses)
        self.nms_threshold = nms_threshold
        self.generator: torch.Generator | None = None  # set for reproducible point sampling

    # -- individual loss groups; each returns {base name: value} ---------------------------------

    def loss_labels(self, outputs: dict, targets: Sequence[dict], indices: list[tuple[Tensor, Tensor]],
                    num_masks: float) -> dict[str, Tensor]:
        logits = outputs["pred_logits"].float()
        onehot = torch.zeros_like(logits)
        batch_idx, src_idx = _src_permutation(indices, logits.device)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device).long()
        if len(labels) and labels.max() >= logits.shape[-1]:
            raise ValueError(f"target label {int(labels.max())} >= number of classes {logits.shape[-1]}")
        onehot[batch_idx, src_idx, labels] = 1
        # unmatched queries are pushed towards "no class" (all zeros); normalised by targets, not queries
        loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma).sum() / num_masks
        return {"loss_mask_cls": loss}

    def loss_masks(self, outputs: dict, targets: Sequence[dict], indices: list[tuple[Tensor, Tensor]],
                   num_masks: float, with_iou: bool | None = None) -> dict[str, Tensor]:
        with_iou = self.iou_loss if with_iou is None else with_iou
        pred_masks = outputs["pred_masks"]
        # a target may mark instances known by their box only ("has_mask" False): no mask loss for them
        keep = [t["has_mask"].cpu()[tgt.cpu()] if "has_mask" in t else None for t, (_, tgt) in zip(targets, indices)]
        indices = [(src, tgt) if k is None else (src[k.to(src.device)], tgt[k.to(tgt.device)])
                   for k, (src, tgt) in zip(keep, indices)]
        batch_idx, src_idx = _src_permutation(indices, pred_masks.device)
        if len(src_idx) == 0:
            zero = pred_masks.sum() * 0.0
            out = {"loss_mask_bce": zero, "loss_mask_dice": zero}
            if with_iou:
                out["iou_score_loss"] = outputs["pred_ious"].sum() * 0.0
            return out
        src_masks = pred_masks[batch_idx, src_idx][:, None]
        # like the official batching, every image's masks are padded to the largest image of the batch,
        # so that normalised point coordinates mean the same place in all of them
        height = max(t["masks"].shape[-2] for t in targets)
        width = max(t["masks"].shape[-1] for t in targets)
        tgt_masks = _pad_masks([t["masks"][j] for t, (_, j) in zip(targets, indices)], height, width)
        tgt_masks = tgt_masks.to(device=src_masks.device, dtype=torch.float32)[:, None]
        with torch.no_grad():
            coords = uncertain_point_coords(src_masks.detach().float(), self.num_points, self.oversample_ratio,
                                            self.importance_sample_ratio, self.generator)
            point_labels = point_sample(tgt_masks, coords)[:, 0]
        point_logits = point_sample(src_masks.float(), coords)[:, 0]
        dice = dice_loss(point_logits, point_labels)
        out = {
            "loss_mask_bce": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_mask_dice": dice.sum() / num_masks,
        }
        if with_iou:
            pred_ious = outputs["pred_ious"].flatten(1)[batch_idx, src_idx]
            # The target is the soft dice score of the same points; like the official criterion we do
            # not detach it, so this term also pulls the mask towards the IoU the head predicts.
            out["iou_score_loss"] = iou_score_loss(pred_ious.float(), 1 - dice).sum() / num_masks
        return out

    def loss_boxes(self, outputs: dict, targets: Sequence[dict], indices: list[tuple[Tensor, Tensor]],
                   num_masks: float) -> dict[str, Tensor]:
        pred_boxes = outputs["pred_boxes"]
        batch_idx, src_idx = _src_permutation(indices, pred_boxes.device)
        if len(src_idx) == 0:
            zero = pred_boxes.sum() * 0.0
            return {"loss_bbox": zero, "loss_giou": zero}
        src_boxes = pred_boxes[batch_idx, src_idx].float()
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src_boxes)
        l1, giou = box_losses(src_boxes, tgt_boxes, num_masks)
        return {"loss_bbox": l1, "loss_giou": giou}

    def loss_match_score(self, outputs: dict, targets: Sequence[dict], indices: list[tuple[Tensor, Tensor]],
                         num_masks: float) -> dict[str, Tensor]:
        """Each content query (an example's embedding) must score highest the interactive prediction
        that best matches its instance ("content_masks" of the target), among the predictions kept
        by NMS on the predicted IoUs."""
        scores = outputs["pred_match_score"]  # [B, num_content, Q]
        logits, labels = [], []
        for b, target in enumerate(targets):
            content_masks = target.get("content_masks")
            if content_masks is None or len(content_masks) == 0:
                continue
            boxes = box_convert(outputs["pred_boxes"][b].detach().float(), "cxcywh", "xyxy")
            ious = outputs["pred_ious"][b].detach().flatten().float()
            keep = nms(boxes, ious, self.nms_threshold)
            kept = {"pred_masks": outputs["pred_masks"][b:b + 1, keep].detach(),
                    "pred_boxes": outputs["pred_boxes"][b:b + 1, keep].detach()}
            (pred_idx, content_idx), = self.matcher(kept, [{"masks": content_masks}], costs=("mask",),
                                                   generator=self.generator)
            logits.append(scores[b][content_idx.to(scores.device)][:, keep])
            labels.append(pred_idx.to(scores.device))
        if not logits:
            return {"loss_match_score": scores.sum() * 0.0}
        # one cross-entropy per content query, averaged (the official code has one image per batch)
        return {"loss_match_score": torch.cat([F.cross_entropy(l.float(), t, reduction="none")
                                               for l, t in zip(logits, labels)]).mean()}

    def _layer_losses(self, outputs: dict, targets: Sequence[dict], indices: list[tuple[Tensor, Tensor]],
                      num_masks: float, groups: Sequence[str], suffix: str,
                      denoising: bool = False) -> dict[str, Tensor]:
        losses = {}
        for group in groups:
            if group == "masks":
                # the denoising queries have no IoU head to supervise
                values = self.loss_masks(outputs, targets, indices, num_masks, with_iou=self.iou_loss and not denoising)
            else:
                values = {"labels": self.loss_labels, "boxes": self.loss_boxes,
                          "match_score": self.loss_match_score}[group](outputs, targets, indices, num_masks)
            losses.update({f"{name}_{suffix}": value for name, value in values.items()})
        return losses

    # -- the whole criterion ---------------------------------------------------------------------

    def forward(self, outputs: dict, targets: Sequence[dict], indices: list[tuple[Tensor, Tensor]] | None = None,
                denoising: Denoising | None = None) -> dict[str, Tensor]:
        """All loss terms (unweighted; see :meth:`total_loss`).

        outputs: "pred_logits" [B, Q, C], "pred_masks" [B, Q, h, w], "pred_boxes" [B, Q, 4] normalised
          cxcywh, optionally "pred_ious" [B, Q] (or [B, clicks, tokens]), "pred_match_score", a list
          "aux_outputs" of the same for the earlier layers, and "interm_outputs".
        targets: per image "labels" [N], "masks" [N, H, W] over the same (padded) extent as pred_masks,
          "boxes" [N, 4] normalised cxcywh; optionally "allowed" [Q, N] for the matcher,
          "content_masks" for the match-score loss and "has_mask" [N] bool (False: box only, no mask loss).
        indices: the final layer's matching, when the caller has it already.
        denoising: the denoising queries' outputs, supervised with their known targets.
        """
        final = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "interm_outputs")}
        if indices is None:
            indices = self.matcher(final, targets, costs=self.match_costs, generator=self.generator)
        num_masks = self._num_masks(targets, final)

        losses = self._layer_losses(final, targets, indices, num_masks, self.losses, "0")
        aux_outputs = outputs.get("aux_outputs", [])
        for i, aux in enumerate(aux_outputs):
            aux_indices = (self.matcher(aux, targets, costs=self.match_costs, generator=self.generator)
                           if self.rematch_aux else indices)
            losses.update(self._layer_losses(aux, targets, aux_indices, num_masks, self.losses, str(i + 1)))
        if "interm_outputs" in outputs:
            interm = outputs["interm_outputs"]
            interm_indices = self.matcher(interm, targets, costs=self.match_costs, generator=self.generator)
            groups = [g for g in self.losses if g != "match_score"]
            losses.update(self._layer_losses(interm, targets, interm_indices, num_masks, groups, "interm"))

        if denoising is not None:
            dn_indices = self._denoising_indices(targets, denoising)
            dn_num = num_masks * denoising.num_groups
            dn = self._layer_losses(denoising.outputs, targets, dn_indices, dn_num, self.dn_losses, "0", True)
            # as the official criterion: the first auxiliary layer has no denoising loss unless the
            # encoder proposals (interm_outputs) are supervised
            start = 0 if "interm_outputs" in outputs else 1
            for i, aux in enumerate(denoising.outputs.get("aux_outputs", [])):
                if i >= start:
                    dn.update(self._layer_losses(aux, targets, dn_indices, dn_num, self.dn_losses, str(i + 1), True))
            losses.update({f"{k}_dn": v for k, v in dn.items()})
        return losses

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """The weighted sum of the loss terms (weights by base name; unknown names are an error)."""
        missing = sorted({loss_base_name(k) for k in losses} - set(self.weights))
        if missing:
            raise KeyError(f"no weight for loss terms {missing}; add them to SetCriterion(weights=...)")
        terms = [self.weights[loss_base_name(k)] * v for k, v in losses.items()]
        if not terms:
            raise ValueError("no loss terms to sum")
        return sum(terms[1:], terms[0])

    @staticmethod
    def _num_masks(targets: Sequence[dict], outputs: dict) -> float:
        count = sum(len(t["labels"] if "labels" in t else t["masks"]) for t in targets)
        ref = next(v for v in outputs.values() if isinstance(v, Tensor))
        num = torch.as_tensor([float(count)], device=ref.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num)
            num = num / torch.distributed.get_world_size()
        return max(num.item(), 1.0)

    @staticmethod
    def _denoising_indices(targets: Sequence[dict], dn: Denoising) -> list[tuple[Tensor, Tensor]]:
        indices = []
        for t in targets:
            n = len(t["labels"] if "labels" in t else t["masks"])
            if n > dn.group_size:
                raise ValueError(f"{n} targets do not fit denoising groups of {dn.group_size} queries")
            tgt = torch.arange(n).repeat(dn.num_groups)
            src = (torch.arange(dn.num_groups)[:, None] * dn.group_size + torch.arange(n)[None]).flatten()
            indices.append((src, tgt))
        return indices


def _src_permutation(indices: list[tuple[Tensor, Tensor]], device: torch.device) -> tuple[Tensor, Tensor]:
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx.to(device), src_idx.to(device)
