"""The whole DINOv network: Swin backbone -> deformable pixel decoder -> DINOv decoder head.

Attribute names follow the official checkpoints (`backbone.*`, `sem_seg_head.pixel_decoder.*`,
`sem_seg_head.predictor.*`), so the released files load without renaming.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dinov.config import DINOvConfig
from dinov.modeling.dinov_head import DINOvHead
from dinov.modeling.pixel_decoder import DeformablePixelDecoder
from dinov.modeling.swin import SwinTransformer


class SemSegHead(nn.Module):
    """Holds the pixel decoder and the decoder head under the official names."""

    def __init__(self, pixel_decoder: DeformablePixelDecoder, predictor: DINOvHead) -> None:
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor


class DINOv(nn.Module):
    pixel_mean: Tensor  # buffers, registered in __init__
    pixel_std: Tensor

    def __init__(
        self,
        backbone: SwinTransformer,
        pixel_decoder: DeformablePixelDecoder,
        head: DINOvHead,
        pixel_mean: tuple[float, float, float],
        pixel_std: tuple[float, float, float],
        size_divisibility: int = 32,
        points_per_side: int = 20,
        nms_threshold: float = 0.7,
        test_resize: tuple[int, int | None] = (800, 1333),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = SemSegHead(pixel_decoder, head)
        # Not saved in the checkpoints: the official keeps them as non-persistent buffers too.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std), persistent=False)
        self.size_divisibility = size_divisibility
        # Cross-image referring: the point grid of position queries and the box NMS of the filter.
        self.points_per_side = points_per_side
        self.nms_threshold = nms_threshold
        # (shorter side, cap of the longer side) of the images this model is meant to see.
        self.test_resize = test_resize
        # Set by dinov.build.load_model from the file: the generic score threshold its metadata carries
        # (the official demo's 0.12 when it carries none) and a readable name for model_version.
        self.default_score_threshold = 0.12
        self.model_name = "unnamed"
        # and the form of the score it was calibrated for (dinov.postprocess.region_scores)
        self.score_form = "class_probability"

    @property
    def head(self) -> DINOvHead:
        return self.sem_seg_head.predictor

    @property
    def embedding_dim(self) -> int:
        """Width of a prompt embedding (a content query, then the shape embedding with the shape extension)."""
        return self.head.embedding_dim

    def encode(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """Normalised, padded images [B, 3, H, W] -> (multi-scale features, mask features [B, C, H/4, W/4])."""
        features = self.backbone(images)
        mask_features, multi_scale = self.sem_seg_head.pixel_decoder(features)
        return multi_scale, mask_features


def build_dinov(config: DINOvConfig) -> DINOv:
    """Build the network a config describes (random weights)."""
    swin = config.swin
    backbone = SwinTransformer(
        embed_dim=swin.embed_dim,
        depths=swin.depths,
        num_heads=swin.num_heads,
        window_size=swin.window_size,
        mlp_ratio=swin.mlp_ratio,
        patch_size=swin.patch_size,
        pretrain_img_size=swin.pretrain_img_size,
        qkv_bias=swin.qkv_bias,
        drop_path_rate=swin.drop_path_rate,
        ape=swin.ape,
        patch_norm=swin.patch_norm,
    )
    pix = config.pixel_decoder
    pixel_decoder = DeformablePixelDecoder(
        in_channels=backbone.out_feature_channels,
        in_strides=backbone.out_feature_strides,
        encoder_in_features=pix.encoder_in_features,
        total_num_feature_levels=pix.total_num_feature_levels,
        conv_dim=pix.conv_dim,
        mask_dim=pix.mask_dim,
        num_encoder_layers=pix.num_encoder_layers,
        nheads=pix.nheads,
        n_points=pix.num_points,
        dim_feedforward=pix.dim_feedforward,
        common_stride=pix.common_stride,
    )
    dec = config.decoder
    head = DINOvHead(
        hidden_dim=dec.hidden_dim,
        num_queries=dec.num_queries,
        nheads=dec.nheads,
        dim_feedforward=dec.dim_feedforward,
        dec_layers=dec.dec_layers,
        mask_dim=pix.mask_dim,
        dim_proj=dec.dim_proj,
        total_num_feature_levels=dec.total_num_feature_levels,
        num_interactive_tokens=dec.num_interactive_tokens,
        num_content_tokens=dec.num_content_tokens,
        content_independent=dec.content_independent,
        shape_dim=dec.shape_dim,
    )
    return DINOv(backbone, pixel_decoder, head, config.pixel_mean, config.pixel_std, config.size_divisibility,
                 points_per_side=dec.points_per_side, nms_threshold=dec.nms_threshold,
                 test_resize=(config.test_shortest_edge, config.test_max_size))
