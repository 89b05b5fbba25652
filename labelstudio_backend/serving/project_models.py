"""Serving per-project fine-tuned models.

    models = ProjectModels(runtime, training_store)
    model = models.model_for(project_id)   # None: the project is served by the base model
    model.load_model(), model.checkpoint_id, model.encode(url, task_id)   # a ServedModel, as the base model is

The active checkpoint of a project is a delta file (dinov.delta) recorded in the training store, which every
worker reads, so all of them serve the same one. Its models are loaded on demand (the base model's weights
copied, the delta applied) and at most PROJECT_MODELS_IN_MEMORY stay loaded. A delta trained on another base
checkpoint than the one loaded is not served: the project falls back to the base and its status says it needs
training again. A project model's checkpoint_id names the delta, so feature, embedding and model_version keys of the
base model are never reused for it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

from labelstudio_backend.runtime.bounded import LRUCache
from labelstudio_backend.runtime.runtime import Predictor, Runtime, ServedModel
from labelstudio_backend.store.training import ActiveModel, TrainingStore, training_db

logger = logging.getLogger(__name__)


def build_project_predictor(base: Any, active: ActiveModel) -> Predictor:
    """A DINOvPredictor of the base predictor's model with the project's delta applied (the base stays as it is)."""
    from dinov.build import SCORE_THRESHOLD_METADATA_KEY
    from dinov.delta import apply_delta
    from dinov.predictor import DINOvPredictor

    model = copy.deepcopy(base.model)
    metadata = apply_delta(model, active.path, active.base_digest)
    # the threshold calibrated on the project's validation tasks (SCORE_THRESHOLD, when set, still wins)
    model.default_score_threshold = float(metadata.get(SCORE_THRESHOLD_METADATA_KEY, active.score_threshold))
    name = f"{base.model_name}+p{active.project_id}-{active.checkpoint_id.rsplit('-', 1)[-1]}"
    return DINOvPredictor(model, device=base.device, resize=base.resize, autocast_dtype=base.autocast_dtype,
                          checkpoint_id=active.checkpoint_id, model_name=name)


def serve_project_models(runtime: Runtime, build: Callable[[Any, ActiveModel], Predictor] | None = None) -> None:
    """Serve each project's active checkpoint from this runtime (the bulk job; the server also trains).
    build: as ProjectModels' (tests give a stand-in)."""
    runtime.project_models = ProjectModels(runtime, TrainingStore(training_db(runtime.settings.model_dir)),
                                           build or build_project_predictor)


def serve_sent_project_model(runtime: Runtime, active: ActiveModel, delta: bytes, folder: Path,
                             build: Callable[[Any, ActiveModel], Predictor] | None = None) -> ActiveModel:
    """Serve one project's checkpoint from this runtime, sent as the delta file's bytes and its record (a Ray
    worker, which may not share MODEL_DIR): the file goes into `folder`, the record into a training store of
    that folder, and the project is served by the same rules as in the server. Returns the record as served."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / Path(active.path).name
    path.write_bytes(delta)
    local = dataclasses.replace(active, path=str(path))
    store = TrainingStore(training_db(folder))
    store.set_active(local)
    runtime.project_models = ProjectModels(runtime, store, build or build_project_predictor)
    return local


def served_project_model(model: ServedModel) -> ActiveModel | None:
    """The project checkpoint that a served model (Runtime.model_for) is; None: the base model."""
    return model.active


class ProjectModels:
    """Each project's active model, loaded on demand, a bounded number in memory.

    Args:
        runtime: the process's Runtime (its base model).
        store: the training store (active checkpoints).
        build: build(base predictor, ActiveModel) -> predictor (tests give a stand-in).
    """

    def __init__(self, runtime: Runtime, store: TrainingStore,
                 build: Callable[[Any, ActiveModel], Predictor] = build_project_predictor):
        self.runtime, self.store, self.build = runtime, store, build
        self.loaded: LRUCache[str, Predictor] = LRUCache(max(1, runtime.settings.project_models_in_memory))
        self._lock = threading.Lock()
        self.stale: dict[int, str] = {}  # project -> why its checkpoint is not served

    def active(self, project_id: int) -> ActiveModel | None:
        """The project's active checkpoint when it can be served now (the base model loaded, and the delta made
        for it); None otherwise (a stale one is remembered in `stale` with the reason)."""
        record = self.store.active(project_id)
        if record is None or not self.runtime.model_loaded:
            return None
        if self.runtime.projects.settings_for(project_id).project_model == "base":
            return None  # rolled back by the project's PROJECT_MODEL (the checkpoint is kept)
        base = self.runtime.checkpoint_id
        if record.base_digest != base:
            self.stale[project_id] = (f"its checkpoint was trained on base {record.base_digest}, the backend now "
                                      f"serves base {base}: the base model serves it until it is trained again")
            return None
        if not os.path.exists(record.path):
            self.stale[project_id] = f"its checkpoint file {record.path} is missing: the base model serves it"
            return None
        self.stale.pop(project_id, None)
        return record

    def predictor(self, active: ActiveModel) -> Predictor:
        found = self.loaded.get(active.checkpoint_id)
        if found is None:
            with self._lock:
                found = self.loaded.get(active.checkpoint_id)
                if found is None:
                    found = self.build(self.runtime.load_model(), active)
                    self.loaded.put(active.checkpoint_id, found)
                    # the model this one pushed out of memory must not stay there through its batcher
                    self.runtime.keep_batchers({self.runtime.checkpoint_id, *self.loaded.keys()})
                    logger.info("project %s: model %s loaded", active.project_id, active.checkpoint_id)
        return found

    def model_for(self, project_id: int) -> ProjectModel | None:
        active = self.active(project_id)
        return ProjectModel(self.runtime, self, active) if active is not None else None

    def delete_project(self, project_id: int) -> None:
        """The project is gone: its checkpoints, its jobs and its active record go with it."""
        active = self.store.active(project_id)
        self.store.delete_project(project_id)
        folder = self.runtime.settings.model_dir / "project_models"
        for path in folder.glob(f"project{int(project_id)}-*.safetensors") if folder.exists() else ():
            path.unlink(missing_ok=True)
        if active is not None:
            self.loaded.pop(active.checkpoint_id)  # frees the model
            self.runtime.batchers.pop(active.checkpoint_id)
        self.stale.pop(project_id, None)


class ProjectModel:
    """A project's fine-tuned model as a ServedModel: its predictor, checkpoint id and feature-cache keys (the
    caches, store and queues stay the runtime's)."""

    def __init__(self, runtime: Runtime, models: ProjectModels, active: ActiveModel):
        self._runtime, self._models, self._active = runtime, models, active

    @property
    def active(self) -> ActiveModel:
        return self._active

    def load_model(self, timeout: float | None = None) -> Predictor:
        self._runtime.load_model(timeout)  # the base (its ModelUnavailable while it loads), then the project's
        return self._models.predictor(self._active)

    @property
    def checkpoint_id(self) -> str:
        return self._active.checkpoint_id

    @property
    def model_name(self) -> str:
        """What model_version names: the base's name, the project and its checkpoint ("demo-1a2b3c4d+p3-5e6f7a8b")."""
        return str(getattr(self.load_model(), "model_name", None) or self.checkpoint_id)

    def encode(self, url: str, task_id: int | None) -> Any:
        return self._runtime.encode_with(self.load_model(), self.checkpoint_id, url, task_id)

    def remember_encoded(self, url: str, encoded: Any) -> None:
        self._runtime.remember_encoded(url, encoded, self.checkpoint_id)
