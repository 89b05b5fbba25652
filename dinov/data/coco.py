"""COCO instance annotations (polygons, uncompressed or compressed RLE, or boxes) as samples.

No pycocotools needed: polygons are rasterised by pixel centres (the same rule as the generated
scenes), RLE counts are decoded here.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .labelstudio_export import find_image, load_rgb
from .scenes import Scene, masks_to_boxes, polygon_mask


def decode_rle_string(counts: str | bytes) -> list[int]:
    """COCO's compressed RLE string -> run lengths. Each run is a signed number in 5-bit groups
    (ASCII 48 + bits, bit 0x20 = more groups follow); from the fourth run on, numbers are stored
    as the difference to the run two places back."""
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs: list[int] = []
    p = 0
    while p < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("truncated COCO RLE string")
            c = ord(counts[p]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value -= 1 << shift  # sign-extend the last group
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def encode_rle_string(runs: Sequence[int]) -> str:
    """Run lengths -> COCO's compressed RLE string (the inverse of :func:`decode_rle_string`)."""
    out = []
    for i, run in enumerate(runs):
        value = int(run) - (int(runs[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = value & 0x1F
            value >>= 5
            more = value != -1 if c & 0x10 else value != 0
            out.append(chr(48 + (c | 0x20 if more else c)))
    return "".join(out)


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE ({"size": [h, w], "counts": list or string}) -> bool [h, w]. Runs alternate 0s and
    1s, starting with 0s, over the pixels in column-major order."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"COCO RLE needs 'size': [h, w] and 'counts', got {rle!r:.200}") from e
    runs = decode_rle_string(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if sum(runs) != height * width or min(runs, default=0) < 0:
        raise ValueError(f"COCO RLE runs add up to {sum(runs)} pixels, not {height} x {width}")
    values = np.arange(len(runs)) % 2 == 1
    flat = np.repeat(values, runs)
    return flat.reshape(width, height).T.copy()


def mask_to_rle(mask: np.ndarray, compressed: bool = False) -> dict:
    """bool [h, w] -> COCO RLE ({"size", "counts"}), counts a list or, compressed, a string."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [len(flat)]])
    runs = np.diff(edges).tolist()
    if len(flat) and flat[0]:
        runs = [0] + runs  # the first run counts 0s
    counts = encode_rle_string(runs) if compressed else runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def segmentation_to_mask(segmentation: list[list[float]] | dict, size: tuple[int, int]) -> np.ndarray:
    """A COCO "segmentation" (list of flat polygons [x0, y0, x1, y1, ...] or an RLE dict) -> bool [H, W]."""
    if isinstance(segmentation, dict):
        mask = rle_to_mask(segmentation)
        if mask.shape != tuple(size):
            raise ValueError(f"RLE of size {mask.shape} for an image of size {tuple(size)}")
        return mask
    if isinstance(segmentation, list):
        mask = np.zeros(size, dtype=bool)
        for polygon in segmentation:
            if len(polygon) % 2 or len(polygon) < 6:
                raise ValueError(f"a COCO polygon needs an even number (>= 6) of coordinates, got {len(polygon)}")
            mask |= polygon_mask(np.asarray(polygon, dtype=np.float64).reshape(-1, 2), size)
        return mask
    raise ValueError(f"unknown COCO segmentation {type(segmentation).__name__}: expected polygons or RLE")


class CocoDataset(Sequence[Scene]):
    """Samples of a COCO instances file; images are read lazily, one per item.

    class_names: the categories to keep, in class-id order (default: all, by category id);
      annotations of other categories are left out.
    include_crowd: keep iscrowd annotations as instances (they are left out by default).
    """

    def __init__(self, annotation_file: str | Path, images_dir: str | Path,
                 class_names: Sequence[str] | None = None, include_crowd: bool = False) -> None:
        self.annotation_file = Path(annotation_file)
        self.images_dir = Path(images_dir)
        with open(self.annotation_file, encoding="utf-8") as f:
            coco = json.load(f)
        if not isinstance(coco, dict) or not {"images", "annotations", "categories"} <= coco.keys():
            raise ValueError(f"{self.annotation_file} is not a COCO instances file "
                             "(a JSON object with 'images', 'annotations' and 'categories')")
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        by_name = {c["name"]: c["id"] for c in categories}
        if class_names is None:
            class_names = [c["name"] for c in categories]
        missing = [n for n in class_names if n not in by_name]
        if missing:
            raise ValueError(f"classes {missing} are not categories of {self.annotation_file}; "
                             f"its categories are {sorted(by_name)}")
        self.class_names = list(class_names)
        class_of_category = {by_name[n]: i for i, n in enumerate(self.class_names)}

        per_image: dict[int, list[dict]] = {img["id"]: [] for img in coco["images"]}
        for ann in sorted(coco["annotations"], key=lambda a: a.get("id", 0)):
            if ann["category_id"] not in class_of_category:
                continue
            if ann.get("iscrowd", 0) and not include_crowd:
                continue
            if ann["image_id"] not in per_image:
                raise ValueError(f"annotation {ann.get('id')} refers to unknown image {ann['image_id']}")
            per_image[ann["image_id"]].append(ann)
        self._images = sorted(coco["images"], key=lambda i: i["id"])
        self._annotations = per_image
        self._class_of_category = class_of_category

    def __len__(self) -> int:
        return len(self._images)

    def image_path(self, index: int) -> Path:
        return find_image(self._images[index]["file_name"], self.images_dir)

    def __getitem__(self, index: int) -> Scene:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        info = self._images[index]
        image = load_rgb(self.image_path(index))
        size = image.shape[:2]
        if "height" in info and "width" in info and (info["height"], info["width"]) != size:
            raise ValueError(f"{info['file_name']} is {size[1]}x{size[0]} but the annotations say "
                             f"{info['width']}x{info['height']}")
        masks, classes = [], []
        for ann in self._annotations[info["id"]]:
            if ann.get("segmentation"):
                mask = segmentation_to_mask(ann["segmentation"], size)
            elif "bbox" in ann:  # detection-only data: the box is the mask
                x, y, w, h = ann["bbox"]
                mask = polygon_mask([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], size)
            else:
                raise ValueError(f"annotation {ann.get('id')} has neither 'segmentation' nor 'bbox'")
            if not mask.any():
                warnings.warn(f"annotation {ann.get('id')} of {info['file_name']} covers no pixel; left out", stacklevel=2)
                continue
            masks.append(mask)
            classes.append(self._class_of_category[ann["category_id"]])
        masks_arr = np.stack(masks) if masks else np.zeros((0, *size), dtype=bool)
        return Scene(image=image, masks=masks_arr, classes=np.asarray(classes, dtype=np.int64),
                     boxes=masks_to_boxes(masks_arr))

    def __iter__(self) -> Iterator[Scene]:
        for i in range(len(self)):
            yield self[i]


def load_coco(annotation_file: str | Path, images_dir: str | Path, class_names: Sequence[str] | None = None,
              include_crowd: bool = False) -> CocoDataset:
    """Read a COCO instances JSON; see :class:`CocoDataset`."""
    return CocoDataset(annotation_file, images_dir, class_names, include_crowd)


def write_coco(samples: Sequence[Scene], class_names: Sequence[str], out_dir: str | Path,
               segmentation: str = "polygon_box") -> Path:
    """Write samples as PNG images plus a COCO instances file (mostly for tests); returns its path.

    segmentation: "rle" (uncompressed), "compressed_rle", or "polygon_box" (each instance's box as
    a polygon, which is exact only for rectangular masks).
    """
    from PIL import Image

    if segmentation not in ("rle", "compressed_rle", "polygon_box"):
        raise ValueError(f"segmentation must be 'rle', 'compressed_rle' or 'polygon_box', got {segmentation!r}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for i, sample in enumerate(samples):
        name = f"{i:05d}.png"
        Image.fromarray(sample.image).save(out_dir / "images" / name)
        height, width = sample.image.shape[:2]
        images.append({"id": i + 1, "file_name": name, "height": height, "width": width})
        for mask, label, box in zip(sample.masks, sample.classes, sample.boxes):
            x0, y0, x1, y1 = (float(v) for v in box)
            seg: list[list[float]] | dict
            if segmentation == "polygon_box":
                seg = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            else:
                seg = mask_to_rle(mask, compressed=segmentation == "compressed_rle")
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                                "segmentation": seg, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": int(mask.sum()), "iscrowd": 0})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]
    path = out_dir / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path
