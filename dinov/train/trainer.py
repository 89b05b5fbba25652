"""Training DINOv: generic in-context segmentation and interactive (self-referring) segmentation.

The trainer steps the optimiser on the objective of dinov/train/objective.py, over batches of
dinov/train/sampling.py. One step on a batch of images trains the two tasks of the paper together:

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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dinov.config import DINOvConfig
from dinov.data.scenes import Scene
from dinov.modeling.dinov import DINOv
from dinov.train.config import TrainConfig
from dinov.train.losses import SetCriterion
from dinov.train.matcher import HungarianMatcher
from dinov.train.objective import TrainingObjective
from dinov.train.sampling import Sample, batches

logger = logging.getLogger(__name__)


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
        self.base_lrs: list[float] = [g["lr"] for g in self.optimizer.param_groups]
        self.step = 0
        matcher = HungarianMatcher(num_points=config.mask_points)
        self.criterion = SetCriterion(matcher, losses=("labels", "masks", "boxes"), num_points=config.mask_points,
                                      importance_sample_ratio=config.importance_sample_ratio)
        self.objective = TrainingObjective(self.model, config, self.criterion, self.device, self.rng)
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
                losses = self.objective.losses(batch)
        else:
            losses = self.objective.losses(batch)
        values = list(losses.values())  # never empty: the generic loss is always there
        total = sum(values[1:], values[0])
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["total"] = float(total.detach())
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
            from dinov.build import save_model

            save_model(trainer.model, trainer.model_config, out_dir / f"step_{trainer.step:05d}.safetensors")
    bar.close()
    return history
