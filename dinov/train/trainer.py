"""Training DINOv: generic in-context segmentation and interactive (self-referring) segmentation.

One step on a batch of images trains the two tasks of the paper together:

* generic: for every class present in the batch, 1..N of its instances (from any image of the
  batch) are encoded as visual prompts and averaged into the class's embedding; every image is
  decoded against all the batch's classes (the others are its negatives) and its instances are
  matched to the object queries (Hungarian: class, mask BCE, dice, box L1, GIoU), with the mask
  losses on sampled points and deep supervision over the decoder layers;
* interactive: points inside instances and the instances' boxes become position queries on the
  same image (six granularity queries each); the granularity that fits the instance best is
  trained on it (mask and box), the IoU head learns every granularity's true IoU, and the content
  match scores learn to pick, among the proposals, those of the prompt's class (what cross-image
  referring selects with).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou, masks_to_boxes

from dinov.config import DINOvConfig
from dinov.data.scenes import Scene
from dinov.modeling.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, point_boxes
from dinov.modeling.dinov import DINOv
from dinov.modeling.prompt_encoder import PromptContent
from dinov.train.losses import SetCriterion, dice_loss, point_sample, sigmoid_ce_loss
from dinov.train.matcher import HungarianMatcher
from dinov.transforms import normalize_and_pad, resize_image, resize_mask

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 4
    lr: float = 4e-4
    backbone_lr_scale: float = 1.0  # 0.1 when fine-tuning a pretrained backbone, as the official
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    max_examples: int = 4  # a class prompt averages 1..max_examples in-batch examples
    interactive_per_image: int = 6  # position queries (points or boxes) per image
    mask_points: int = 1024  # points sampled for the mask losses
    min_size: int = 128  # training images are rescaled so that the shorter side is in [min_size, max_size]
    max_size: int = 192
    freeze_backbone: bool = False
    freeze_encoder: bool = False  # the pixel decoder
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 250


@dataclass
class Sample:
    """A training image with its instances, all at the training resolution."""

    image: Tensor  # uint8 [3, H, W]
    masks: Tensor  # bool [N, H, W]
    classes: Tensor  # int64 [N]


def prepare_sample(scene: Scene, rng: np.random.Generator, min_size: int, max_size: int) -> Sample | None:
    """Rescale a scene to a random training size and drop instances that vanish; None if none is left."""
    height, width = scene.image.shape[:2]
    short = int(rng.integers(min_size, max_size + 1))
    scale = short / min(height, width)
    size = (max(32, int(round(height * scale))), max(32, int(round(width * scale))))
    image = resize_image(scene.image, size, "bilinear")
    masks = np.stack([resize_mask(m, size, "nearest") > 0.5 for m in scene.masks]) if len(scene.masks) else \
        np.zeros((0, *size), bool)
    keep = masks.reshape(len(masks), -1).sum(1) >= 16
    if not keep.any():
        return None
    return Sample(
        image=torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1),
        masks=torch.from_numpy(masks[keep]),
        classes=torch.as_tensor(np.asarray(scene.classes)[keep], dtype=torch.long),
    )


def scribble_inside(mask: Tensor, rng: np.random.Generator) -> Tensor:
    """A thin random stroke inside an instance: what an annotator's brush scribble looks like."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(ys) < 8:
        return mask
    a, b = rng.integers(0, len(ys), size=2)
    steps = 32
    t = torch.linspace(0, 1, steps)
    py = (ys[a] * (1 - t) + ys[b] * t).round().long()
    px = (xs[a] * (1 - t) + xs[b] * t).round().long()
    stroke = torch.zeros_like(mask)
    radius = 1 + int(rng.integers(0, 3))
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            stroke[(py + dy).clamp(0, mask.shape[0] - 1), (px + dx).clamp(0, mask.shape[1] - 1)] = True
    stroke &= mask
    return stroke if stroke.sum() >= 4 else mask


def mask_to_box(mask: Tensor) -> Tensor:
    """Tight xyxy box (x1, y1 exclusive, as the scenes' boxes) of a non-empty bool mask, in pixels."""
    return masks_to_boxes(mask[None])[0].float() + torch.tensor([0.0, 0.0, 1.0, 1.0])


