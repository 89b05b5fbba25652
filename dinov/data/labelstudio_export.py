"""Label Studio JSON exports (brush, polygon, rectangle and ellipse regions) as samples.

An export is a list of tasks; each task names its image in ``data`` and holds ``annotations``
whose ``result`` lists the regions. Region geometry is in percent of the image size (brush: an RLE
of the RGBA layer, decoded with ``label_studio_sdk.converter.brush``). Images are looked up in a
local folder by the file name in the task's URL (``/data/upload/3/1a2b3c4d-cat.png``,
``/data/local-files/?d=images/cat.png``, ``s3://bucket/cat.png``, ...), with or without the
8-character prefix Label Studio adds to uploads.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
from PIL import Image, ImageOps

from .scenes import Scene, masks_to_boxes, polygon_mask

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")  # Label Studio prefixes uploaded file names with this

# region type -> geometry kind; "labels" results carry only the label of a region with the same id
REGION_KINDS = {
    "brushlabels": "brush", "brush": "brush",
    "polygonlabels": "polygon", "polygon": "polygon",
    "rectanglelabels": "rectangle", "rectangle": "rectangle",
    "ellipselabels": "ellipse", "ellipse": "ellipse",
}


# ---------------------------------------------------------------------------------------------
# images


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3], turned upright by its EXIF orientation (as browsers show it)."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()


def _reference_names(reference: str) -> list[str]:
    """Candidate relative paths / file names of an image reference, most specific first."""
    parsed = urlparse(reference)
    names = []
    query = parse_qs(parsed.query)
    if "d" in query:  # /data/local-files/?d=dir/file.png
        names.append(unquote(query["d"][0]))
    path = unquote(parsed.path if parsed.scheme or parsed.query else reference)
    names.append(path.lstrip("/"))
    base = [Path(n).name for n in names]
    names += base + [UPLOAD_PREFIX.sub("", b) for b in base]
    return list(dict.fromkeys(n for n in names if n))


def find_image(reference: str, images_dir: str | Path | None, index: dict[str, Path] | None = None) -> Path:
    """The local file of an image reference: the path itself if it exists, else a file in images_dir
    with the reference's relative path, its file name, or its file name without an upload prefix."""
    direct = Path(reference)
    if direct.is_file():
        return direct
    if images_dir is None:
        raise FileNotFoundError(f"image {reference!r} not found; pass the folder that holds the images")
    images_dir = Path(images_dir)
    candidates = _reference_names(reference)
    for name in candidates:
        path = images_dir / name
        if path.is_file():
            return path
    if index is None:
        index = index_images(images_dir)
    for name in candidates:
        if Path(name).name in index:
            return index[Path(name).name]
    raise FileNotFoundError(f"image {reference!r} not found in {images_dir} (looked for {candidates}); "
                            "put the exported images there or pass the right folder")


