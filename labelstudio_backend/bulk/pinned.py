"""A bulk job's pinned references: the example embeddings and the model_version frozen at the job's start.

They go to MODEL_DIR/bulk/<job>.json and .npz; a rerun keeps them unless --refresh-references, so an annotation
made overnight does not restart the job from zero. `PinnedSource` hands them to the backend as its reference
source (labelstudio_backend.references.sources.ReferenceSource).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from labelstudio_backend.errors import BulkError
from labelstudio_backend.labelstudio.payload import task_id_of, utc_now
from labelstudio_backend.references.sources import StoreReferences, embedding_checkpoint
from labelstudio_backend.serving.backend import DINOvBackend

logger = logging.getLogger(__name__)


@dataclass
class PinnedReferences:
    """The in-context examples a job predicts with, frozen at its start: one row per example, in the store's
    order (per label, most recent first)."""

    model_version: str
    revision: int
    checkpoint: str
    labels: list[str]
    task_ids: list[int | None]
    vectors: np.ndarray  # float32 [n, D]
    pinned_at: str = ""

    def banks(self, labels: Sequence[str], per_label: int, exclude_task_id: int | None = None) -> dict[str, np.ndarray]:
        """label -> [k, D], as StoreReferences.banks builds them: at most per_label examples, never the
        task's own."""
        rows: dict[str, list[np.ndarray]] = defaultdict(list)
        for label, task_id, vector in zip(self.labels, self.task_ids, self.vectors):
            if exclude_task_id is not None and task_id == exclude_task_id:
                continue
            if len(rows[label]) < per_label:
                rows[label].append(vector)
        return {label: np.stack(rows[label]) for label in labels if rows.get(label)}

    @property
    def examples(self) -> int:
        return len(self.labels)

    def save(self, path: Path) -> None:
        """path.json (what the job is pinned to) and path.npz (the embeddings), written atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        banks = path.with_suffix(".npz")
        tmp = banks.with_name(banks.stem + ".tmp.npz")
        np.savez(tmp, vectors=np.asarray(self.vectors, np.float32), labels=np.asarray(self.labels, dtype=str),
                 task_ids=np.asarray([-1 if t is None else t for t in self.task_ids], dtype=np.int64))
        os.replace(tmp, banks)
        record = {"model_version": self.model_version, "revision": self.revision, "checkpoint": self.checkpoint,
                  "examples": self.examples, "labels": sorted(set(self.labels)), "pinned_at": self.pinned_at,
                  "banks": banks.name}
        tmp_json = path.with_name(path.name + ".tmp")
        tmp_json.write_text(json.dumps(record, indent=2))
        os.replace(tmp_json, path)

    @classmethod
    def load(cls, path: Path) -> PinnedReferences | None:
        try:
            record = json.loads(path.read_text())
            with np.load(path.with_name(record["banks"])) as banks:
                vectors, labels, task_ids = banks["vectors"], banks["labels"], banks["task_ids"]
        except (OSError, ValueError, KeyError) as e:
            if path.exists():
                logger.warning("the pinned job state %s cannot be read (%s); pinning the references again", path, e)
            return None
        return cls(model_version=record["model_version"], revision=int(record["revision"]),
                   checkpoint=record["checkpoint"], labels=[str(label) for label in labels],
                   task_ids=[None if t < 0 else int(t) for t in task_ids], vectors=vectors.astype(np.float32),
                   pinned_at=record.get("pinned_at", ""))


class PinnedSource:
    """The pinned references as a backend's reference source (MAX_EXAMPLES_PER_LABEL of `per_label`)."""

    def __init__(self, pinned: PinnedReferences, per_label: int):
        self.pinned, self.per_label = pinned, per_label

    def revision(self) -> int:
        return self.pinned.revision

    def banks(self, labels: Sequence[str], exclude_task_id: int | None = None) -> dict[str, np.ndarray]:
        return self.pinned.banks(labels, self.per_label, exclude_task_id)


def pin_references(backend: DINOvBackend, labels: Sequence[str], attempts: int = 3) -> PinnedReferences:
    """Embed the project's current examples now and freeze them with the model_version they belong to.

    Per label, enough examples are kept that leaving out any one task's own (as the server does for the task
    it predicts) still leaves MAX_EXAMPLES_PER_LABEL. If the store changes while we read it, read again.
    """
    project_id = backend.project_id
    if project_id is None:
        raise BulkError("references are pinned for a project; the backend has none")
    references = StoreReferences(backend.runtime, backend.model, project_id, backend.settings)
    store = backend.runtime.store
    per_label = backend.settings.max_examples_per_label
    for _ in range(attempts):
        revision = store.revision(project_id)
        examples = references.examples(labels, per_label=1_000_000)
        chosen = []
        for label in labels:
            rows = [e for e in examples if e.label == label]
            count = per_label
            while count < len(rows):
                most_of_one_task = max(Counter(e.task_id for e in rows[:count]).values())
                if count >= per_label + most_of_one_task:
                    break
                count = per_label + most_of_one_task
            chosen += rows[:count]
        vectors = references.embed(chosen)
        version = backend.model_version
        if store.revision(project_id) == revision:
            break
        logger.info("the references changed while being pinned; reading them again")
    checkpoint = embedding_checkpoint(backend.model)
    kept = [(e, vectors[e.embedding_key(checkpoint)]) for e in chosen if e.embedding_key(checkpoint) in vectors]
    dim = next((len(v) for _, v in kept), 0)
    return PinnedReferences(
        model_version=version, revision=revision, checkpoint=checkpoint,
        labels=[e.label for e, _ in kept], task_ids=[task_id_of(e.task_id) for e, _ in kept],
        vectors=np.stack([v for _, v in kept]).astype(np.float32) if kept else np.zeros((0, dim), np.float32),
        pinned_at=utc_now())


def version_at_revision(backend: DINOvBackend, revision: int) -> str:
    """The model_version the backend would name at another reference revision: the same, since model_version
    names the served model and its settings, not the references (serving/versions.py)."""
    return backend.model_version
