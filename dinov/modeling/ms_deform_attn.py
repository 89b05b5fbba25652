"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021) in plain PyTorch.

Each query looks at ``n_points`` learned sampling locations around its reference point on
every feature level, reads the value there by bilinear interpolation and mixes the samples
with softmax weights. The official code runs a compiled CUDA op, or on CPU a loop of
``F.grid_sample`` calls; here the bilinear reads and the weighted sum are done together by
one ``F.embedding_bag`` call, which is several times faster on CPU, works on any device, and
computes the same numbers (the sampling coordinates are rounded like grid_sample's).
"""

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
    n, s, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    device = value.device
    heights = spatial_shapes[:, 0].view(num_levels, 1)
    widths = spatial_shapes[:, 1].view(num_levels, 1)
    size_xy = torch.stack([widths, heights], -1)  # [L, 1, 2], broadcasts over points

    # Pixel coordinates (pixel centres at integers). grid_sample's CPU kernel maps the grid
    # g = 2 * loc - 1 with one fused multiply-add, (g + 1) * size / 2 - 0.5; doing that
    # in float64 and rounding once reproduces its coordinates bit for bit.
    coord_dtype = sampling_locations.dtype if sampling_locations.dtype == torch.float64 else torch.float32
    grid = 2 * sampling_locations.to(coord_dtype) - 1
    xy = ((grid + 1).double() * (size_xy.double() / 2) - 0.5).to(coord_dtype)
    size_f = size_xy.to(coord_dtype)
    # Points further out than one pixel read nothing either way; clamping keeps the
    # integer corner indices small.
    xy = torch.minimum(xy.clamp(min=-1), size_f)
    xy0 = xy.floor()
    frac = xy - xy0
    # Weights of the lower and upper corner along each axis, zero where the corner is outside.
    w_lo = (1 - frac) * ((xy0 >= 0) & (xy0 < size_f))
    w_hi = frac * (xy0 < size_f - 1)
    wx = torch.stack([w_lo[..., 0], w_hi[..., 0]], -1)
    wy = torch.stack([w_lo[..., 1], w_hi[..., 1]], -1) * attention_weights.to(coord_dtype)[..., None]
    weights = (wy[..., :, None] * wx[..., None, :]).to(value.dtype)  # [N, Lq, M, L, P, 2, 2]

    # Row of the top-left corner in value viewed as a [N * S * M, D] table.
    index_dtype = torch.int32 if n * s * m < 2**31 else torch.int64
    xy0_i = xy0.to(index_dtype)
    widths_i = widths.to(index_dtype)
    pixel = level_start_index.to(index_dtype).view(num_levels, 1) + xy0_i[..., 1] * widths_i + xy0_i[..., 0]
    batch_offset = (torch.arange(n, device=device, dtype=index_dtype) * s).view(n, 1, 1, 1, 1)
    head = torch.arange(m, device=device, dtype=index_dtype).view(1, 1, m, 1, 1)
    top_left = (pixel + batch_offset) * m + head
    corner_step = torch.stack([torch.zeros_like(widths_i), torch.ones_like(widths_i), widths_i, widths_i + 1], -1)
    corner_step = corner_step.view(num_levels, 1, 2, 2) * m
    # Outside corners carry zero weight; clamping just keeps their index valid.
    rows = (top_left[..., None, None] + corner_step).clamp_(0, n * s * m - 1)

    bag = num_levels * num_points * 4
    out = F.embedding_bag(
        rows.view(-1, bag), value.reshape(n * s * m, d), mode="sum", per_sample_weights=weights.reshape(-1, bag)
    )
    return out.view(n, lq, m * d)


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
        offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, len_q, self.n_heads, self.n_levels, self.n_points)

        ref = reference_points[:, :, None, :, None, :]
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level.
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            locations = ref + offsets / normalizer[None, None, None, :, None, :]
        else:
            # Offsets are in units of half the box size, scaled down by the number of points.
            locations = ref[..., :2] + offsets / self.n_points * ref[..., 2:] * 0.5

        out = ms_deform_attn_core(value, input_spatial_shapes, input_level_start_index, locations, weights)
        return self.output_proj(out)
