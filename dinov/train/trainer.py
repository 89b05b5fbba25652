"""Training DINOv: generic in-context segmentation and interactive (self-referring) segmentation.

One step on a batch of images trains the two tasks of the paper together:

* generic: every instance of the batch is encoded as a visual prompt (its full mask, or a scribble
  inside it); for each image, a class's embedding averages 1..max_examples of its prompts taken from
  the batch's OTHER images where there are any (as inference prompts with examples from other
  images), so that matching cannot learn to recognise the instance itself; every image is decoded
  against all the batch's classes (those absent from it are its negatives) and its instances are
  matched to the object queries (Hungarian: class, mask BCE, dice, box L1, GIoU), with the mask
  losses on sampled points and deep supervision over the decoder layers;
* denoising (the official DN for generic decoding): each image's ground-truth boxes, noised, are
  decoded as extra query groups that neither see nor are seen by the other queries; each learns the
  mask and box of the instance it came from, without matching. This trains the decoder to turn a
  rough box into the object, which is what speeds up the convergence of the object queries;
* interactive: points inside instances and the instances' boxes become position queries on the
  same image (six granularity queries each); the granularity that fits the instance best is
  trained on it (mask and box), the IoU head learns every granularity's true IoU, every granularity
  is pushed off the image's other instances (a click means one object: masks must not spill), and
  the content match scores learn to pick, among the proposals, those of the prompt's class (what
  cross-image referring selects with).
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
from dinov.data.scenes import NUM_CLASSES, Scene, SceneDataset, generate_scene
from dinov.modeling.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, point_boxes
from dinov.modeling.dinov import DINOv
from dinov.modeling.prompt_encoder import PromptContent
from dinov.train.losses import Denoising, SetCriterion, point_sample
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
    max_examples: int = 16  # a class prompt averages 1..max_examples in-batch examples (the predictor's 16)
    cross_image_examples: bool = True  # a class's prompt for an image comes from the batch's other images if any
    scribble_prompts: float = 0.4  # fraction of example prompts that are a scribble instead of the full mask
    batch_classes: int = 0  # >0: each batch of generated scenes draws its objects from this many classes, so
    #                         classes recur across the batch's images (examples from other images, hard negatives)
    dn_queries: int = 100  # denoising queries per image (official DN_NUM); 0 turns denoising off
    dn_noise_scale: float = 0.4  # official DN_NOISE_SCALE
    spill_weight: float = 2.0  # interactive: weight of the loss on mask probability over the image's other instances
    interactive_per_image: int = 6  # position queries (points or boxes) per image
    mask_points: int = 1024  # points sampled for the mask losses (matcher and losses)
    importance_sample_ratio: float = 0.75  # of the mask points, this fraction where the prediction is most
    #                                        uncertain (Mask2Former's importance sampling); 0: uniform points
    min_size: int = 128  # training images are rescaled so that the shorter side is in [min_size, max_size]
    max_size: int = 192
    crop_size: int = 0  # >0: a random crop_size x crop_size window of each rescaled image (no padding waste: every
    #                     image of a batch has the same size); instances with too little left in it are dropped
    freeze_backbone: bool = False
    freeze_encoder: bool = False  # the pixel decoder
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 250
    snapshot_every: int = 0  # >0: also keep the weights of every this many steps (OUT/step_NNNNN.safetensors)


# The cheap training step (issue 19): fixed crops (no padding), 256 mask points, 20 denoising queries and three
# interactive queries per image. The measured CPU cost per step is in BENCHMARKS.md ("The demo model").
CHEAP_RECIPE: dict[str, int] = {"crop_size": 128, "mask_points": 256, "dn_queries": 20, "interactive_per_image": 3}


@dataclass
class Sample:
    """A training image with its instances, all at the training resolution."""

    image: Tensor  # uint8 [3, H, W]
    masks: Tensor  # bool [N, H, W]
    classes: Tensor  # int64 [N]
    has_mask: Tensor | None = None  # bool [N]; False: masks[i] is a filled box, which supervises the box only


def prepare_sample(scene: Scene, rng: np.random.Generator, min_size: int, max_size: int,
                   crop_size: int = 0) -> Sample | None:
    """Rescale a scene to a random training size (then, with ``crop_size``, cut a random square of that side
    from it) and drop instances that vanish; None if none is left."""
    height, width = scene.image.shape[:2]
    short = int(rng.integers(max(min_size, crop_size), max(max_size, crop_size) + 1))
    scale = short / min(height, width)
    size = (max(32, int(round(height * scale))), max(32, int(round(width * scale))))
    image = resize_image(scene.image, size, "bilinear")
    masks = np.stack([resize_mask(m, size, "nearest") > 0.5 for m in scene.masks]) if len(scene.masks) else \
        np.zeros((0, *size), bool)
    if crop_size:
        image, masks = random_crop(image, masks, crop_size, rng)
    keep = masks.reshape(len(masks), -1).sum(1) >= 16
    if not keep.any():
        return None
    has_mask = None if scene.has_mask is None else torch.as_tensor(np.asarray(scene.has_mask, bool)[keep])
    return Sample(
        image=torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1),
        masks=torch.from_numpy(masks[keep]),
        classes=torch.as_tensor(np.asarray(scene.classes)[keep], dtype=torch.long),
        has_mask=has_mask,
    )


def random_crop(image: np.ndarray, masks: np.ndarray, size: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """The same random size x size window of an image [H, W, 3] and its masks [N, H, W] (H, W >= size)."""
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from a {width}x{height} image")
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return image[top:top + size, left:left + size], masks[:, top:top + size, left:left + size]


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
        self.criterion = SetCriterion(matcher, losses=("labels", "masks", "boxes"), num_points=config.mask_points,
                                      importance_sample_ratio=config.importance_sample_ratio)
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
        bank = self._class_banks(prompts, len(batch), len(present))  # [B, C, D]

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
        dn_boxes, dn_groups = self._denoising_boxes(targets)
        outputs = head.decode_generic(multi_scale, mask_features, bank, aux_masks=True, denoising_boxes=dn_boxes,
                                      denoising_groups=dn_groups)
        denoising = None
        if dn_boxes is not None:
            denoising = Denoising(outputs=outputs.pop("denoising"), num_groups=dn_groups,
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
                interactive.append(self._interactive_losses(i, multi_scale, mask_features, masks[i][outlined],
                                                            s.classes[outlined], bank[i : i + 1], class_index, padded))
        for key in interactive[0] if interactive else ():
            losses[key] = torch.stack([x[key] for x in interactive]).mean()
        return losses

    def _class_banks(self, prompts: list[tuple[int, int, Tensor]], num_images: int, num_classes: int) -> Tensor:
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

    def _denoising_boxes(self, targets: list[dict]) -> tuple[Tensor | None, int]:
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


def with_shape_encoder(model: DINOv, model_config: DINOvConfig, shape_dim: int) -> tuple[DINOv, DINOvConfig]:
    """The model with a new (randomly initialised) shape encoder of width ``shape_dim`` and every other weight as
    it was; a model that has one already is returned as it is."""
    if model.head.shape_encoder is not None:
        if model.head.shape_dim != shape_dim:
            raise ValueError(f"the model has a shape encoder of width {model.head.shape_dim}, not {shape_dim}")
        return model, model_config
    import dataclasses

    from dinov.modeling.dinov import build_dinov

    config = dataclasses.replace(model_config, decoder=dataclasses.replace(model_config.decoder, shape_dim=shape_dim))
    extended = build_dinov(config)
    missing, unexpected = extended.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(".shape_encoder." not in name for name in missing):
        raise RuntimeError(f"the shape extension changed more than the shape encoder: missing {missing}, "
                           f"unexpected {unexpected}")
    extended.default_score_threshold = getattr(model, "default_score_threshold", 0.12)
    extended.model_name = getattr(model, "model_name", "unnamed")
    return extended.train(model.training), config


def batches(dataset: Sequence[Scene], config: TrainConfig, rng: np.random.Generator) -> Iterator[list[Sample]]:
    """Endless random batches of prepared samples.

    With ``config.batch_classes`` and generated scenes, each batch's scenes are drawn (from the dataset's seeds)
    with objects of one random subset of that many classes, so that every class of the batch tends to recur on
    several of its images."""
    while True:
        subset = None
        if config.batch_classes > 0 and isinstance(dataset, SceneDataset):
            subset = np.sort(rng.choice(NUM_CLASSES, size=min(config.batch_classes, NUM_CLASSES), replace=False))
        batch = []
        while len(batch) < config.batch_size:
            index = int(rng.integers(0, len(dataset)))
            if subset is not None:
                scene = generate_scene(int(dataset.seeds[index]), dataset.size, dataset.num_objects,
                                       classes=subset.tolist())
            else:
                scene = dataset[index]
            sample = prepare_sample(scene, rng, config.min_size, config.max_size, config.crop_size)
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
        if config.snapshot_every and trainer.step % config.snapshot_every == 0:
            # model-only snapshots, so that the best so far can be taken while the run goes on
            from dinov.checkpoint import save_model

            save_model(trainer.model, trainer.model_config, out_dir / f"step_{trainer.step:05d}.safetensors")
    bar.close()
    return history
