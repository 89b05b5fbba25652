"""LabeledMask selection and region building: pure functions over typed values.

    instances (label, mask, score) --select_instances--> kept --build_prediction--> {"result", "score", ...}

Masks are bool [H, W] in the task image's pixels; scores are in [0, 1].
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from dinov.metrics import iou, point_in_mask
from labelstudio_backend.labelstudio.label_config import ParsedConfig
from labelstudio_backend.labelstudio.regions import mask_to_regions
from labelstudio_backend.settings import Settings

COVERED_FRACTION = 0.8     # a region this much inside better ones is one of them, or a part of one
SAME_OBJECT_IOU = 0.5      # a found instance overlapping the drawn object more than this is that object


@dataclass(frozen=True)
class LabeledMask:
    """One segmented object with its label's name: bool mask [H, W] and score in [0, 1] (dinov.results.Instance
    is the model's, with a class index and a box)."""

    label: str
    mask: np.ndarray
    score: float


@dataclass(frozen=True)
class SelectionRules:
    """What pre-annotation keeps: at most max_per_label per label, min_area pixels, overlap between labels."""

    max_per_label: int
    min_area: int
    allow_overlap: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> SelectionRules:
        return cls(settings.max_instances_per_label, settings.min_area, settings.allow_overlap)


def select_instances(instances: Iterable[LabeledMask], rules: SelectionRules) -> list[LabeledMask]:
    """Best score first: at most rules.max_per_label per label; no region with COVERED_FRACTION of its pixels
    inside better regions of its label (or of any label, when labels may not overlap): that is an object already
    found, or a part of one (Mask2Former's overlap rule); no pixel shared between labels unless allowed (the better
    instance keeps it); at least rules.min_area pixels (and at least 1) after that. Returns the kept instances,
    best first.

    Every test and update works inside the instance's bounding box (found once per instance), not over the whole
    image: nothing outside it can change the answer."""
    kept: list[LabeledMask] = []
    counts: dict[str, int] = defaultdict(int)
    claimed: np.ndarray | None = None
    own: dict[str, np.ndarray] = {}
    for instance in sorted(instances, key=lambda item: -item.score):
        label = instance.label
        if counts[label] >= rules.max_per_label:
            continue
        full = np.asarray(instance.mask, dtype=bool)
        if claimed is None:
            claimed = np.zeros_like(full)
        rows = np.flatnonzero(full.any(axis=1))
        if len(rows) == 0:
            continue  # an empty mask has fewer than max(1, min_area) pixels
        cols = np.flatnonzero(full.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        crop = mask = full[box]
        label_own = own.get(label)
        taken = claimed[box] if not rules.allow_overlap else (label_own[box] if label_own is not None else None)
        area = int(mask.sum())
        if taken is not None and int(np.count_nonzero(mask & taken)) >= COVERED_FRACTION * area:
            continue
        if not rules.allow_overlap:
            others = claimed[box] if label_own is None else claimed[box] & ~label_own[box]
            mask = mask & ~others
        if int(mask.sum()) < max(1, rules.min_area):
            continue
        if mask is crop:
            out = full
        else:
            out = np.zeros_like(full)
            out[box] = mask
        kept.append(LabeledMask(label, out, instance.score))
        counts[label] += 1
        claimed[box] |= mask
        if label_own is None:
            label_own = own[label] = np.zeros_like(full)
        label_own[box] |= mask
    return kept


def similar_to_drawn(found: Iterable[LabeledMask], drawn: LabeledMask, negatives: Sequence) -> list[LabeledMask]:
    """INTERACTIVE_MODE=similar: the found instances that contain no negative click (x, y pixels), plus the
    drawn object itself unless one of them is it."""
    similar = [f for f in found if not any(point_in_mask(f.mask, *point) for point in negatives)]
    if not any(iou(f.mask, drawn.mask) > SAME_OBJECT_IOU for f in similar):
        similar.append(drawn)  # the drawn object itself is always in
    return similar


def empty_prediction(model_version: str) -> dict:
    """A prediction without regions (Label Studio stores it: the task counts as predicted)."""
    return {"result": [], "score": 0.0, "model_version": model_version}


def build_prediction(kept: Sequence[LabeledMask], config: ParsedConfig, model_version: str, polygon_tolerance: float,
                     min_area: int = 0, score: float | None = None) -> dict:
    """Label Studio's prediction {"result": regions, "score": `score`, else the mean instance score,
    "model_version"}; each instance becomes regions of the output control of its label (polygon_tolerance,
    min_area: pixels)."""
    result = []
    for item in kept:
        result.extend(mask_to_regions(item.mask, item.label, config.output_for(item.label), config.image_name,
                                      score=item.score, polygon_tolerance=polygon_tolerance, min_area=min_area))
    if score is None:
        score = float(np.mean([k.score for k in kept])) if kept else 0.0
    return {"result": result, "score": score, "model_version": model_version}
