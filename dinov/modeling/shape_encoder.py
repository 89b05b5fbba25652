"""The shape extension of class matching (not in the official DINOv).

The official prompt encoder pools the features inside an example's mask without positions, so a class embedding
carries the example's appearance (colour, texture) but not its outline. The shape encoder is a small CNN on the
mask alone: the mask cropped to a square around its box (the longer side, so that the aspect ratio is kept),
resampled to ``size`` x ``size``, becomes a unit vector of ``dim`` numbers. Generic decoding encodes both sides of
a match, the class's example masks (averaged over the examples, as the content embedding) and each object query's
own predicted mask, and adds ``logit_scale`` times their cosine similarity to the class logit.

A model without a shape encoder (every released checkpoint) computes exactly what the official code computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align


def square_mask_boxes(masks: Tensor, threshold: float = 0.5) -> Tensor:
    """[N, 4] xyxy pixel boxes of masks [N, H, W]: squares (side = the longer side of the tight box of the cells
    above ``threshold``) centred on that box; a mask with nothing above it gets the whole map."""
    n, height, width = masks.shape
    inside = masks > threshold
    rows, cols = inside.any(2), inside.any(1)  # [N, H], [N, W]
    row_index = torch.arange(height, device=masks.device, dtype=torch.float32)
    col_index = torch.arange(width, device=masks.device, dtype=torch.float32)
    big = float(max(height, width) + 1)
    top = torch.where(rows, row_index, big).amin(1)
    bottom = torch.where(rows, row_index, -1.0).amax(1) + 1
    left = torch.where(cols, col_index, big).amin(1)
    right = torch.where(cols, col_index, -1.0).amax(1) + 1
    empty = ~rows.any(1)
    top, left = torch.where(empty, 0.0, top), torch.where(empty, 0.0, left)
    bottom, right = torch.where(empty, float(height), bottom), torch.where(empty, float(width), right)
    side = torch.maximum(bottom - top, right - left)
    cy, cx = (top + bottom) / 2, (left + right) / 2
    return torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=1)


class ShapeEncoder(nn.Module):
    """Masks [N, H, W] (probabilities or 0/1) -> unit shape embeddings [N, dim]."""

    def __init__(self, dim: int = 32, size: int = 32, width: int = 16, logit_scale: float = 2.0) -> None:
        super().__init__()
        if size % 8:
            raise ValueError(f"size must be a multiple of 8, got {size}")
        self.dim = dim
        self.size = size
        self.convs = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.proj = nn.Linear(4 * width * (size // 8) ** 2, dim)
        # weight of the cosine similarity in the class logit
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def crops(self, masks: Tensor) -> Tensor:
        """[N, 1, size, size]: each mask's square crop around its own box, resampled."""
        masks = masks.float()
        boxes = square_mask_boxes(masks.detach())
        rois = torch.cat([torch.arange(len(masks), device=masks.device, dtype=torch.float32)[:, None], boxes], 1)
        return roi_align(masks[:, None], rois, output_size=self.size, spatial_scale=1.0, sampling_ratio=2,
                         aligned=True)

    def forward(self, masks: Tensor) -> Tensor:
        if masks.dim() != 3:
            raise ValueError(f"masks must be [N, H, W], got {tuple(masks.shape)}")
        if len(masks) == 0:
            return masks.new_zeros(0, self.dim)
        return self.embed_crops(self.crops(masks))

    def embed_crops(self, crops: Tensor) -> Tensor:
        """Unit embeddings [N, dim] of crops [N, 1, size, size] (``crops``)."""
        features = self.convs(crops * 2 - 1)
        return F.normalize(self.proj(features.flatten(1)), dim=-1)

    def similarity_logits(self, query_shapes: Tensor, class_shapes: Tensor) -> Tensor:
        """logit_scale x cosine similarity: query_shapes [B, Q, S] (unit), class_shapes [B or 1, C, S] (a mean of
        unit vectors; normalised here) -> [B, Q, C]."""
        classes = F.normalize(class_shapes.to(query_shapes), dim=-1)
        return self.logit_scale * (query_shapes @ classes.transpose(1, 2))
