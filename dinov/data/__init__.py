"""Training and evaluation data: generated scenes and loaders for Label Studio and COCO exports.

Every source yields :class:`~dinov.data.scenes.Scene` samples: an RGB uint8 image with its instances
(bool masks [N, H, W], class ids [N], xyxy pixel boxes [N, 4]); each dataset has ``class_names``.
"""

from __future__ import annotations

from .coco import CocoDataset, load_coco, write_coco
from .labelstudio_export import LabelStudioDataset, load_labelstudio_export, write_labelstudio_export
from .scenes import Scene, SceneDataset, class_names, generate_scene

Sample = Scene  # the common sample type, whatever the source

__all__ = [
    "CocoDataset",
    "LabelStudioDataset",
    "Sample",
    "Scene",
    "SceneDataset",
    "class_names",
    "generate_scene",
    "load_coco",
    "load_labelstudio_export",
    "write_coco",
    "write_labelstudio_export",
]
