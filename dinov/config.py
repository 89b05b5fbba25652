"""Model configurations as plain dataclasses.

`swin_t()` and `swin_l()` equal the released configs of the official implementation
(`configs/dinov_sam_coco_train.yaml` and `configs/dinov_sam_coco_swinl_train.yaml`) in every
setting that shapes inference. `from_official_overrides()` reads the small JSON files of
the reference data (a released config name plus overridden values).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

_C = TypeVar("_C")


@dataclass(frozen=True)
class SwinConfig:
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    pretrain_img_size: int = 224
    patch_size: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ape: bool = False
    patch_norm: bool = True
    drop_path_rate: float = 0.3

    @property
    def out_channels(self) -> dict[str, int]:
        """Channels of res2..res5: the embedding width doubles at each stage."""
        return {f"res{i + 2}": self.embed_dim * 2**i for i in range(len(self.depths))}


@dataclass(frozen=True)
class PixelDecoderConfig:
    conv_dim: int = 256
    mask_dim: int = 256
    num_encoder_layers: int = 6
    # Levels refined by the deformable encoder; the released Swin-T uses res3-res5, Swin-L res2-res5.
    encoder_in_features: tuple[str, ...] = ("res3", "res4", "res5")
    # Encoder levels plus the extra stride-64 level made from the last backbone output.
    total_num_feature_levels: int = 4
    common_stride: int = 4
    nheads: int = 8
    # The official encoder takes its FFN width from the decoder's DIM_FEEDFORWARD.
    dim_feedforward: int = 2048
    num_points: int = 4


@dataclass(frozen=True)
class DecoderConfig:
    hidden_dim: int = 256
    num_queries: int = 300
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9
    total_num_feature_levels: int = 4
    num_interactive_tokens: int = 6
    num_content_tokens: int = 1
    dim_proj: int = 512
    content_independent: bool = True
    # Referring: the 20x20 point grid and the box NMS threshold of the official filter.
    points_per_side: int = 20
    nms_threshold: float = 0.7
    # The shape extension of class matching (not official; dinov/modeling/shape_encoder.py): 0 = none.
    shape_dim: int = 0


@dataclass(frozen=True)
class DINOvConfig:
    swin: SwinConfig = field(default_factory=SwinConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    pixel_mean: tuple[float, float, float] = (123.675, 116.280, 103.530)
    pixel_std: tuple[float, float, float] = (58.395, 57.120, 57.375)
    size_divisibility: int = 32
    # Inference resize the model is made for (the official MIN/MAX_SIZE_TEST: COCO's 800/1333).
    test_shortest_edge: int = 800
    test_max_size: int | None = 1333

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DINOvConfig:
        def build(klass: type[_C], values: dict[str, Any]) -> _C:
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            return klass(**values)

        return cls(
            swin=build(SwinConfig, data["swin"]),
            pixel_decoder=build(PixelDecoderConfig, data["pixel_decoder"]),
            decoder=build(DecoderConfig, data["decoder"]),
            pixel_mean=tuple(data["pixel_mean"]),
            pixel_std=tuple(data["pixel_std"]),
            size_divisibility=data["size_divisibility"],
            test_shortest_edge=data.get("test_shortest_edge", 800),
            test_max_size=data.get("test_max_size", 1333),
        )


def swin_t() -> DINOvConfig:
    """The released Swin-T model (`model_swinT.pth`, `configs/dinov_sam_coco_train.yaml`)."""
    return DINOvConfig()


def swin_l() -> DINOvConfig:
    """The released Swin-L model (`model_swinL.pth`, `configs/dinov_sam_coco_swinl_train.yaml`)."""
    return DINOvConfig(
        swin=SwinConfig(
            embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12, pretrain_img_size=384
        ),
        pixel_decoder=PixelDecoderConfig(encoder_in_features=("res2", "res3", "res4", "res5"), total_num_feature_levels=5),
        decoder=DecoderConfig(total_num_feature_levels=5),
    )


def demo() -> DINOvConfig:
    """The small model trained on generated scenes and shipped with the backend (`dinov/assets/`)."""
    return DINOvConfig(
        swin=SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7, drop_path_rate=0.0),
        pixel_decoder=PixelDecoderConfig(conv_dim=64, mask_dim=64, num_encoder_layers=2, dim_feedforward=128),
        decoder=DecoderConfig(hidden_dim=64, num_queries=30, dim_feedforward=128, dec_layers=3, dim_proj=64),
        # trained on scenes rescaled to a shorter side of 128-192 px
        test_shortest_edge=160,
        test_max_size=320,
    )


PRESETS = {"swin_t": swin_t, "swin_l": swin_l, "demo": demo}

# The released yaml files this project knows, by the name the reference configs use.
_RELEASED = {"dinov_sam_coco_train.yaml": swin_t, "dinov_sam_coco_swinl_train.yaml": swin_l}


def from_official_overrides(path: str | Path) -> DINOvConfig:
    """Read a config file of the reference data: `{"base_config": <released yaml>, "overrides": {...}}`.

    Override sections use the official yaml names (`BACKBONE.SWIN`, `ENCODER`, `DECODER`, `DIM_PROJ`).
    """
    data = json.loads(Path(path).read_text())
    base_name = data.get("base_config")
    if base_name not in _RELEASED:
        raise ValueError(f"{path}: unknown base_config {base_name!r}; expected one of {sorted(_RELEASED)}")
    config = _RELEASED[base_name]()
    overrides = data.get("overrides", {})
    known = {"BACKBONE.SWIN", "ENCODER", "DECODER", "DIM_PROJ"}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"{path}: unsupported override sections {sorted(unknown)}; supported: {sorted(known)}")

    swin = overrides.get("BACKBONE.SWIN", {})
    enc = overrides.get("ENCODER", {})
    dec = overrides.get("DECODER", {})
    swin_cfg = dataclasses.replace(
        config.swin,
        **_pick(swin, {
            "EMBED_DIM": "embed_dim", "DEPTHS": "depths", "NUM_HEADS": "num_heads", "WINDOW_SIZE": "window_size",
            "PRETRAIN_IMG_SIZE": "pretrain_img_size", "PATCH_SIZE": "patch_size", "MLP_RATIO": "mlp_ratio",
        }),
    )
    pixel_cfg = dataclasses.replace(
        config.pixel_decoder,
        **_pick(enc, {
            "CONVS_DIM": "conv_dim", "MASK_DIM": "mask_dim", "TRANSFORMER_ENC_LAYERS": "num_encoder_layers",
            "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": "encoder_in_features",
            "TOTAL_NUM_FEATURE_LEVELS": "total_num_feature_levels", "COMMON_STRIDE": "common_stride",
        }),
        **_pick(dec, {"DIM_FEEDFORWARD": "dim_feedforward", "NHEADS": "nheads"}),
    )
    decoder_cfg = dataclasses.replace(
        config.decoder,
        **_pick(dec, {
            "HIDDEN_DIM": "hidden_dim", "NUM_OBJECT_QUERIES": "num_queries", "DIM_FEEDFORWARD": "dim_feedforward",
            "DEC_LAYERS": "dec_layers", "NHEADS": "nheads", "TOTAL_NUM_FEATURE_LEVELS": "total_num_feature_levels",
            "NUM_INTERACTIVE_TOKENS": "num_interactive_tokens", "NUM_CONTENT_TOKENS": "num_content_tokens",
            "NMS_THRESHOLD": "nms_threshold", "point_per_side": "points_per_side",
        }),
        **({"dim_proj": overrides["DIM_PROJ"]} if "DIM_PROJ" in overrides else {}),
    )
    size_div = dec.get("SIZE_DIVISIBILITY", config.size_divisibility)
    return dataclasses.replace(
        config, swin=swin_cfg, pixel_decoder=pixel_cfg, decoder=decoder_cfg, size_divisibility=size_div
    )


def _pick(section: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """Map official yaml keys to dataclass fields; lists become tuples so configs stay hashable."""
    return {field_name: tuple(section[key]) if isinstance(section[key], list) else section[key]
            for key, field_name in names.items() if key in section}
