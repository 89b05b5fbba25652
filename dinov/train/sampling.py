"""Training samples: scenes rescaled (and cropped) to the training resolution, scribbles inside instances, and the
endless random batches a run draws (with shared classes across a batch's images when asked)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import masks_to_boxes

from dinov.data.scenes import NUM_CLASSES, Scene, SceneDataset, generate_scene
from dinov.train.config import TrainConfig
from dinov.transforms import resize_image, resize_mask


@dataclass
class Sample:
    """A training image with its instances, all at the training resolution."""

    image: Tensor  # uint8 [3, H, W]
    masks: Tensor  # bool [N, H, W]
    classes: Tensor  # int64 [N]
    has_mask: Tensor | None = None  # bool [N]; False: masks[i] is a filled box, which supervises the box only


def prepare_sample(scene: Scene, rng: np.random.Generator, min_size: int, max_size: int,
                   crop_size: int = 0) -> Sample | None:
    """Rescale a scene to a random training size (then, with ``crop_size``, cut a random square of that side
    from it) and drop instances that vanish; None if none is left."""
    height, width = scene.image.shape[:2]
    short = int(rng.integers(max(min_size, crop_size), max(max_size, crop_size) + 1))
    scale = short / min(height, width)
    size = (max(32, int(round(height * scale))), max(32, int(round(width * scale))))
    image = resize_image(scene.image, size, "bilinear")
    masks = np.stack([resize_mask(m, size, "nearest") > 0.5 for m in scene.masks]) if len(scene.masks) else \
        np.zeros((0, *size), bool)
    if crop_size:
        image, masks = random_crop(image, masks, crop_size, rng)
    keep = masks.reshape(len(masks), -1).sum(1) >= 16
    if not keep.any():
        return None
    has_mask = None if scene.has_mask is None else torch.as_tensor(np.asarray(scene.has_mask, bool)[keep])
    return Sample(
        image=torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1),
        masks=torch.from_numpy(masks[keep]),
        classes=torch.as_tensor(np.asarray(scene.classes)[keep], dtype=torch.long),
        has_mask=has_mask,
    )


def random_crop(image: np.ndarray, masks: np.ndarray, size: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """The same random size x size window of an image [H, W, 3] and its masks [N, H, W] (H, W >= size)."""
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from a {width}x{height} image")
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return image[top:top + size, left:left + size], masks[:, top:top + size, left:left + size]


def scribble_inside(mask: Tensor, rng: np.random.Generator) -> Tensor:
    """A thin random stroke inside an instance: what an annotator's brush scribble looks like."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(ys) < 8:
        return mask
    a, b = rng.integers(0, len(ys), size=2)
    steps = 32
    t = torch.linspace(0, 1, steps)
    py = (ys[a] * (1 - t) + ys[b] * t).round().long()
    px = (xs[a] * (1 - t) + xs[b] * t).round().long()
    stroke = torch.zeros_like(mask)
    radius = 1 + int(rng.integers(0, 3))
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            stroke[(py + dy).clamp(0, mask.shape[0] - 1), (px + dx).clamp(0, mask.shape[1] - 1)] = True
    stroke &= mask
    return stroke if stroke.sum() >= 4 else mask


def mask_to_box(mask: Tensor) -> Tensor:
    """Tight xyxy box (x1, y1 exclusive, as the scenes' boxes) of a non-empty bool mask, in pixels."""
    return masks_to_boxes(mask[None])[0].float() + torch.tensor([0.0, 0.0, 1.0, 1.0])


def batches(dataset: Sequence[Scene], config: TrainConfig, rng: np.random.Generator) -> Iterator[list[Sample]]:
    """Endless random batches of prepared samples.

    With ``config.batch_classes`` and generated scenes, each batch's scenes are drawn (from the dataset's seeds)
    with objects of one random subset of that many classes, so that every class of the batch tends to recur on
    several of its images."""
    while True:
        subset = None
        if config.batch_classes > 0 and isinstance(dataset, SceneDataset):
            subset = np.sort(rng.choice(NUM_CLASSES, size=min(config.batch_classes, NUM_CLASSES), replace=False))
        batch: list[Sample] = []
        while len(batch) < config.batch_size:
            index = int(rng.integers(0, len(dataset)))
            if subset is not None:
                assert isinstance(dataset, SceneDataset)  # a class subset is drawn for generated scenes only
                scene = generate_scene(int(dataset.seeds[index]), dataset.size, dataset.num_objects,
                                       classes=subset.tolist())
            else:
                scene = dataset[index]
            sample = prepare_sample(scene, rng, config.min_size, config.max_size, config.crop_size)
            if sample is not None:
                batch.append(sample)
        yield batch
