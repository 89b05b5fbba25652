"""Training and evaluation data: generated scenes and loaders for Label Studio and COCO exports.

Every source yields :class:`~dinov.data.scenes.Scene` samples: an RGB uint8 image with its instances
(bool masks, class ids, xyxy pixel boxes).
"""

from .scenes import Scene, SceneDataset, class_names, generate_scene

Sample = Scene  # the common sample type, whatever the source

__all__ = ["Sample", "Scene", "SceneDataset", "class_names", "generate_scene"]