def index_images(images_dir: str | Path) -> dict[str, Path]:
    """File name -> path of every image under images_dir (also without Label Studio's upload prefix)."""
    index: dict[str, Path] = {}
    for path in sorted(Path(images_dir).rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            index.setdefault(path.name, path)
            index.setdefault(UPLOAD_PREFIX.sub("", path.name), path)
    return index


# ---------------------------------------------------------------------------------------------
# regions


def brush_to_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """A Label Studio brush RLE of a [height, width] RGBA layer -> bool mask (alpha > 0)."""
    from label_studio_sdk.converter import brush

    flat = brush.decode_rle(list(rle))
    if flat.size != height * width * 4:
        raise ValueError(f"brush RLE holds {flat.size} values, not {height} x {width} x 4")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def rectangle_corners(value: dict, height: int, width: int) -> np.ndarray:
    """[4, 2] pixel corners of a rectangle region (percent x, y, width, height; rotation in degrees
    clockwise about the top-left corner)."""
    x, y = value["x"] / 100 * width, value["y"] / 100 * height
    w, h = value["width"] / 100 * width, value["height"] / 100 * height
    a = math.radians(value.get("rotation", 0) or 0)
    ux, uy = math.cos(a), math.sin(a)  # along the top edge
    vx, vy = -math.sin(a), math.cos(a)  # down the left edge
    return np.array([[x, y], [x + w * ux, y + w * uy], [x + w * ux + h * vx, y + w * uy + h * vy],
                     [x + h * vx, y + h * vy]])


def ellipse_mask(value: dict, height: int, width: int) -> np.ndarray:
    """Mask of an ellipse region (percent centre x, y and radii radiusX, radiusY; rotation in degrees)."""
    cx, cy = value["x"] / 100 * width, value["y"] / 100 * height
    rx, ry = value["radiusX"] / 100 * width, value["radiusY"] / 100 * height
    a = math.radians(value.get("rotation", 0) or 0)
    xs = np.arange(width)[None, :] + 0.5 - cx
    ys = np.arange(height)[:, None] + 0.5 - cy
    u = xs * math.cos(a) + ys * math.sin(a)
    v = -xs * math.sin(a) + ys * math.cos(a)
    return (u / max(rx, 1e-9)) ** 2 + (v / max(ry, 1e-9)) ** 2 <= 1


def region_mask(kind: str, value: dict, height: int, width: int) -> np.ndarray:
    """Bool [height, width] mask of one region's geometry (height, width: the annotated image size)."""
    if kind == "brush":
        if value.get("format", "rle") != "rle" or "rle" not in value:
            raise ValueError(f"brush region without an RLE (format {value.get('format')!r})")
        return brush_to_mask(value["rle"], height, width)
    if kind == "polygon":
        points = np.asarray(value["points"], dtype=np.float64).reshape(-1, 2) / 100 * [width, height]
        return polygon_mask(points, (height, width))
    if kind == "rectangle":
        return polygon_mask(rectangle_corners(value, height, width), (height, width))
    if kind == "ellipse":
        return ellipse_mask(value, height, width)
    raise ValueError(f"unsupported region kind {kind!r}")


@dataclass
class _Region:
    kind: str
    value: dict
    label: str
    original_size: tuple[int, int] | None


@dataclass
class _Record:
    task_id: object
    reference: str
    regions: list[_Region] = field(default_factory=list)


def _pick_annotation(task: dict) -> dict | None:
    """The annotation a task is trained on: the ground-truth one, else the last one not cancelled."""
    annotations = [a for a in task.get("annotations", task.get("completions", [])) or []
                   if not a.get("was_cancelled", False)]
    if not annotations:
        return None
    truth = [a for a in annotations if a.get("ground_truth")]
    return (truth or annotations)[-1]


def _region_label(result: dict, labels_by_id: dict[str, list[str]]) -> str | None:
    value = result.get("value", {})
    for key in (result.get("type", "").lower(), "labels"):
        if key.endswith("labels") and value.get(key):
            return str(value[key][0])
    region_id = result.get("id")
    extra = labels_by_id.get(region_id) if region_id is not None else None  # no id: no label-only result of its own
    return extra[0] if extra else None


def _image_reference(task: dict, image_key: str | None) -> str:
    data = task.get("data", {})
    if image_key is not None:
        if image_key not in data:
            raise ValueError(f"task {task.get('id')} has no data field {image_key!r}; it has {sorted(data)}")
        return str(data[image_key])
    if "image" in data:
        return str(data["image"])
    strings = [v for v in data.values() if isinstance(v, str)]
    if len(strings) != 1:
        raise ValueError(f"task {task.get('id')}: cannot tell which data field is the image ({sorted(data)}); "
                         "pass image_key")
    return strings[0]


class LabelStudioDataset(Sequence[Scene]):
    """Samples of a Label Studio JSON export; images are read and regions rasterised per item.

    Per task it uses the ground-truth annotation, else the last one not cancelled; tasks without
    such an annotation are left out (``skipped_tasks``). A region takes its first label.
    class_names: the labels to keep, in class-id order (default: every label found, sorted);
      regions with other labels are left out.
    image_key: the task data field holding the image (default "image", or the only text field).
    """

    def __init__(self, export: str | Path | list, images_dir: str | Path | None = None,
                 class_names: Sequence[str] | None = None, image_key: str | None = None) -> None:
        if isinstance(export, (str, Path)):
            with open(export, encoding="utf-8") as f:
                tasks = json.load(f)
            if images_dir is None:
                images_dir = Path(export).parent
        else:
            tasks = export
        if isinstance(tasks, dict):
            tasks = [tasks]
        if not isinstance(tasks, list) or not all(isinstance(t, dict) and "data" in t for t in tasks):
            raise ValueError("a Label Studio export must be the JSON list of tasks (Export > JSON), "
                             "each with 'data' and 'annotations'")
        self.images_dir = Path(images_dir) if images_dir is not None else None
        self._index: dict[str, Path] | None = None
        self.skipped_tasks: list = []
        self.skipped_regions = 0

        records = []
        for task in tasks:
            annotation = _pick_annotation(task)
            if annotation is None:
                self.skipped_tasks.append(task.get("id"))
                continue
            record = _Record(task.get("id"), _image_reference(task, image_key))
            results = annotation.get("result", []) or []
            labels_by_id: dict[str, list[str]] = {}
            for r in results:
                if r.get("type", "").lower() == "labels" and r.get("value", {}).get("labels"):
                    labels_by_id[r.get("id")] = r["value"]["labels"]
            for r in results:
                kind = REGION_KINDS.get(r.get("type", "").lower())
                if kind is None:
                    continue  # choices, text, keypoints, the label-only results, ...
                label = _region_label(r, labels_by_id)
                if label is None:
                    self.skipped_regions += 1
                    continue
                size = None
                if "original_height" in r and "original_width" in r:
                    size = (int(r["original_height"]), int(r["original_width"]))
                record.regions.append(_Region(kind, r.get("value", {}), label, size))
            records.append(record)

        found = sorted({reg.label for rec in records for reg in rec.regions})
        if class_names is None:
            class_names = found
        elif found and not set(class_names) & set(found):
            raise ValueError(f"none of the classes {list(class_names)} is a label of this export; "
                             f"its labels are {found}")
        self.class_names = list(class_names)
        class_ids = {n: i for i, n in enumerate(self.class_names)}
        for rec in records:
            kept = [reg for reg in rec.regions if reg.label in class_ids]
            self.skipped_regions += len(rec.regions) - len(kept)
            rec.regions = kept
        self._records = records
        self._class_ids = class_ids

    def __len__(self) -> int:
        return len(self._records)

    def image_path(self, index: int) -> Path:
        reference = self._records[index].reference
        try:
            return find_image(reference, self.images_dir, self._index or {})
        except FileNotFoundError:
            if self._index is None and self.images_dir is not None:
                self._index = index_images(self.images_dir)
                return find_image(reference, self.images_dir, self._index)
            raise

    def __getitem__(self, index: int) -> Scene:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} tasks")
        record = self._records[index]
        image = load_rgb(self.image_path(index))
        height, width = image.shape[:2]
        masks, classes = [], []
        for region in record.regions:
            h, w = region.original_size or (height, width)
            try:
                mask = region_mask(region.kind, region.value, h, w)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"task {record.task_id}: bad {region.kind} region {region.label!r}: {e}") from e
            if mask.shape != (height, width):
                # annotated on a different size of the same image: scale the mask to the file we have
                mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
            if not mask.any():
                warnings.warn(f"task {record.task_id}: region {region.label!r} covers no pixel; left out", stacklevel=2)
                continue
            masks.append(mask)
            classes.append(self._class_ids[region.label])
        masks_arr = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        return Scene(image=image, masks=masks_arr, classes=np.asarray(classes, dtype=np.int64),
                     boxes=masks_to_boxes(masks_arr))

    def __iter__(self) -> Iterator[Scene]:
        for i in range(len(self)):
            yield self[i]


