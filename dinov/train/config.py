"""What a training run does: the TrainConfig of the trainer, and the cheap recipe's overrides."""

from __future__ import annotations

from dataclasses import dataclass


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
