"""A warm start for a new shape encoder (the shape extension of class matching): before the whole model trains, the
encoder alone learns to tell the training data's classes apart from their masks, so that its embeddings already
carry the outline when the class logits start to use them.

Masks alone cannot tell colours apart, so what is learnt is whatever of the class the outline shows (on the
generated scenes: the kind of shape). Half the masks are shrunk to a quarter (area average, soft edges): what an
object query's predicted mask looks like at the mask features' stride 4.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dinov.data.scenes import Scene
from dinov.modeling.shape_encoder import ShapeEncoder


def mask_batch(dataset: Sequence[Scene], rng: np.random.Generator, count: int) -> tuple[list[Tensor], Tensor]:
    """``count`` instance masks (bool [H, W], full size) of random scenes of the dataset and their classes."""
    masks: list[Tensor] = []
    classes: list[int] = []
    while len(masks) < count:
        scene = dataset[int(rng.integers(0, len(dataset)))]
        has_mask = np.ones(len(scene.classes), bool) if scene.has_mask is None else np.asarray(scene.has_mask, bool)
        for mask, cls, outlined in zip(scene.masks, scene.classes, has_mask):
            if outlined and mask.sum() >= 16:
                masks.append(torch.from_numpy(np.asarray(mask, bool)))
                classes.append(int(cls))
    return masks[:count], torch.as_tensor(classes[:count], dtype=torch.long)


def encode_masks(encoder: ShapeEncoder, masks: Sequence[Tensor], rng: np.random.Generator,
                 shrink_fraction: float = 0.5) -> Tensor:
    """Unit embeddings [N, S] of masks of any sizes; ``shrink_fraction`` of them first shrunk by 4 (soft)."""
    out = []
    for mask in masks:
        m = mask.float()[None, None]
        if rng.random() < shrink_fraction:
            m = F.avg_pool2d(m, 4, ceil_mode=True)
        out.append(encoder.crops(m[0]))
    return encoder.embed_crops(torch.cat(out))


def pretrain_shape_encoder(encoder: ShapeEncoder, dataset: Sequence[Scene], num_classes: int, steps: int,
                           seed: int = 0, batch: int = 48, lr: float = 3e-3, temperature: float = 0.1
                           ) -> list[float]:
    """Train ``encoder`` (in place) for ``steps`` steps of cross-entropy between the cosine similarities of each
    mask's embedding to learned class prototypes (over ``temperature``) and the mask's class. Returns the losses."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.nn.Parameter(torch.randn(num_classes, encoder.dim, generator=generator))
    weights = [p for name, p in encoder.named_parameters() if name != "logit_scale"]
    optimizer = torch.optim.Adam(weights + [prototypes], lr=lr)
    was_training = encoder.training
    encoder.train()
    losses = []
    for _ in range(steps):
        masks, classes = mask_batch(dataset, rng, batch)
        embeddings = encode_masks(encoder, masks, rng)
        logits = embeddings @ F.normalize(prototypes, dim=-1).T / temperature
        loss = F.cross_entropy(logits, classes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    encoder.train(was_training)
    return losses