def load_labelstudio_export(export: str | Path | list, images_dir: str | Path | None = None,
                            class_names: Sequence[str] | None = None,
                            image_key: str | None = None) -> LabelStudioDataset:
    """Read a Label Studio JSON export; see :class:`LabelStudioDataset`."""
    return LabelStudioDataset(export, images_dir, class_names, image_key)


# ---------------------------------------------------------------------------------------------
# writing exports (for tests and demos)


def write_labelstudio_export(samples: Sequence[Scene], class_names: Sequence[str], out_dir: str | Path,
                             region: str = "brush", from_name: str = "label", to_name: str = "image") -> Path:
    """Write samples as PNG images (``out_dir/images``) and a Label Studio JSON export
    (``out_dir/export.json``, returned) whose tasks point at ``/data/upload/1/<prefix>-<name>.png``
    as uploads do. region: "brush" (exact masks) or "rectangle" (the instances' boxes)."""
    from label_studio_sdk.converter import brush

    if region not in ("brush", "rectangle"):
        raise ValueError(f"region must be 'brush' or 'rectangle', got {region!r}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    tasks = []
    for i, sample in enumerate(samples):
        name = f"scene_{i:05d}.png"
        Image.fromarray(sample.image).save(out_dir / "images" / name)
        height, width = sample.image.shape[:2]
        results = []
        for j, (mask, label, box) in enumerate(zip(sample.masks, sample.classes, sample.boxes)):
            common = {"id": f"r{i}_{j}", "from_name": from_name, "to_name": to_name,
                      "original_width": width, "original_height": height, "image_rotation": 0}
            value: dict[str, object]
            if region == "brush":
                rle = brush.mask2rle(mask.astype(np.uint8) * 255)
                value = {"format": "rle", "rle": [int(v) for v in rle], "brushlabels": [class_names[label]]}
            else:
                x0, y0, x1, y1 = (float(v) for v in box)
                value = {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
                         "height": 100 * (y1 - y0) / height, "rotation": 0,
                         "rectanglelabels": [class_names[label]]}
            results.append({**common, "type": f"{region}labels", "value": value})
        tasks.append({"id": i + 1, "data": {"image": f"/data/upload/1/{i:08x}-{name}"},
                      "annotations": [{"id": i + 1, "was_cancelled": False, "result": results}],
                      "predictions": []})
    path = out_dir / "export.json"
    path.write_text(json.dumps(tasks))
    return path