class Trainer:
    def __init__(self, model: DINOv, model_config: DINOvConfig, config: TrainConfig, device: str = "cpu") -> None:
        self.model = model.to(device)
        self.model_config = model_config
        self.config = config
        self.device = torch.device(device)
        self.rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed)
        if config.freeze_backbone:
            self.model.backbone.requires_grad_(False)
        if config.freeze_encoder:
            self.model.sem_seg_head.pixel_decoder.requires_grad_(False)
        backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in backbone}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = [{"params": rest, "lr": config.lr}]
        if backbone:
            groups.append({"params": backbone, "lr": config.lr * config.backbone_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.base_lrs = [g["lr"] for g in groups]
        self.step = 0
        matcher = HungarianMatcher(num_points=config.mask_points)
        self.criterion = SetCriterion(matcher, losses=("labels", "masks", "boxes"), num_points=config.mask_points)
        # Mixed precision where it pays: bf16 on CUDA; CPU trains in fp32.
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None

    # ------------------------------------------------------------------ schedule
    def learning_rate_factor(self) -> float:
        """Linear warm-up, then cosine decay to 1 % of the base rate."""
        warm = self.config.warmup_steps
        if self.step < warm:
            return (self.step + 1) / warm
        progress = (self.step - warm) / max(1, self.config.steps - warm)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: Sequence[Sample]) -> dict[str, float]:
        self.model.train()
        factor = self.learning_rate_factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        if self.autocast is not None:
            with self.autocast:
                losses = self.compute_losses(batch)
        else:
            losses = self.compute_losses(batch)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["total"] = float(total.detach())
        return out

    def compute_losses(self, batch: Sequence[Sample]) -> dict[str, Tensor]:
        model, head = self.model, self.model.head
        images = normalize_and_pad([s.image for s in batch], model.pixel_mean.cpu(), model.pixel_std.cpu(),
                                   model.size_divisibility).to(self.device)
        padded = images.shape[-2:]
        multi_scale, mask_features = model.encode(images)
        masks = [self._pad(s.masks, padded) for s in batch]

        # ---- class prompts from in-batch examples
        present = sorted({int(c) for s in batch for c in s.classes})
        class_index = {c: i for i, c in enumerate(present)}
        chosen: dict[int, list[tuple[int, Tensor]]] = {i: [] for i in range(len(batch))}  # image -> (class, mask)
        for c in present:
            pool = [(i, j) for i, s in enumerate(batch) for j in torch.nonzero(s.classes == c).flatten().tolist()]
            count = int(self.rng.integers(1, min(self.config.max_examples, len(pool)) + 1))
            for k in self.rng.choice(len(pool), size=count, replace=False):
                i, j = pool[int(k)]
                prompt = masks[i][j]
                if self.rng.random() < 0.4:
                    prompt = scribble_inside(prompt, self.rng)
                chosen[i].append((class_index[c], prompt))
        sums = [None] * len(present)
        counts = [0] * len(present)
        for i, items in chosen.items():
            if not items:
                continue
            level_features = [f[i : i + 1] for f in multi_scale]
            content = head.encode_prompts(level_features, torch.stack([m for _, m in items]).float())
            for (c, _), label in zip(items, content.label[0]):
                sums[c] = label if sums[c] is None else sums[c] + label
                counts[c] += 1
        bank = torch.stack([s / n for s, n in zip(sums, counts)])[None]  # [1, C, D]

        # ---- generic decoding of every image against every class of the batch
        outputs = head.decode_generic(multi_scale, mask_features, bank, aux_masks=True)
        targets = []
        for s, m in zip(batch, masks):
            boxes = torch.stack([mask_to_box(x) for x in m]) if len(m) else torch.zeros(0, 4)
            scale = torch.tensor([padded[1], padded[0], padded[1], padded[0]], dtype=torch.float32)
            targets.append({
                "labels": torch.tensor([class_index[int(c)] for c in s.classes], dtype=torch.long, device=self.device),
                "masks": m.to(self.device),
                "boxes": (box_xyxy_to_cxcywh(boxes) / scale).to(self.device),
            })
        generic = self.criterion(outputs, targets)
        losses = {"generic": self.criterion.total_loss(generic)}

        # ---- interactive: position queries on the same image
        interactive = [self._interactive_losses(i, multi_scale, mask_features, masks[i], batch[i].classes,
                                                bank, class_index, padded) for i in range(len(batch))]
        for key in interactive[0]:
            losses[key] = torch.stack([x[key] for x in interactive]).mean()
        return losses

    def _interactive_losses(self, i: int, multi_scale: list[Tensor], mask_features: Tensor, masks: Tensor,
                            classes: Tensor, bank: Tensor, class_index: dict[int, int], padded) -> dict[str, Tensor]:
        head = self.model.head
        n = len(masks)
        picks = self.rng.choice(n, size=min(n, self.config.interactive_per_image), replace=False)
        position_xyxy, instance = [], []
        for j in picks.tolist():
            box = mask_to_box(masks[j])
            if self.rng.random() < 0.6:  # a click somewhere inside the instance
                ys, xs = torch.nonzero(masks[j], as_tuple=True)
                k = int(self.rng.integers(0, len(ys)))
                position_xyxy.append(point_boxes(torch.tensor([[xs[k] + 0.5, ys[k] + 0.5]]), tuple(padded))[0])
            else:  # the instance's box, a little jittered as a user draws it
                jitter = torch.from_numpy(self.rng.normal(0, 0.05, 4)).float() * (box[2:] - box[:2]).repeat(2)
                scale = torch.tensor([padded[1], padded[0], padded[1], padded[0]], dtype=torch.float32)
                position_xyxy.append(box_xyxy_to_cxcywh((box + jitter)[None])[0] / scale)
            instance.append(j)
        positions = torch.stack(position_xyxy).clamp(0.0, 1.0).to(self.device)
        instance = torch.tensor(instance, device=self.device)

        # the classes of this image as content prompts: their match scores learn cross-image referring
        prompt_classes = sorted({class_index[int(c)] for c in classes})
        label = bank[:, prompt_classes]
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
        return {"interactive_mask": mask_loss, "interactive_iou": iou_loss, "interactive_box": box_loss,
                "match": match_loss}

    @staticmethod
    def _pad(masks: Tensor, padded) -> Tensor:
        out = torch.zeros(len(masks), *padded, dtype=torch.bool)
        out[:, : masks.shape[1], : masks.shape[2]] = masks
        return out

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "rng": self.rng.bit_generator.state, "model_config": self.model_config.to_dict()}

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)

    def resume(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.rng.bit_generator.state = state["rng"]


def batches(dataset: Sequence[Scene], config: TrainConfig, rng: np.random.Generator) -> Iterator[list[Sample]]:
    """Endless random batches of prepared samples."""
    while True:
        batch = []
        while len(batch) < config.batch_size:
            sample = prepare_sample(dataset[int(rng.integers(0, len(dataset)))], rng, config.min_size, config.max_size)
            if sample is not None:
                batch.append(sample)
        yield batch


def train(trainer: Trainer, dataset: Sequence[Scene], out_dir: Path, progress: bool = True) -> list[dict[str, float]]:
    """Run until `trainer.config.steps`, checkpointing to `out_dir/last.pt` (resumable)."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    config = trainer.config
    data_rng = np.random.default_rng(config.seed + trainer.step)
    history = []
    bar = tqdm(total=config.steps, initial=trainer.step, disable=not progress, desc="train", dynamic_ncols=True)
    start = time.perf_counter()
    for batch in batches(dataset, config, data_rng):
        if trainer.step >= config.steps:
            break
        losses = trainer.train_step(batch)
        history.append(losses)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items() if k in ("total", "generic", "interactive_mask")})
        if trainer.step % config.log_every == 0:
            window = history[-config.log_every:]
            mean = {k: sum(h[k] for h in window) / len(window) for k in window[0]}
            logger.info("step %d/%d %.0fs %s", trainer.step, config.steps, time.perf_counter() - start,
                        " ".join(f"{k}={v:.3f}" for k, v in mean.items()))
        if trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps:
            trainer.save(out_dir / "last.pt")
    bar.close()
    return history
