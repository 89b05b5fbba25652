"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021) in plain PyTorch.

Each query looks at ``n_points`` learned sampling locations around its reference point on
every feature level, reads the value there by bilinear interpolation and mixes the samples
with softmax weights. The official code runs a compiled CUDA op, or on CPU a loop of
``F.grid_sample`` calls; here the bilinear reads and the weighted sum are done together by
one ``F.embedding_bag`` call, which is several times faster on CPU, works on any device, and
computes the same numbers up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Bilinear sampling of ``value`` at ``sampling_locations``, summed with ``attention_weights``.

    Args:
        value: [N, S, M, D], the flattened levels of M heads, S = sum of H_l * W_l.
        spatial_shapes: [L, 2] integer (H_l, W_l) of each level.
        level_start_index: [L] integer offset of each level along S.
        sampling_locations: [N, Lq, M, L, P, 2] (x, y) in [0, 1] over each level
            (0 and 1 are the outer edges of the border pixels); outside reads zeros.
        attention_weights: [N, Lq, M, L, P].

    Returns:
        [N, Lq, M * D]. Same maths as ``F.grid_sample(mode="bilinear", padding_mode="zeros",
        align_corners=False)`` per level followed by the weighted sum over levels and points.
    """
    n, lq, m, num_levels, num_points, _ = sampling_locations.shape
    locations = sampling_locations.reshape(n, lq, m, num_levels * num_points, 2)
    weights = attention_weights.reshape(n, lq, m, num_levels * num_points)
    return _sample(value, spatial_shapes, level_start_index, locations[..., 0], locations[..., 1], weights)


def _sample(
    value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, loc_x: Tensor, loc_y: Tensor, attn: Tensor
) -> Tensor:
    """The core on [N, Lq, M, L * P] tensors, one per axis (level-major, then point).

    Everything here broadcasts only over leading dims with per-(level, point) constants of
    shape [L * P]: broadcasting over small inner dims (x/y pairs, corners) is very slow on CPU.
    """
    n, s, m, d = value.shape
    lq, lp = loc_x.shape[1], loc_x.shape[3]
    num_points = lp // spatial_shapes.shape[0]
    device = value.device
    coord_dtype = loc_x.dtype if loc_x.dtype == torch.float64 else torch.float32
    shape_lp = spatial_shapes.repeat_interleave(num_points, 0)  # [L * P, 2] (H, W)
    x0, wx_lo, wx_hi = _bilinear_axis(loc_x.to(coord_dtype), shape_lp[:, 1], coord_dtype)
    y0, wy_lo, wy_hi = _bilinear_axis(loc_y.to(coord_dtype), shape_lp[:, 0], coord_dtype)
    attn = attn.to(coord_dtype)
    wy_lo = wy_lo * attn
    wy_hi = wy_hi * attn
    # Bag of each (image, query, head): 4 corners x L * P samples (order is irrelevant to the sum).
    weights = torch.stack([wy_lo * wx_lo, wy_lo * wx_hi, wy_hi * wx_lo, wy_hi * wx_hi], -2).to(value.dtype)

    # Rows of value viewed as a [N * S * M, D] table: ((n * S + pixel) * M + head).
    index_dtype = torch.int32 if n * s * m < 2**31 else torch.int64
    width = shape_lp[:, 1].to(index_dtype)
    start = level_start_index.to(index_dtype).repeat_interleave(num_points)
    image_head = (torch.arange(n, device=device, dtype=index_dtype) * (s * m)).view(n, 1, 1, 1) + torch.arange(
        m, device=device, dtype=index_dtype
    ).view(1, 1, m, 1)
    top_left = (y0.to(index_dtype) * width + x0.to(index_dtype) + start) * m + image_head
    top_right = top_left + m
    row_step = width * m
    rows = torch.stack([top_left, top_right, top_left + row_step, top_right + row_step], -2)
    # Outside corners carry zero weight; clamping just keeps their index valid.
    rows = rows.clamp_(0, n * s * m - 1)

    bag = 4 * lp
    out = F.embedding_bag(
        rows.view(-1, bag), value.reshape(n * s * m, d), mode="sum", per_sample_weights=weights.reshape(-1, bag)
    )
    return out.view(n, lq, m * d)


def _bilinear_axis(coord: Tensor, size: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Along one axis of size ``size``: the lower neighbouring pixel of normalised ``coord``
    and the weights of the lower and upper neighbour, zero where that pixel is outside."""
    size_f = size.to(dtype)
    # grid_sample (align_corners=False) reads pixel coord * size - 0.5; its CPU kernel gets there through
    # the grid 2 * coord - 1, which can round the last bit differently: the outputs agree to float rounding.
    pixel = coord * size_f - 0.5
    # Points further out than one pixel read nothing either way; clamping keeps indices small.
    pixel = torch.minimum(pixel.clamp(min=-1), size_f)
    lower = pixel.floor()
    frac = pixel - lower
    w_lower = (1 - frac) * ((lower >= 0) & (lower < size_f))
    w_upper = frac * (lower < size_f - 1)
    return lower, w_lower, w_upper


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the official parameter names.

    Args:
        d_model: channels of queries and values.
        n_levels: number of feature levels.
        n_heads: attention heads; ``d_model`` must be divisible by it.
        n_points: sampling points per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Deformable DETR's init: zero offset weights, biases spreading the points of each
        # head along its own direction at distances 1..n_points, uniform attention.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        distances = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = directions.view(self.n_heads, 1, 1, 2) * distances
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.expand(-1, self.n_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
        project: bool = True,
    ) -> Tensor:
        """
        Args:
            query: [N, Lq, C].
            reference_points: [N, Lq, n_levels, 2] points (x, y) in [0, 1] of the padded
                image, or [N, Lq, n_levels, 4] boxes (cx, cy, w, h): points then spread
                over the box instead of over pixels.
            input_flatten: [N, S, C], all levels flattened and concatenated.
            input_spatial_shapes: [n_levels, 2] integer (H, W) of each level.
            input_level_start_index: [n_levels] integer start of each level along S.
            input_padding_mask: optional [N, S], True at padding (its values read as zero).
            project: apply ``output_proj`` (False: return the sampled values, for a caller that fuses the
                projection with what follows).

        Returns:
            [N, Lq, C].
        """
        n, len_q, _ = query.shape
        _, len_in, _ = input_flatten.shape
        if input_spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(
                f"input_spatial_shapes must be [{self.n_levels}, 2] (H, W per level), got {tuple(input_spatial_shapes.shape)}"
            )
        if int(input_spatial_shapes.prod(1).sum()) != len_in:
            raise ValueError(
                f"input_flatten has {len_in} positions but input_spatial_shapes add up to "
                f"{int(input_spatial_shapes.prod(1).sum())}"
            )
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                f"reference_points must end in 2 (points) or 4 (boxes), got shape {tuple(reference_points.shape)}"
            )

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
        lp = self.n_levels * self.n_points
        offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, lp, 2)
        weights = self.attention_weights(query).view(n, len_q, self.n_heads, lp)
        weights = F.softmax(weights, -1)

        # Sampling locations per axis, [N, Lq, M, L * P]; elementwise the same operations as
        # the official [N, Lq, M, L, P, 2] computation.
        ref = reference_points.repeat_interleave(self.n_points, dim=2)[:, :, None]  # [N, Lq, 1, L * P, 2 or 4]
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level.
            shape_lp = input_spatial_shapes.repeat_interleave(self.n_points, 0)
            loc_x = ref[..., 0] + offsets[..., 0] / shape_lp[:, 1]
            loc_y = ref[..., 1] + offsets[..., 1] / shape_lp[:, 0]
        else:
            # Offsets are in units of half the box size, scaled down by the number of points.
            loc_x = ref[..., 0] + offsets[..., 0] / self.n_points * ref[..., 2] * 0.5
            loc_y = ref[..., 1] + offsets[..., 1] / self.n_points * ref[..., 3] * 0.5

        out = _sample(value, input_spatial_shapes, input_level_start_index, loc_x, loc_y, weights)
        return self.output_proj(out) if project else out
