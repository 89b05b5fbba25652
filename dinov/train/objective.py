"""The training objective of one batch: generic in-context segmentation (Hungarian-matched, deep supervision),
denoising queries, and interactive queries (the best granularity trained, every granularity kept off the image's
other instances). dinov/train/trainer.py steps the optimiser on it; the module docstring there says why each part
is there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou

from dinov.modeling.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, point_boxes
from dinov.modeling.dinov import DINOv
from dinov.modeling.prompt_encoder import PromptContent
from dinov.train.config import TrainConfig
from dinov.train.losses import Denoising, SetCriterion, point_sample
from dinov.train.sampling import Sample, mask_to_box, scribble_inside
from dinov.transforms import normalize_and_pad


class TrainingObjective:
    """The losses of a batch for a model. rng: the run's generator (prompts, scribbles, noise), shared with the
    trainer so that a resumed run draws the same."""

    def __init__(self, model: DINOv, config: TrainConfig, criterion: SetCriterion, device: torch.device,
                 rng: np.random.Generator) -> None:
        self.model, self.config, self.criterion, self.device, self.rng = model, config, criterion, device, rng

    def losses(self, batch: Sequence[Sample]) -> dict[str, Tensor]:
        """Every loss of one batch (generic, denoising, interactive), weighted, by name."""
        model, head = self.model, self.model.head
        images = normalize_and_pad([s.image for s in batch], model.pixel_mean.cpu(), model.pixel_std.cpu(),
                                   model.size_divisibility).to(self.device)
        padded = (int(images.shape[-2]), int(images.shape[-1]))
        multi_scale, mask_features = model.encode(images)
        masks = [self._pad(s.masks, padded) for s in batch]

        # ---- class prompts: every instance of the batch encoded once, as inference encodes an example
        present = sorted({int(c) for s in batch for c in s.classes})
        class_index = {c: i for i, c in enumerate(present)}
        prompts: list[tuple[int, int, Tensor]] = []  # (image, class index, content label)
        for i, s in enumerate(batch):
            prompt_masks = [scribble_inside(m, self.rng) if self.rng.random() < self.config.scribble_prompts else m
                            for m in masks[i]]
            level_features = [f[i : i + 1] for f in multi_scale]
            content = head.encode_prompts(level_features, torch.stack(prompt_masks).float())
            labels = content.label[0]
            if head.shape_encoder is not None:
                # shape extension: the example's shape is its whole mask's (an annotation outlines the object,
                # a scribble prompt is for the content part only)
                labels = torch.cat([labels, head.shape_encoder(masks[i].float().to(self.device))], dim=-1)
            for c, label in zip(s.classes.tolist(), labels):
                prompts.append((i, class_index[int(c)], label))
        bank = self.class_banks(prompts, len(batch), len(present))  # [B, C, D]

        # ---- generic decoding of every image against every class of the batch (+ denoising queries)
        targets = []
        for s, m in zip(batch, masks):
            boxes = torch.stack([mask_to_box(x) for x in m]) if len(m) else torch.zeros(0, 4)
            scale = torch.tensor([padded[1], padded[0], padded[1], padded[0]], dtype=torch.float32)
            targets.append({
                "labels": torch.tensor([class_index[int(c)] for c in s.classes], dtype=torch.long, device=self.device),
                "masks": m.to(self.device),
                "boxes": (box_xyxy_to_cxcywh(boxes) / scale).to(self.device),
            })
            if s.has_mask is not None:  # box-only instances: no mask loss (see SetCriterion.loss_masks)
                targets[-1]["has_mask"] = s.has_mask.to(self.device)
        dn_boxes, dn_groups = self.denoising_boxes(targets)
        outputs = head.decode_generic(multi_scale, mask_features, bank, aux_masks=True, denoising_boxes=dn_boxes,
                                      denoising_groups=dn_groups)
        denoising = None
        if dn_boxes is not None:
            dn_outputs = outputs.pop("denoising")
            assert isinstance(dn_outputs, dict)  # decode_generic's outputs of the denoising queries
            denoising = Denoising(outputs=dn_outputs, num_groups=dn_groups,
                                  group_size=dn_boxes.shape[1] // dn_groups)
        generic = self.criterion(outputs, targets, denoising=denoising)
        losses = {"generic": self.criterion.total_loss({k: v for k, v in generic.items() if not k.endswith("_dn")})}
        if denoising is not None:
            losses["denoising"] = self.criterion.total_loss({k: v for k, v in generic.items() if k.endswith("_dn")})

        # ---- interactive: position queries on the same image
        # (only on instances with an outline: a box-only instance has no mask to learn or to stay off)
        interactive = []
        for i, s in enumerate(batch):
            outlined = s.has_mask if s.has_mask is not None else torch.ones(len(s.classes), dtype=torch.bool)
            if outlined.any():
                interactive.append(self.interactive_losses(i, multi_scale, mask_features, masks[i][outlined],
                                                            s.classes[outlined], bank[i : i + 1], class_index, padded))
        for key in interactive[0] if interactive else ():
            losses[key] = torch.stack([x[key] for x in interactive]).mean()
        return losses

    def class_banks(self, prompts: list[tuple[int, int, Tensor]], num_images: int, num_classes: int) -> Tensor:
        """[B, C, D]: for each image, each class's embedding, the mean of 1..max_examples of its prompts, taken
        from the batch's other images when the class has prompts there (else from the image itself)."""
        banks = []
        for target in range(num_images):
            rows = []
            for c in range(num_classes):
                labels = [label for i, k, label in prompts if k == c and i != target]
                if not labels or not self.config.cross_image_examples:
                    labels = [label for _, k, label in prompts if k == c]
                count = int(self.rng.integers(1, min(self.config.max_examples, len(labels)) + 1))
                picks = self.rng.choice(len(labels), size=count, replace=False)
                rows.append(torch.stack([labels[int(k)] for k in picks]).mean(0))
            banks.append(torch.stack(rows))
        return torch.stack(banks)

    def denoising_boxes(self, targets: list[dict]) -> tuple[Tensor | None, int]:
        """Noised ground-truth boxes [B, G * S, 4] for the denoising queries and the number of groups G: S is the
        most instances of an image, G = dn_queries // S (as the official DN); images with fewer instances pad
        their groups with unsupervised whole-centre boxes. The noise moves the centre by up to
        noise_scale * half the size and the size by up to noise_scale * the size."""
        size = max(len(t["boxes"]) for t in targets)
        if self.config.dn_queries <= 0 or size == 0 or size > self.config.dn_queries:
            return None, 0
        groups = self.config.dn_queries // size
        out = torch.full((len(targets), groups * size, 4), 0.5, device=self.device)
        for b, t in enumerate(targets):
            boxes = t["boxes"].float().repeat(groups, 1)  # group-major: query g * size + i is instance i
            noise = torch.from_numpy(self.rng.uniform(-1.0, 1.0, boxes.shape)).float().to(self.device)
            spread = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], dim=1)
            noised = (boxes + noise * spread * self.config.dn_noise_scale).clamp(0.0, 1.0)
            n = len(t["boxes"])
            index = (torch.arange(groups, device=self.device)[:, None] * size + torch.arange(n, device=self.device))
            out[b, index.flatten()] = noised
        # a box of zero size has no inverse sigmoid; keep every coordinate strictly inside (0, 1)
        return out.clamp(1e-3, 1 - 1e-3), groups

    def interactive_losses(self, i: int, multi_scale: list[Tensor], mask_features: Tensor, masks: Tensor,
                            classes: Tensor, bank: Tensor, class_index: dict[int, int],
                            padded: tuple[int, int]) -> dict[str, Tensor]:
        head = self.model.head
        n = len(masks)
        picks = self.rng.choice(n, size=min(n, self.config.interactive_per_image), replace=False)
        position_xyxy: list[Tensor] = []
        instance_ids: list[int] = []
        for j in picks.tolist():
            box = mask_to_box(masks[j])
            if self.rng.random() < 0.6:  # a click somewhere inside the instance
                ys, xs = torch.nonzero(masks[j], as_tuple=True)
                k = int(self.rng.integers(0, len(ys)))
                position_xyxy.append(point_boxes(torch.tensor([[xs[k] + 0.5, ys[k] + 0.5]]), padded)[0])
            else:  # the instance's box, a little jittered as a user draws it
                jitter = torch.from_numpy(self.rng.normal(0, 0.05, 4)).float() * (box[2:] - box[:2]).repeat(2)
                scale = torch.tensor([padded[1], padded[0], padded[1], padded[0]], dtype=torch.float32)
                position_xyxy.append(box_xyxy_to_cxcywh((box + jitter)[None])[0] / scale)
            instance_ids.append(j)
        positions = torch.stack(position_xyxy).clamp(0.0, 1.0).to(self.device)
        instance = torch.tensor(instance_ids, device=self.device)

        # the classes of this image as content prompts: their match scores learn cross-image referring
        prompt_classes = sorted({class_index[int(c)] for c in classes})
        label = bank[:, prompt_classes, : head.hidden_dim]  # referring matches by content
        content = PromptContent.from_labels(label)
        features = [f[i : i + 1] for f in multi_scale]
        out = head.decode_referring(features, mask_features[i : i + 1], content, positions)
        tokens = head.num_mask_tokens
        p = len(picks)
        pred = out["pred_masks"][0].view(p, tokens, *out["pred_masks"].shape[-2:])  # [P, K, h, w]
        target = masks[instance].float()  # [P, H, W]

        # mask losses of every granularity on shared random points
        coords = torch.rand(p, self.config.mask_points, 2, device=self.device)
        logits = point_sample(pred.float(), coords)  # [P, K, M]
        labels = point_sample(target[:, None], coords)[:, 0]  # [P, M]
        bce = F.binary_cross_entropy_with_logits(logits, labels[:, None].expand_as(logits), reduction="none").mean(-1)
        probs = logits.sigmoid()
        dice = 1 - (2 * (probs * labels[:, None]).sum(-1) + 1) / (probs.sum(-1) + labels[:, None].sum(-1) + 1)
        per_granularity = bce + dice  # [P, K]
        best = per_granularity.detach().argmin(1)
        rows = torch.arange(p, device=self.device)
        mask_loss = 5.0 * per_granularity[rows, best].mean()

        # every granularity stays off the other instances: a click or box means one object, whatever its size
        others = torch.stack([masks[:j].any(0) | masks[j + 1:].any(0) for j in instance.tolist()]).float()
        on_others = point_sample(others[:, None].to(self.device), coords)[:, 0]  # [P, M]
        spill_bce = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
        spill = ((spill_bce * on_others[:, None]).sum(-1) / (on_others.sum(-1)[:, None] + 1.0)).mean()

        with torch.no_grad():
            hard = (logits > 0).float()
            inter = (hard * labels[:, None]).sum(-1)
            union = ((hard + labels[:, None]) > 0).float().sum(-1).clamp(min=1)
            true_iou = inter / union  # [P, K]
        iou_loss = F.mse_loss(out["pred_ious"][0].float(), true_iou)

        boxes = out["pred_boxes"][0].view(p, tokens, 4)[rows, best].float()
        scale = torch.tensor([padded[1], padded[0], padded[1], padded[0]], dtype=torch.float32)
        tgt_boxes = torch.stack([box_xyxy_to_cxcywh(mask_to_box(masks[j].cpu())[None])[0] / scale
                                 for j in instance.tolist()]).to(self.device)
        box_loss = 5.0 * F.l1_loss(boxes, tgt_boxes) + 2.0 * (
            1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes)))).mean()

        # match scores: each class prompt should prefer the best granularity of its own instances
        match = out["pred_match_score"][0].float()  # [N, P*K]
        instance_class = torch.tensor([class_index[int(classes[j])] for j in instance.tolist()], device=self.device)
        flat_best = rows * tokens + best
        match_losses = []
        for n_idx, c in enumerate(prompt_classes):
            positive = flat_best[instance_class == c]
            if len(positive) == 0:
                continue
            log_probs = F.log_softmax(match[n_idx], dim=-1)
            match_losses.append(-log_probs[positive].mean())
        match_loss = 2.0 * torch.stack(match_losses).mean() if match_losses else match.sum() * 0.0
        out = {"interactive_mask": mask_loss, "interactive_iou": iou_loss, "interactive_box": box_loss,
               "match": match_loss}
        if self.config.spill_weight > 0:
            out["interactive_spill"] = self.config.spill_weight * spill
        return out

    @staticmethod
    def _pad(masks: Tensor, padded: tuple[int, int]) -> Tensor:
        out = torch.zeros(len(masks), *padded, dtype=torch.bool)
        out[:, : masks.shape[1], : masks.shape[2]] = masks
        return out
