"""Sine position embedding of DETR, generalised to images (Carion et al., 2020)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine/cosine embedding: ``num_pos_feats`` channels for y, then as many for x.

    Args:
        num_pos_feats: channels per axis (the output has twice as many).
        temperature: base of the geometric progression of wavelengths.
        normalize: scale the cumulative coordinates of each image to (0, ``scale``].
        scale: range after normalisation; 2 * pi when not given.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000,
        normalize: bool = False,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale only applies with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def _embed(self, coords: Tensor) -> Tensor:
        """[..., num_pos_feats]: sin on even channels, cos on odd, channel pairs share a wavelength."""
        dim_t = torch.arange(self.num_pos_feats, dtype=coords.dtype, device=coords.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        angles = coords[..., None] / dim_t
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), -1).flatten(-2)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            x: [B, C, H, W]; only its batch size, size, device and dtype are used.
            mask: optional [B, H, W] bool, True at padding (padding does not advance the
                coordinates). None means no padding.

        Returns:
            [B, 2 * num_pos_feats, H, W] in ``x``'s dtype.
        """
        b, _, h, w = x.shape
        eps = 1e-6
        if mask is None:
            # Without padding the y embedding depends on the row only and x on the column
            # only: embed each once and broadcast (same numbers as the masked path).
            y = torch.arange(1, h + 1, dtype=x.dtype, device=x.device)
            xs = torch.arange(1, w + 1, dtype=x.dtype, device=x.device)
            if self.normalize:
                y = y / (y[-1:] + eps) * self.scale
                xs = xs / (xs[-1:] + eps) * self.scale
            pos_y = self._embed(y).T[:, :, None].expand(-1, h, w)
            pos_x = self._embed(xs).T[:, None, :].expand(-1, h, w)
            return torch.cat((pos_y, pos_x), 0)[None].expand(b, -1, -1, -1)

        if mask.shape != (b, h, w):
            raise ValueError(f"mask must be [B, H, W] = {(b, h, w)}, got {tuple(mask.shape)}")
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=x.dtype)
        xs = not_mask.cumsum(2, dtype=x.dtype)
        if self.normalize:
            y = y / (y[:, -1:, :] + eps) * self.scale
            xs = xs / (xs[:, :, -1:] + eps) * self.scale
        return torch.cat((self._embed(y), self._embed(xs)), -1).permute(0, 3, 1, 2)
