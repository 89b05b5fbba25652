"""Image and prompt-mask preprocessing, as the official model expects its inputs.

Images are RGB with values 0-255, resized so that the shorter side is `shortest_edge` (the longer
side capped at `max_size`), normalised with the ImageNet mean/std (in 0-255 units) and zero-padded
at the bottom and right, after normalisation, to a multiple of 32.

The official code resizes in two ways: its COCO evaluation (the published numbers) uses the
shorter side 800 with the longer capped at 1333 and PIL bilinear; its demo uses the shorter side
640, no cap, PIL bicubic, and resizes the prompt masks with the same bicubic transform. We default
to 800/1333 with bilinear images and nearest-neighbour masks (a resized prompt mask stays binary);
both are settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


class InputError(ValueError):
    """An image or prompt the model cannot take; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class ResizeConfig:
    shortest_edge: int | None = 800  # None: keep the image's own size
    max_size: int | None = 1333  # None: no cap on the longer side (the official demo)
    image_interpolation: str = "bilinear"
    mask_interpolation: str = "nearest"

    def __post_init__(self) -> None:
        for name in (self.image_interpolation, self.mask_interpolation):
            if name not in INTERPOLATIONS:
                raise ValueError(f"unknown interpolation {name!r}; use one of {sorted(INTERPOLATIONS)}")
        if self.shortest_edge is not None and self.shortest_edge < 32:
            raise ValueError(f"shortest_edge must be at least 32, got {self.shortest_edge}")


# The official demo's preprocessing, for comparing with its figures.
OFFICIAL_DEMO_RESIZE = ResizeConfig(shortest_edge=640, max_size=None, image_interpolation="bicubic",
                                    mask_interpolation="bicubic")


def resized_size(height: int, width: int, resize: ResizeConfig) -> tuple[int, int]:
    """Output (height, width) for a resize of the shorter side, rounding as detectron2 does."""
    if resize.shortest_edge is None:
        return height, width
    scale = resize.shortest_edge / min(height, width)
    if resize.max_size is not None and max(height, width) * scale > resize.max_size:
        scale = resize.max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def as_rgb_uint8(image: np.ndarray | Image.Image) -> np.ndarray:
    """Validate an RGB image and return it as a contiguous uint8 array [H, W, 3]."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise InputError(
                f"image has PIL mode {image.mode!r}; convert it to RGB first (e.g. image.convert('RGB'))"
            )
        image = np.asarray(image)
    if not isinstance(image, np.ndarray):
        raise InputError(f"image must be a numpy array or a PIL image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(
            f"image must be RGB with shape [H, W, 3], got shape {tuple(image.shape)}; "
            "convert grayscale or RGBA images to RGB first"
        )
    if image.dtype != np.uint8:
        raise InputError(
            f"image must be 8-bit (uint8), got {image.dtype}; scale 16-bit or float images to 0-255 uint8 first"
        )
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise InputError(f"image is too small: {image.shape[1]}x{image.shape[0]} pixels")
    return np.ascontiguousarray(image)


def resize_image(image: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resize an RGB uint8 image [H, W, 3] to `size` = (height, width) with PIL."""
    if image.shape[:2] == tuple(size):
        return image
    pil = Image.fromarray(image).resize((size[1], size[0]), INTERPOLATIONS[interpolation])
    return np.asarray(pil)


def resize_mask(mask: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resize a boolean mask [H, W]; returns float32 in [0, 1] (binary for nearest)."""
    if mask.shape == tuple(size):
        return mask.astype(np.float32)
    pil = Image.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), INTERPOLATIONS[interpolation])
    return np.asarray(pil).astype(np.float32) / 255.0


def normalize_and_pad(
    images: list[torch.Tensor],
    pixel_mean: torch.Tensor,
    pixel_std: torch.Tensor,
    size_divisibility: int,
    pad_to: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Normalise uint8/float CHW images and zero-pad them into one batch [B, 3, Hp, Wp].

    Padding comes after normalisation, as in the official model (the pad value is 0 in
    normalised units). `pad_to` forces a common padded size, e.g. for a batch bucket.
    """
    max_h = max(img.shape[-2] for img in images)
    max_w = max(img.shape[-1] for img in images)
    if pad_to is not None:
        max_h, max_w = max(max_h, pad_to[0]), max(max_w, pad_to[1])
    padded_h = -(-max_h // size_divisibility) * size_divisibility
    padded_w = -(-max_w // size_divisibility) * size_divisibility
    mean = pixel_mean.view(3, 1, 1)
    std = pixel_std.view(3, 1, 1)
    batch = []
    for img in images:
        normalized = (img.to(mean.dtype) - mean) / std
        batch.append(F.pad(normalized, (0, padded_w - img.shape[-1], 0, padded_h - img.shape[-2])))
    return torch.stack(batch)


def padded_size(height: int, width: int, size_divisibility: int) -> tuple[int, int]:
    return (-(-height // size_divisibility) * size_divisibility, -(-width // size_divisibility) * size_divisibility)
