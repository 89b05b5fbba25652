"""Box helpers: format conversions, inverse sigmoid and the point boxes used as position queries.

Boxes are ``cxcywh`` normalised to the padded image size unless a name says otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both odds terms kept >= eps (so 0 and 1 stay finite)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _linspace_like_numpy(start: float, stop: float, num: int) -> Tensor:
    # The official grid comes from numpy.linspace in float64; torch.linspace rounds differently in the last
    # bits, so rebuild numpy's formula (start + i * step, last point pinned to stop).
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    values = torch.arange(num, dtype=torch.float64) * step + start
    values[-1] = stop
    return values


def grid_points(points_per_side: int, padded_size: tuple[int, int]) -> Tensor:
    """Evenly spaced points (offset half a cell from the border), row-major, as (x, y) padded pixels, float32.

    These are the points DINOv turns into position queries to propose every object in an image.
    """
    if points_per_side < 1:
        raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
    offset = 1 / (2 * points_per_side)
    side = _linspace_like_numpy(offset, 1 - offset, points_per_side)
    xs = side[None, :].expand(points_per_side, -1)
    ys = side[:, None].expand(-1, points_per_side)
    unit = torch.stack([xs, ys], dim=-1).reshape(-1, 2).to(torch.float32)
    padded_h, padded_w = padded_size
    return unit * torch.tensor([padded_w, padded_h], dtype=torch.float32)


def point_boxes(points: Tensor, padded_size: tuple[int, int], half_size: float = 3.0) -> Tensor:
    """Small boxes (+-half_size pixels) around (x, y) points in padded pixels -> [P, 4] normalised cxcywh, float32.

    float32 arithmetic throughout: this reproduces the reference position boxes bit for bit.
    """
    if points.dim() != 2 or points.shape[-1] != 2:
        raise ValueError(f"points must be [P, 2] (x, y) pixel coordinates, got shape {tuple(points.shape)}")
    padded_h, padded_w = padded_size
    points = points.to(torch.float32)
    scale = torch.tensor([padded_w, padded_h, padded_w, padded_h], dtype=torch.float32, device=points.device)
    xyxy = torch.cat([points - half_size, points + half_size], dim=1)
    return box_xyxy_to_cxcywh(xyxy) / scale
