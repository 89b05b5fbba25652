"""MaskDINO's pixel decoder as used by DINOv: a deformable transformer encoder over the
backbone levels plus a one-step FPN to the stride-4 mask features.

Data flow (Swin-T layout): res3, res4, res5 are projected to ``conv_dim`` channels (1x1 conv
+ GroupNorm), a strided 3x3 conv on res5 adds a stride-64 level, a stack of deformable
self-attention layers mixes all levels, and the highest-resolution level, upsampled and
added to a projection of res2, gives the mask features. The Swin-L layout runs the encoder
on res2..res5 (plus stride 64) and the FPN step adds res2 at the same size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused import inference_fusable, residual_feed_forward, residual_linear_norm
from .ms_deform_attn import MSDeformAttn
from .position_encoding import PositionEmbeddingSine

GROUP_NORM_GROUPS = 32  # the official "GN" norm


class Conv2dNorm(nn.Conv2d):
    """Conv2d followed by a norm and an optional ReLU; keys ``weight``, ``bias``, ``norm.*``
    like detectron2's ``Conv2d``, so the released checkpoints load."""

    def __init__(self, *args: Any, norm: nn.Module, relu: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention then a ReLU FFN."""

    def __init__(
        self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        if inference_fusable(src) and src.dim() == 3:
            # Inference: everything after the sampling is row-wise; run it in cached row blocks.
            n, length, c = src.shape
            sampled = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index,
                                     padding_mask, project=False)
            src2d = residual_linear_norm(src.reshape(-1, c), sampled.reshape(n * length, -1),
                                         self.self_attn.output_proj, self.norm1)
            out = residual_feed_forward(src2d, self.linear1, self.linear2, torch.relu_, norm_out=self.norm2,
                                        out=src2d)
            return out.view(n, length, c)
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        # In-place ReLU spares a large temporary (the pre-activation is not needed for autograd).
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src), inplace=True)))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnEncoder(nn.Module):
    """A stack of :class:`MSDeformAttnEncoderLayer` (state_dict prefix ``layers.N``)."""

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        d_ffn: int,
        dropout: float,
        n_levels: int,
        n_heads: int,
        n_points: int,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points) for _ in range(num_layers)
        )

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableTransformerEncoder(nn.Module):
    """Flattens the levels, adds position + level embeddings and runs the encoder
    (the official ``MSDeformAttnTransformerEncoderOnly``: keys ``level_embed``, ``encoder.*``)."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        num_encoder_layers: int,
        dim_feedforward: int,
        dropout: float,
        num_feature_levels: int,
        enc_n_points: int,
    ) -> None:
        super().__init__()
        self.encoder = MSDeformAttnEncoder(
            num_encoder_layers, d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
        """[S, 2] normalised (x, y) of every pixel centre, level after level."""
        points = []
        for h, w in spatial_shapes:
            y = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            x = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
            points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), -1))
        return torch.cat(points, 0)

    def forward(self, srcs: Sequence[Tensor], pos_embeds: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            srcs, pos_embeds: per level [B, C, H_l, W_l]. The official model always calls this
                without padding masks (every position valid), as here.

        Returns:
            memory [B, S, C], spatial_shapes [L, 2] (H, W), level_start_index [L].
        """
        shapes = [(src.shape[2], src.shape[3]) for src in srcs]
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        pos_flatten = torch.cat(
            [pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, pos in enumerate(pos_embeds)],
            1,
        )
        device = src_flatten.device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        # Without padding every level's valid ratio is 1: the same point on every level.
        num_levels = len(srcs)
        ref = self.reference_points(shapes, device)
        ref = ref[None, :, None, :].expand(src_flatten.shape[0], -1, num_levels, -1)
        memory = self.encoder(src_flatten, pos_flatten, ref, spatial_shapes, level_start_index)
        return memory, spatial_shapes, level_start_index


class DeformablePixelDecoder(nn.Module):
    """The official ``MaskDINOEncoder`` (``sem_seg_head.pixel_decoder``), without padding masks.

    Args:
        in_channels: channels of each backbone feature the decoder reads, by name
            (Swin-T: ``{"res2": 96, "res3": 192, "res4": 384, "res5": 768}``).
        in_strides: stride of each of those features (``{"res2": 4, ..., "res5": 32}``).
        encoder_in_features: features that enter the deformable encoder (Swin-T:
            res3..res5; Swin-L: res2..res5).
        total_num_feature_levels: encoder levels; those beyond ``encoder_in_features`` are
            made by strided 3x3 convs from the lowest-resolution one (4 for Swin-T, 5 for Swin-L).
        conv_dim: channels of the encoder and of the multi-scale outputs.
        mask_dim: channels of the mask features.
        num_encoder_layers: deformable encoder layers.
        nheads, n_points, dim_feedforward, dropout: of the encoder layers (the official
            config takes nheads, dim_feedforward and dropout from its DECODER section).
        common_stride: stride of the mask features.
        feature_order: "low2high" (released models: multi-scale outputs from high to low
            resolution) or "high2low" (reverse order of the encoder levels).
    """

    def __init__(
        self,
        in_channels: Mapping[str, int],
        in_strides: Mapping[str, int],
        *,
        encoder_in_features: Sequence[str] = ("res3", "res4", "res5"),
        total_num_feature_levels: int = 4,
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_encoder_layers: int = 6,
        nheads: int = 8,
        n_points: int = 4,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        common_stride: int = 4,
        feature_order: str = "low2high",
    ) -> None:
        super().__init__()
        if set(in_channels) != set(in_strides):
            raise ValueError(f"in_channels {sorted(in_channels)} and in_strides {sorted(in_strides)} name different features")
        missing = [f for f in encoder_in_features if f not in in_channels]
        if not encoder_in_features or missing:
            raise ValueError(f"encoder_in_features {list(encoder_in_features)} must be non-empty names from {sorted(in_channels)}")
        if total_num_feature_levels < len(encoder_in_features):
            raise ValueError(
                f"total_num_feature_levels ({total_num_feature_levels}) is less than the "
                f"{len(encoder_in_features)} encoder_in_features"
            )
        if feature_order not in ("low2high", "high2low"):
            raise ValueError(f"feature_order must be 'low2high' or 'high2low', got {feature_order!r}")
        if conv_dim % GROUP_NORM_GROUPS or conv_dim % 2:
            raise ValueError(f"conv_dim ({conv_dim}) must be a multiple of {GROUP_NORM_GROUPS} (GroupNorm groups)")

        # All features by increasing stride (res2 first): the FPN reads them in this order.
        self.in_features = sorted(in_channels, key=lambda f: in_strides[f])
        by_stride = sorted(encoder_in_features, key=lambda f: in_strides[f])
        self.feature_order = feature_order
        # Order of the encoder's backbone levels (and of input_proj): increasing stride for
        # low2high, decreasing for high2low.
        self.encoder_in_features = by_stride if feature_order == "low2high" else by_stride[::-1]
        # Extra levels are made from the lowest-resolution encoder feature.
        self.extra_level_source = by_stride[-1]
        self.num_extra_levels = total_num_feature_levels - len(encoder_in_features)
        self.total_num_feature_levels = total_num_feature_levels
        self.common_stride = common_stride

        proj = [
            nn.Sequential(nn.Conv2d(in_channels[f], conv_dim, kernel_size=1), nn.GroupNorm(GROUP_NORM_GROUPS, conv_dim))
            for f in self.encoder_in_features
        ]
        channels = in_channels[self.extra_level_source]
        for _ in range(self.num_extra_levels):
            proj.append(
                nn.Sequential(
                    nn.Conv2d(channels, conv_dim, kernel_size=3, stride=2, padding=1),
                    nn.GroupNorm(GROUP_NORM_GROUPS, conv_dim),
                )
            )
            channels = conv_dim
        self.input_proj = nn.ModuleList(proj)
        for p in self.input_proj:
            conv = p[0]  # type: ignore[index]  # each projection is an nn.Sequential(conv, norm)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)

        self.transformer = DeformableTransformerEncoder(
            d_model=conv_dim,
            nhead=nheads,
            num_encoder_layers=num_encoder_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            num_feature_levels=total_num_feature_levels,
            enc_n_points=n_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        _c2_xavier_fill(self.mask_features)

        # FPN steps from the encoder's finest level down to common_stride (at least one).
        finest_stride = in_strides[by_stride[0]]
        self.num_fpn_levels = max(int(math.log2(finest_stride) - math.log2(common_stride)), 1)
        # adapter_i / layer_i process in_features[i - 1] (adapter_1 is res2).
        for i, f in enumerate(self.in_features[: self.num_fpn_levels], start=1):
            adapter = Conv2dNorm(in_channels[f], conv_dim, kernel_size=1, bias=False, norm=nn.GroupNorm(GROUP_NORM_GROUPS, conv_dim))
            layer = Conv2dNorm(
                conv_dim, conv_dim, kernel_size=3, padding=1, bias=False, norm=nn.GroupNorm(GROUP_NORM_GROUPS, conv_dim), relu=True
            )
            _c2_xavier_fill(adapter)
            _c2_xavier_fill(layer)
            self.add_module(f"adapter_{i}", adapter)
            self.add_module(f"layer_{i}", layer)

    def forward(self, features: Mapping[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """
        Args:
            features: backbone outputs by name, [B, C_f, H / stride_f, W / stride_f] (from an
                image padded to a multiple of 32, as the official model uses).

        Returns:
            mask_features: [B, mask_dim, H / common_stride, W / common_stride].
            multi_scale_features: the ``total_num_feature_levels`` encoder outputs, each
                [B, conv_dim, h, w], in the encoder's level order: for low2high from the
                highest resolution (Swin-T: strides 8, 16, 32, 64; Swin-L: 4, ..., 64).
        """
        missing = [f for f in self.in_features if f not in features]
        if missing:
            raise KeyError(f"pixel decoder needs backbone features {self.in_features}; missing {missing}")
        # Like the official code, the decoder always runs in fp32 (no autocast).
        with torch.autocast(device_type=features[self.in_features[0]].device.type, enabled=False):
            return self._forward(features)

    def _forward(self, features: Mapping[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        n_enc = len(self.encoder_in_features)
        srcs = [self.input_proj[i](features[f].float()) for i, f in enumerate(self.encoder_in_features)]
        extras = []
        x = features[self.extra_level_source].float()
        for proj in self.input_proj[n_enc:]:
            x = proj(x)
            extras.append(x)
        # The official code lists the extra levels coarsest first.
        extras = extras[::-1]
        srcs = srcs + extras if self.feature_order == "low2high" else extras + srcs
        # The sine embedding depends only on the size of each level.
        pos = [self.pe_layer(src) for src in srcs]

        memory, spatial_shapes, level_start_index = self.transformer(srcs, pos)
        b, _, c = memory.shape
        sizes = [h * w for h, w in spatial_shapes.tolist()]
        # [B, C, H, W] views of the token rows, channels innermost. Built by a permute, not transpose + view: with
        # one image the view's batch stride comes out as C, and the bilinear upsampling below then misses its
        # channels-last kernel (82 instead of 14 ms for the stride-8 level of a 640x853 image).
        out = [
            z.view(b, h, w, c).permute(0, 3, 1, 2)
            for z, (h, w) in zip(memory.split(sizes, dim=1), spatial_shapes.tolist())
        ]
        multi_scale_features = out[: self.total_num_feature_levels]

        # FPN steps, coarsest first. Like the official code, each step upsamples out[0]
        # (low2high: the finest encoder level) or out[-1] (high2low: the finest encoder
        # level, then the previous step's output); equal when there is one step.
        for i in range(self.num_fpn_levels, 0, -1):
            lateral = getattr(self, f"adapter_{i}")(features[self.in_features[i - 1]].float())
            coarse = out[0] if self.feature_order == "low2high" else out[-1]
            up = F.interpolate(coarse, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            out.append(getattr(self, f"layer_{i}")(lateral + up))
        return self.mask_features(out[-1]), multi_scale_features


def _c2_xavier_fill(module: nn.Conv2d) -> None:
    # Caffe2's "XavierFill" as detectron2 applies it: kaiming uniform with a=1, zero bias.
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
