"""Leave-one-out quality estimate of a project: predict each annotated task from the other tasks' examples and
compare with its own regions.

    estimate = leave_one_out(backend, max_tasks=50)
    # {"tasks_evaluated", "labels": {label: {"mean_iou", "recall", "tasks", "regions"}}, "computed_at",
    #  "revision", "model_version"}

Run by `POST /references?action=estimate` and `python _wsgi.py leave-one-out`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np

from dinov.metrics import iou
from labelstudio_backend.errors import BackendError, ModelUnavailable
from labelstudio_backend.labelstudio.payload import task_id_of, utc_now
from labelstudio_backend.labelstudio.regions import RegionError, region_to_prompt
from labelstudio_backend.references.sources import StoreReferences
from labelstudio_backend.serving.backend import DINOvBackend

logger = logging.getLogger(__name__)

MATCH_IOU = 0.5  # an annotated region is found when a prediction overlaps it at least this much


def leave_one_out(backend: DINOvBackend, max_tasks: int | None = 50) -> dict:
    """The estimate of the backend's project (see the module docstring), over at most max_tasks tasks.

    Per label: mean mask IoU (union of predicted vs union of annotated masks, over the tasks that have the
    label) and recall (annotated regions matched by a prediction with IoU >= MATCH_IOU). Keypoint regions are
    not ground truth and are skipped. Raises BackendError without a project or config, ModelUnavailable.
    """
    if backend.project_id is None:
        raise BackendError("leave_one_out needs a project")
    config = backend.parsed_label_config
    labels = config.output_labels
    references = StoreReferences(backend.runtime, backend.model, backend.project_id, backend.settings)  # every example, not a pin
    examples = references.examples(labels, per_label=1_000_000)
    by_task: dict[Any, list] = defaultdict(list)
    for example in examples:
        if not str(example.region.get("type", "")).lower().startswith("keypoint"):
            by_task[(example.task_id, example.image_url)].append(example)
    ious: dict[str, list[float]] = defaultdict(list)
    matched: dict[str, list[bool]] = defaultdict(list)
    evaluated = 0
    for (task_id, url), truth in list(by_task.items())[: max_tasks or None]:
        try:
            task = {"id": task_id, "data": {config.value_key: url}}
            prediction = backend.preannotate(task, config, labels, "leave-one-out")
            encoded = backend.model.encode(url, task_id_of(task_id))
        except ModelUnavailable:
            raise
        except Exception as e:
            logger.warning("leave-one-out: task %s skipped: %s", task_id, e)
            continue
        size = tuple(encoded.image_size)
        predicted: dict[str, list[np.ndarray]] = defaultdict(list)
        for region in prediction["result"]:
            predicted[region["value"][region["type"]][0]].append(region_to_prompt(region, size).filled_mask(size))
        truth_masks: dict[str, list[np.ndarray]] = defaultdict(list)
        for example in truth:
            try:
                truth_masks[example.label].append(region_to_prompt(example.region, size).filled_mask(size))
            except RegionError:
                continue
        for label, masks in truth_masks.items():
            union_truth = np.logical_or.reduce(masks)
            preds = predicted.get(label, [])
            union_pred = np.logical_or.reduce(preds) if preds else np.zeros(size, bool)
            ious[label].append(iou(union_truth, union_pred))
            matched[label].extend(any(iou(m, p) >= MATCH_IOU for p in preds) for m in masks)
        evaluated += 1
    per_label = {label: {"mean_iou": float(np.mean(ious[label])), "recall": float(np.mean(matched[label])),
                         "tasks": len(ious[label]), "regions": len(matched[label])} for label in ious}
    return {"tasks_evaluated": evaluated, "labels": per_label, "computed_at": utc_now(),
            "revision": references.revision(), "model_version": backend.model_version}
