"""A project's annotated tasks as training data: what a fine-tuning learns from and is measured on.

    tasks = project_tasks(client, project_id)                        # through the one Label Studio client
    train_ids, val_ids = split_tasks([t["id"] for t in tasks], project_id)
    scene = task_scene(task, config, images)                         # image through the image loader

Per task the ground-truth annotation is used, else the newest one not cancelled. Regions that carry a shape
(brush, polygon, ellipse) supervise masks; a rectangle supervises its box only (``Scene.has_mask`` False: never a
mask the model made of it, which would teach the model its own mistakes); keypoints and other results are
skipped. Class i is the config's i-th output label.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

from dinov.data.labelstudio_export import REGION_KINDS, region_mask
from dinov.data.scenes import Scene, masks_to_boxes
from dinov.train.finetune import MIN_VALIDATION_TASKS  # the better-or-not rule's minimum, also the split's
from labelstudio_backend.labelstudio.label_config import ParsedConfig
from labelstudio_backend.labelstudio.regions import RegionTooLarge, check_region_canvas, region_pixel_limit
from labelstudio_backend.training.outcome import Rejection

logger = logging.getLogger(__name__)

MIN_TRAINING_TASKS = 3
VALIDATION_FRACTION = 0.25
PAGE_SIZE = 100


class NotEnoughData(Rejection):
    """The project has too few annotated tasks to train and validate on."""


class NoMaskRegions(Rejection):
    """The training tasks hold no region that can supervise a mask."""


def check_supervision(train: Sequence[Scene], project_id: int) -> None:
    """Raise NoMaskRegions when no training scene has a region with a shape (brush, polygon, ellipse): rectangles
    supervise boxes only and keypoints nothing, so the masks the model makes could not be taught."""
    if not any(bool(np.asarray(s.has_mask).any()) for s in train):
        regions = sum(len(s.classes) for s in train)
        raise NoMaskRegions(
            f"project {project_id}'s {len(train)} training tasks hold no brush, polygon or ellipse region of the "
            f"config's labels ({regions} other regions: rectangles supervise boxes only, keypoints nothing); "
            "annotate objects with a brush, polygon or ellipse")


def project_tasks(client: Any, project_id: int) -> list[dict]:
    """Every task of the project that has an annotation not cancelled, in task id order."""
    tasks: dict[int, dict] = {}
    for page in client.task_pages(project_id, PAGE_SIZE):
        for task in page:
            if chosen_annotation(task) is not None:
                tasks[int(task["id"])] = task
    return [tasks[k] for k in sorted(tasks)]


def chosen_annotation(task: dict) -> dict | None:
    """The annotation a task is trained on: the ground-truth one, else the newest not cancelled."""
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not annotations:
        return None
    truth = [a for a in annotations if a.get("ground_truth")]
    return max(truth or annotations, key=lambda a: (str(a.get("updated_at") or ""), int(a.get("id") or 0)))


def split_tasks(task_ids: Sequence[int], project_id: int) -> tuple[list[int], list[int]]:
    """(training, validation) task ids: the tasks ordered by a hash of (project, task) and the first quarter (at
    least 3) kept for validation, so the same tasks always give the same split whatever their order.
    Raises NotEnoughData with the reason when fewer than 3 + 3 tasks are annotated."""
    ids = sorted({int(t) for t in task_ids})
    needed = MIN_TRAINING_TASKS + MIN_VALIDATION_TASKS
    if len(ids) < needed:
        raise NotEnoughData(f"project {project_id} has {len(ids)} annotated tasks; training needs at least {needed} "
                            f"({MIN_TRAINING_TASKS} to train on, {MIN_VALIDATION_TASKS} to check the result on)")
    ranked = sorted(ids, key=lambda t: hashlib.sha1(f"{project_id}:{t}".encode()).hexdigest())
    count = max(MIN_VALIDATION_TASKS, math.ceil(len(ids) * VALIDATION_FRACTION))
    validation = set(ranked[:count])
    return [t for t in ids if t not in validation], [t for t in ids if t in validation]


def annotation_regions(annotation: dict, config: ParsedConfig) -> list[tuple[str, str, dict, tuple[int, int] | None]]:
    """(kind, label, value, (original height, width) or None) of every usable region: brush, polygon, ellipse and
    rectangle regions on the config's image whose first label is one of its output labels."""
    labels = set(config.output_labels)
    out = []
    for item in annotation.get("result") or []:
        kind = REGION_KINDS.get(str(item.get("type", "")).lower())
        if kind is None or item.get("to_name") not in (None, config.image_name):
            continue  # keypoints, choices, text, another image
        value = item.get("value") or {}
        names = value.get(str(item.get("type", "")).lower()) or value.get("labels") or []
        if not names or names[0] not in labels:
            continue
        size = None
        if item.get("original_height") and item.get("original_width"):
            size = (int(item["original_height"]), int(item["original_width"]))
        out.append((kind, str(names[0]), value, size))
    return out


def task_scene(task: dict, config: ParsedConfig, images: Any) -> Scene:
    """The task's image (images.load) and its regions as a Scene with has_mask; raises ValueError/OSError for an
    image or region that cannot be used."""
    annotation = chosen_annotation(task)
    if annotation is None:
        raise ValueError(f"task {task.get('id')} has no annotation")
    image = images.load(config.image_url(task), int(task["id"]))
    height, width = image.shape[:2]
    class_ids = {label: i for i, label in enumerate(config.output_labels)}
    masks, classes, outlined = [], [], []
    limit = region_pixel_limit((height, width), getattr(getattr(images, "settings", None), "max_image_pixels", None))
    for kind, label, value, size in annotation_regions(annotation, config):
        h, w = size or (height, width)
        try:
            check_region_canvas(w, h, limit, f"{kind} of task {task.get('id')}")
        except RegionTooLarge as e:  # a region bomb: skipped (logged), the task's other regions still count
            logger.warning("training data: %s", e)
            continue
        mask = region_mask(kind, value, h, w)
        if mask.shape != (height, width):  # annotated on another size of the same image
            mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
        if mask.any():
            masks.append(mask)
            classes.append(class_ids[label])
            outlined.append(kind != "rectangle")
    stacked = np.stack(masks) if masks else np.zeros((0, height, width), bool)
    return Scene(image=image, masks=stacked, classes=np.asarray(classes, np.int64), boxes=masks_to_boxes(stacked),
                 has_mask=np.asarray(outlined, bool))
