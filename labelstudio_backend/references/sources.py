"""Reference sources: where a prediction's in-context examples (per-label banks of prompt embeddings) come from.

    source.revision()                          -> int, named in model_version
    source.banks(labels, exclude_task_id)      -> {label: float32 [k, D]}, labels without examples left out

StoreReferences reads the project's current examples from the reference store and embeds them (process
cache, then the store's embedding cache, then the model); a bulk job passes its pinned revision instead
(labelstudio_backend.bulk.pinned.PinnedSource). The backend is given a source; it never subclasses.

A reference drawn as a box or a keypoint is first turned into the object's mask by interactive segmentation
on its own image, since a filled box is half background (see `box_reference_mask`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import Future
from typing import Any, Protocol, Sequence

import numpy as np

from labelstudio_backend.errors import ModelUnavailable
from labelstudio_backend.labelstudio.label_config import parse_label_config
from labelstudio_backend.labelstudio.payload import task_id_of
from labelstudio_backend.labelstudio.regions import region_to_prompt
from labelstudio_backend.runtime.runtime import Runtime, ServedModel
from labelstudio_backend.settings import Settings

logger = logging.getLogger(__name__)


def embedding_checkpoint(model: ServedModel) -> str:
    """The model part of the embedding keys: the checkpoint id, followed by the form of its prompt embeddings when
    it is not the official content query alone (``DINOvPredictor.embedding_form``, e.g. "content+shape32"), so
    that embeddings of another form are never mixed in and are encoded again."""
    form = getattr(model.load_model(), "embedding_form", "content")
    return model.checkpoint_id if form == "content" else f"{model.checkpoint_id}+{form}"


class ReferenceSource(Protocol):
    """What the backend needs of its references."""

    def revision(self) -> int: ...
    def banks(self, labels: Sequence[str], exclude_task_id: int | None = None) -> dict[str, np.ndarray]: ...


def reference_filter(settings: Settings) -> dict:
    """REFERENCES / REFERENCE_ANNOTATORS as the keyword arguments of ReferenceStore.examples."""
    annotators = [int(a) for a in settings.reference_annotators] if settings.references == "annotators" else None
    return {"ground_truth_only": settings.references == "ground_truth", "annotators": annotators}


def box_reference_mask(segmented: np.ndarray | None, filled_box: np.ndarray, min_cover: float = 0.3) -> np.ndarray:
    """The prompt mask [H, W] bool of a box reference: the object segmented from the box, clipped to the box; the
    filled box when the segmentation covers less than `min_cover` of it (a miss, not the object)."""
    if segmented is None:
        return filled_box
    inside = segmented & filled_box
    if inside.sum() < min_cover * filled_box.sum():
        return filled_box
    return inside


class StoreReferences:
    """The project's current examples in the runtime's reference store, embedded on demand.

    project_id None (a call without a project) has no examples; model is the one that serves the project (its
    checkpoint id keys the embeddings); settings are the project's (per-label count, REFERENCES filter).
    """

    def __init__(self, runtime: Runtime, model: ServedModel, project_id: int | None, settings: Settings):
        self.runtime, self.model, self.project_id, self.settings = runtime, model, project_id, settings

    def revision(self) -> int:
        return self.runtime.store.revision(self.project_id) if self.project_id is not None else 0

    def examples(self, labels: Sequence[str], per_label: int | None = None,
                 exclude_task_id: int | None = None) -> list:
        """The store's Examples of these labels (per label: most recent first, at most per_label, default
        MAX_EXAMPLES_PER_LABEL), filtered by REFERENCES."""
        if self.project_id is None or not labels:
            return []
        return self.runtime.store.examples(
            self.project_id, labels=list(labels), per_label=per_label or self.settings.max_examples_per_label,
            exclude_task_id=exclude_task_id, **reference_filter(self.settings))

    def banks(self, labels: Sequence[str], exclude_task_id: int | None = None) -> dict[str, np.ndarray]:
        """label -> prompt embeddings [k, D] of its examples (labels without any are left out); never the
        examples of task `exclude_task_id` (a task is not predicted from itself)."""
        if self.project_id is None or not labels:
            return {}
        examples = self.examples(labels, exclude_task_id=exclude_task_id)
        vectors = self.embed(examples)
        checkpoint = embedding_checkpoint(self.model)
        banks: dict[str, list[np.ndarray]] = defaultdict(list)
        for example in examples:
            vector = vectors.get(example.embedding_key(checkpoint))
            if vector is not None and example.label in labels:
                banks[example.label].append(vector)
        return {label: np.stack(banks[label]) for label in labels if banks.get(label)}

    def ready(self, labels: Sequence[str]) -> bool:
        """Whether the examples of these labels are embedded already (banks() has nothing to compute)."""
        _, missing = self._cached(self.examples(labels))
        return not missing

    def embed(self, examples: Sequence) -> dict[str, np.ndarray]:
        """Embedding key -> float32 [D] of each usable example: process cache, then the store, then computed
        (grouped by image, one encode_prompts call per image). Examples whose image or region fails are left
        out and not retried for a while."""
        found, missing = self._cached(examples)
        checkpoint = embedding_checkpoint(self.model)
        for (url, task_id), group in missing.items():
            found.update(self._embed_image_group(url, task_id, group, checkpoint))
        return found

    def _cached(self, examples: Sequence) -> tuple[dict[str, np.ndarray], dict[tuple[str, int | None], list]]:
        """The embeddings found in the process cache or the store, and the examples still to embed by image."""
        runtime = self.runtime
        self.model.load_model()  # the checkpoint id is part of the key
        checkpoint = embedding_checkpoint(self.model)
        found: dict[str, np.ndarray] = {}
        missing: dict[tuple[str, int | None], list] = defaultdict(list)
        for example in examples:
            key = example.embedding_key(checkpoint)
            vector = runtime.embeddings.get(key)
            if vector is None:
                vector = runtime.store.get_embedding(key)
                if vector is not None:
                    runtime.embeddings.put(key, vector)
            if vector is not None:
                found[key] = vector
            elif not runtime.reference_failed(key):
                missing[(example.image_url, task_id_of(example.task_id))].append(example)
        return found, missing

    def _embed_image_group(self, url: str, task_id: int | None, group: list, checkpoint: str) -> dict[str, np.ndarray]:
        runtime = self.runtime
        try:
            encoded = self.model.encode(url, task_id)
        except ModelUnavailable:
            raise
        except Exception as e:
            logger.warning("project %s: reference image %s of task %s cannot be used: %s",
                           self.project_id, url, task_id, e, exc_info=not isinstance(e, (ValueError, OSError)))
            for example in group:
                runtime.mark_reference_failed(example.embedding_key(checkpoint))
            return {}
        masks, keys, owners = [], [], []
        for example in group:
            key = example.embedding_key(checkpoint)
            try:
                mask = self.reference_mask(encoded, example.region)
            except ModelUnavailable:
                raise
            except Exception as e:
                logger.warning("project %s: region %s of annotation %s is not a usable example: %s",
                               self.project_id, example.region_id, example.annotation_id, e,
                               exc_info=not isinstance(e, ValueError))
                mask = None
            if mask is None or not mask.any():
                runtime.mark_reference_failed(key)
                continue
            masks.append(mask)
            keys.append(key)
            owners.append(example.annotation_id)
        if not masks:
            return {}
        predictor = self.model.load_model()
        vectors = np.asarray(predictor.encode_prompts(encoded, np.stack(masks)), dtype=np.float32)
        found = {}
        for key, owner, vector in zip(keys, owners, vectors):
            runtime.store.put_embedding(key, vector, project_id=self.project_id, annotation_id=owner)
            runtime.embeddings.put(key, vector)
            found[key] = vector
        return found

    def reference_mask(self, encoded: Any, region: dict) -> np.ndarray | None:
        """The prompt mask [H, W] bool of a reference region on its own (encoded) image.

        Brushes, polygons and ellipses are used as drawn. A box or a keypoint would be a poor prompt
        as it stands, so the object is segmented from it first (the filled box if nothing is found).
        Negative keypoints are not examples (None).
        """
        size = tuple(encoded.image_size)
        prompt = region_to_prompt(region, size, self.settings.max_image_pixels)
        if prompt.mask is not None:
            return prompt.mask
        if not prompt.positive:
            return None
        predictor = self.model.load_model()
        if prompt.box is not None:
            result = predictor.segment_interactive(encoded, boxes=np.array([prompt.box]))
        else:
            result = predictor.segment_interactive(encoded, points=np.array([prompt.point]),
                                                   point_labels=np.array([1]))
        best = getattr(result, "best", None)
        mask = None if best is None else np.asarray(best.mask, dtype=bool)
        if prompt.box is not None:
            return box_reference_mask(mask, prompt.filled_mask(size))
        return mask if mask is not None and mask.any() else prompt.filled_mask(size)


def embed_ahead(runtime: Runtime, project_id: int, labels: Sequence[str] | None = None) -> Future | None:
    """Queue the embedding of the project's examples of `labels` (default: the labels of the config /setup stored),
    after a webhook or a sync changed them, so that the next /predict finds them ready; one pending job per
    project and labels. None when the embeddings queue is full."""
    key = ("embed", project_id, tuple(labels) if labels is not None else None)
    return runtime.try_submit("embeddings", key, _embed_project, runtime, project_id, labels)


def _embed_project(runtime: Runtime, project_id: int, labels: Sequence[str] | None) -> None:
    if labels is None:
        config = runtime.projects.load(project_id).get("label_config")
        if not config:
            return  # no /setup yet: the labels are unknown; the first prediction names them
        labels = parse_label_config(config).output_labels
    # with the model that serves the project, so that /predict finds the embeddings under its checkpoint id
    StoreReferences(runtime, runtime.model_for(project_id), project_id,
                    runtime.projects.settings_for(project_id)).banks(labels)
