"""The Runtime: what lives as long as the worker process (the model, its feature cache, the reference store,
the image loader, the work queues, the reference syncs, the per-project records).

    runtime = Runtime(settings, model_factory=..., store=..., images=..., syncer=...)
    runtime.load_model()                  # -> the predictor (raises ModelUnavailable with the reason)
    runtime.encode(url, task_id)          # the encoded image, from the feature cache when it is there
    runtime.queues["sync"].submit(key, fn, *args)   # background work, one bounded queue per kind

Background work runs in named, bounded queues (work_queues.py), one per kind, so that a slow Label Studio or a
long estimate never holds up webhook processing: model (loading, retried with back-off: model_loader.py),
webhooks, sync, embeddings (references embedded ahead of time), estimates, predictions (tasks deferred by
/predict), ahead (the next tasks of an annotator encoded ahead, behind every request: foreground.py). Every
in-memory cache and set has a bound (bounded.py).

The parts that higher packages build are typed here as Protocols and wired in one place (http/app.py
create_app): `training` (training.scheduler.TrainingJobs), `project_models` (serving.project_models.ProjectModels),
`deferred` (serving.deferred.DeferredPredictions) and `ahead` (serving.encode_ahead.EncodeAhead). `model_for(project_id)` is the model that serves a project:
the base model (this runtime) or the project's fine-tuned one.

Objects of labelstudio_backend.serving.backend.DINOvBackend are made per request and use one Runtime.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from concurrent.futures import Future
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from labelstudio_backend.errors import ModelUnavailable
from labelstudio_backend.fetching.images import ImageLoader
from labelstudio_backend.labelstudio.payload import utc_now
from labelstudio_backend.runtime.batching import EncodeBatcher
from labelstudio_backend.runtime.bounded import PROJECTS_MAX, BoundedSet, LRUCache
from labelstudio_backend.runtime.foreground import Foreground, SharedWork
from labelstudio_backend.runtime.model_loader import Backoff, LoadStatus, ModelLoader
from labelstudio_backend.runtime.projects import ProjectRecords
from labelstudio_backend.runtime.work_queues import QueueClosed, QueueFull, QueueSpec, WorkQueues
from labelstudio_backend.settings import Settings
from labelstudio_backend.store import ReferenceStore
from labelstudio_backend.store.training import ActiveModel, TrainingStore

logger = logging.getLogger(__name__)

FAILED_REFERENCE_RETRY_S = 600  # a reference whose image failed is retried after this long
FAILED_REFERENCES_MAX = 10_000  # failed references remembered at most (the oldest are forgotten first)
EMBEDDING_MEMORY_CACHE_SIZE = 4096  # prompt embeddings kept in memory (the store keeps all of them)
MAX_LOAD_RETRY_S = 300.0  # the longest pause between two attempts to load the model
CUDA_BATCH_WINDOW_MS = 5.0  # on a GPU, concurrent encodings wait this long to share one batch
QUEUES = ("model", "webhooks", "sync", "embeddings", "estimates", "deferred", "training", "ahead")


class Predictor(Protocol):
    """What the backend uses of dinov.predictor.DINOvPredictor (the tests' doubles implement the same)."""
    checkpoint_id: str

    def encode_image(self, image: np.ndarray) -> Any: ...
    def encode_images(self, images: Sequence[np.ndarray], batch_size: int = ...) -> list: ...
    def encode_prompts(self, encoded: Any, masks: np.ndarray) -> np.ndarray: ...
    def segment_generic(self, encoded: Any, classes: Sequence[np.ndarray], score_threshold: float | None = ...,
                        max_instances: int = ..., max_examples: int = ...) -> list: ...
    def segment_interactive(self, encoded: Any, points: np.ndarray | None = None,
                            point_labels: np.ndarray | None = None, boxes: np.ndarray | None = None,
                            stroke: np.ndarray | None = None) -> Any: ...


class ServedModel(Protocol):
    """The model that serves a project: the base model (the Runtime itself) or a project's fine-tuned one
    (serving.project_models.ProjectModel). Its checkpoint id keys the feature cache, embeddings and model_version."""

    @property
    def checkpoint_id(self) -> str: ...
    @property
    def model_name(self) -> str: ...
    @property
    def active(self) -> ActiveModel | None: ...
    def load_model(self, timeout: float | None = None) -> Predictor: ...
    def encode(self, url: str, task_id: int | None) -> Any: ...
    def remember_encoded(self, url: str, encoded: Any) -> None: ...


class ProjectModelSource(Protocol):
    """Each project's active fine-tuned model (serving.project_models.ProjectModels)."""

    stale: dict[int, str]

    def model_for(self, project_id: int) -> ServedModel | None: ...
    def active(self, project_id: int) -> ActiveModel | None: ...
    def delete_project(self, project_id: int) -> None: ...


class TrainingScheduler(Protocol):
    """Start Training's jobs per project (training.scheduler.TrainingJobs)."""

    store: TrainingStore

    def start(self, project_id: int, label_config: str | None, settings: Settings, reason: str,
              annotated: int = 0) -> dict: ...
    def request(self, project_id: int, label_config: str | None, settings: Settings, project: dict | None,
                reason: str = ...) -> dict: ...
    def job_status(self, job: Any) -> dict | None: ...
    def count_annotations(self, project_id: int, count: int, label_config: str | None,
                          settings: Settings) -> None: ...
    def cancel(self, project_id: int, why: str) -> list[int]: ...
    def status(self, project_id: int) -> dict: ...
    def wait(self, project_id: int, timeout: float) -> dict | None: ...
    def shutdown(self) -> None: ...


class DeferredPredictions(Protocol):
    """Where /predict hands the tasks that did not fit into PREDICT_TIME_BUDGET (serving.deferred)."""

    def claimed(self, project_id: int, model_version: str) -> frozenset[int]: ...
    def defer(self, project_id: int, label_config: str | None, tasks: list[dict], model_version: str) -> list: ...
    def schedule(self) -> None: ...
    def close(self) -> None: ...


class TasksAhead(Protocol):
    """Encodes the tasks an annotator will open next when one opens (serving.encode_ahead)."""

    def task_opened(self, project_id: int, label_config: str | None, task: dict) -> None: ...
    def close(self) -> None: ...


def default_model_factory(settings: Settings) -> Predictor:
    """DINOvPredictor of DINOV_CHECKPOINT on DEVICE (downloaded into MODEL_DIR when it is a released name)."""
    from dinov.predictor import DINOvPredictor

    return DINOvPredictor.from_checkpoint(settings.checkpoint, device=settings.device, cache_dir=settings.model_dir)


def feature_key(url: str, checkpoint_id: str) -> tuple[str, str]:
    """Key of an encoded image in the feature cache: the image URL and the weights that encoded it."""
    return (url, checkpoint_id)


# Model work is serialised per device: one lock per device, shared by every runtime of the process.
DEVICE_LOCKS: dict[str, threading.Lock] = defaultdict(threading.Lock)


class Runtime:
    """Everything that lives as long as the worker process.

    Args:
        settings: the process's settings (per-project overrides are applied per request, not here).
        model_factory: settings -> predictor (default: default_model_factory).
        store: a ReferenceStore (default: MODEL_DIR/references.sqlite3, opened on first use).
        images: the image loader (default: ImageLoader(settings)).
        syncer: syncer(project_id, full=False) pulls a project's annotations from the Label Studio API into the store (run in
            the background on a project's first use and on START_TRAINING; None: webhooks only).
    """

    def __init__(self, settings: Settings, model_factory: Callable[[Settings], Predictor] | None = None,
                 store: ReferenceStore | None = None, images: ImageLoader | None = None,
                 syncer: Callable[..., Any] | None = None):
        self.settings = settings
        self.model_factory = model_factory or default_model_factory
        self.images = images or ImageLoader(settings)
        self.syncer = syncer
        self.projects = ProjectRecords(settings)
        self._store = store
        self._store_lock = threading.Lock()
        self.queues = WorkQueues({name: QueueSpec(workers=1, max_pending=settings.work_queue_size)
                                  for name in QUEUES})
        self.loader: ModelLoader[Predictor] = ModelLoader(
            lambda: self.model_factory(self.settings),
            f"loading DINOV_CHECKPOINT={settings.checkpoint} on DEVICE={settings.device}",
            Backoff(initial=settings.model_load_retry_s, maximum=max(MAX_LOAD_RETRY_S, settings.model_load_retry_s)))
        self.features: LRUCache[tuple[str, str], Any] = LRUCache(settings.feature_cache_size)  # -> encoded image
        self._encodings = SharedWork()  # an image being encoded is not encoded a second time meanwhile
        self.foreground = Foreground()  # the requests in flight, which background model work waits for
        # predictions made ahead of a task's opening (serving.encode_ahead), keyed by what they depend on
        self.predicted_ahead: LRUCache[tuple, dict] = LRUCache(settings.feature_cache_size)
        # checkpoint id -> the encoder of its model's requests: the base model's and those of the loaded project
        # models (requests alternating between them keep their batchers)
        self.batchers: LRUCache[str, EncodeBatcher] = LRUCache(max(1, settings.project_models_in_memory) + 1)
        self._batchers_lock = threading.Lock()
        self.embeddings: LRUCache[str, np.ndarray] = LRUCache(EMBEDDING_MEMORY_CACHE_SIZE)  # embedding key -> vector
        self._failed_refs: BoundedSet[str] = BoundedSet(FAILED_REFERENCES_MAX, ttl=FAILED_REFERENCE_RETRY_S)
        self._syncs: LRUCache[int, Future] = LRUCache(PROJECTS_MAX)       # project -> its latest sync
        self.last_sync: LRUCache[int, str] = LRUCache(PROJECTS_MAX)       # project -> when this process synced it
        self.sync_errors: LRUCache[int, str] = LRUCache(PROJECTS_MAX)     # project -> why its last sync failed
        self.known_projects: BoundedSet[int] = BoundedSet(PROJECTS_MAX)   # projects /metrics reports
        self._task_seconds: float | None = None  # moving average of one pre-annotated task, for the time budget
        self.on_task_failed: Callable[[str], None] = lambda reason: None  # the server counts these
        self.on_references_changed: Callable[[int], object] = lambda project_id: None  # the server embeds ahead
        self.on_tasks_predicted: Callable[[str, int], None] = lambda mode, count: None  # the server counts these
        # Wired by create_app (and the bulk job for project models); None: that capability is off.
        self.deferred: DeferredPredictions | None = None  # None: tasks over the budget wait for the next call
        self.ahead: TasksAhead | None = None  # None: nothing is encoded ahead
        self.training: TrainingScheduler | None = None
        self.project_models: ProjectModelSource | None = None

    # --- the model

    def start_loading(self) -> Future:
        """Load the model in the model queue (retried with back-off until it loads), so that /setup and /health
        answer at once."""
        return self.queues["model"].submit("load", self.loader.run)

    def load_model(self, timeout: float | None = None) -> Predictor:
        """The predictor; starts loading it if nobody did and waits up to `timeout` seconds (None: until it loads
        or fails). Raises ModelUnavailable with the reason while it cannot be used (a failed load is retried in
        the background; the reason says when)."""
        model = self.loader.model
        if model is not None:
            return model
        if self.loader.status().state == "not started":
            try:
                self.start_loading()
            except QueueClosed:
                pass
        model = self.loader.wait(timeout)
        if model is None:
            raise ModelUnavailable(self.loader.status().reason or "the model is not loaded")
        return model

    def model_status(self) -> LoadStatus:
        return self.loader.status()

    @property
    def model_loaded(self) -> bool:
        return self.loader.model is not None

    @property
    def model_error(self) -> str | None:
        """Why the model cannot be used now (None once it can, and while the first load runs)."""
        status = self.loader.status()
        return status.reason if status.error else None

    @property
    def checkpoint_id(self) -> str:
        return str(getattr(self.loader.model, "checkpoint_id", None) or self.settings.checkpoint)

    @property
    def model_name(self) -> str:
        """The loaded checkpoint's readable name, e.g. "demo-1a2b3c4d" (name and the start of its digest)."""
        return str(getattr(self.loader.model, "model_name", None) or self.settings.checkpoint)

    @property
    def on_gpu(self) -> bool:
        return "cuda" in str(getattr(self.load_model(), "device", "cpu"))

    @property
    def device_lock(self) -> threading.Lock:
        """The lock that serialises model work on the predictor's device."""
        return DEVICE_LOCKS[str(getattr(self.loader.model, "device", self.settings.device))]

    @property
    def active(self) -> ActiveModel | None:
        """The base model is no project's checkpoint (ServedModel)."""
        return None

    def model_for(self, project_id: int | None) -> ServedModel:
        """The model that serves the project: its fine-tuned one when it has an active one that can be served
        (serving.project_models), else the base model (this runtime)."""
        if project_id is None or self.project_models is None:
            return self
        return self.project_models.model_for(project_id) or self

    # --- the feature cache

    def encode(self, url: str, task_id: int | None) -> Any:
        """The encoded image at `url` (task_id: for presigning cloud URLs), from the per-process feature cache
        when it is there."""
        predictor = self.load_model()  # an unloadable model is the error to report, not the image
        return self.encode_with(predictor, self.checkpoint_id, url, task_id)

    def encode_with(self, predictor: Predictor, checkpoint_id: str, url: str, task_id: int | None) -> Any:
        """encode() with a given model (a project's fine-tuned one), cached under its checkpoint id."""
        key = feature_key(url, checkpoint_id)
        encoded = self.features.get(key)
        if encoded is not None:
            return encoded

        def compute() -> Any:
            found = self.features.get(key)  # put there just before this caller came
            if found is None:
                found = self.batcher(predictor).encode(self.images.load(url, task_id))
                self.features.put(key, found)
            return found

        return self._encodings.run(key, compute)  # a task opened while it is encoded ahead waits for that

    def batcher(self, predictor: Predictor) -> EncodeBatcher:
        """The encoder of this process's requests to this predictor (one per checkpoint id, the base model's and
        each loaded project model's): concurrent encodings share one batch on a GPU."""
        key = str(predictor.checkpoint_id)
        found = self.batchers.get(key)
        if found is None or found.predictor is not predictor:
            with self._batchers_lock:
                found = self.batchers.get(key)
                if found is None or found.predictor is not predictor:  # none yet, or the model was loaded again
                    window = self.settings.batch_window_ms
                    if window is None:
                        window = CUDA_BATCH_WINDOW_MS if "cuda" in str(getattr(predictor, "device", "cpu")) else 0.0
                    found = EncodeBatcher(predictor, window_ms=window, max_batch=self.settings.max_batch,
                                          lock=self.device_lock)
                    self.batchers.put(key, found)
        return found

    def keep_batchers(self, checkpoint_ids: set[str]) -> None:
        """Drop the batchers of other models, so that a batcher never keeps an unloaded project model in memory."""
        for key in self.batchers.keys():
            if key not in checkpoint_ids:
                self.batchers.pop(key)

    def remember_encoded(self, url: str, encoded: Any, checkpoint_id: str | None = None) -> None:
        """Put an image encoded elsewhere (a bulk batch) into the feature cache, where encode() finds it."""
        self.features.put(feature_key(url, checkpoint_id or self.checkpoint_id), encoded)

    # --- the reference store and its sync

    @property
    def store(self) -> ReferenceStore:
        """The ReferenceStore (opened on first use, in the worker that uses it: never before gunicorn forks)."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    self.settings.model_dir.mkdir(parents=True, exist_ok=True)
                    self._store = ReferenceStore(self.settings.db_path)
        return self._store

    def ensure_synced(self, project_id: int, force: bool = False, full: bool = False) -> Future | None:
        """Start the project's reference sync in the sync queue (once per process, or again if forced or failed);
        None without a syncer. A sync of the project already waiting is not queued twice; QueueFull when the
        queue holds WORK_QUEUE_SIZE syncs of other projects."""
        if self.syncer is None:
            return None
        future = self._syncs.get(project_id)
        if future is not None and not force and not (future.done() and future.exception() is not None):
            return future
        future = self.queues["sync"].submit(("sync", project_id, full), self._sync, project_id, full)
        self._syncs.put(project_id, future)
        return future

    def _sync(self, project_id: int, full: bool = False) -> Any:
        if self.syncer is None:
            return None
        try:
            report = self.syncer(project_id, full=True) if full else self.syncer(project_id)  # full: issue 20
        except Exception as error:  # kept for /references; the store is as it was (sync.py changes nothing then)
            self.sync_errors.put(project_id, f"{type(error).__name__}: {error}"[:1000])
            raise
        self.sync_errors.pop(project_id)
        self.last_sync.put(project_id, utc_now())
        self.on_references_changed(project_id)
        if getattr(report, "project_deleted", False) and self.project_models is not None:
            self.project_models.delete_project(project_id)  # confirmed gone from Label Studio: its checkpoints too
        return report

    def forget_project(self, project_id: int) -> None:
        """PROJECT_DELETED: drop the project's records and sync state (the store is cleared separately)."""
        self._syncs.pop(project_id)
        self.last_sync.pop(project_id)
        self.sync_errors.pop(project_id)
        self.known_projects.discard(project_id)
        self.projects.forget(project_id)

    # --- references that failed

    def reference_failed(self, key: str) -> bool:
        """Whether the example with this embedding key failed less than FAILED_REFERENCE_RETRY_S ago."""
        return key in self._failed_refs

    def mark_reference_failed(self, key: str) -> None:
        self._failed_refs.add(key)

    # --- the time a task takes (for PREDICT_TIME_BUDGET)

    @property
    def task_seconds(self) -> float:
        """How long pre-annotating one task took lately in this process (0 before the first)."""
        return self._task_seconds or 0.0

    def record_task_seconds(self, seconds: float) -> None:
        previous = self._task_seconds
        self._task_seconds = seconds if previous is None else 0.7 * previous + 0.3 * seconds

    # --- background work

    def try_submit(self, queue: str, key: Any, fn: Callable, *args: Any) -> Future | None:
        """Queue work that can wait for a later occasion: None (logged) when the queue is full or closed."""
        try:
            return self.queues[queue].submit(key, fn, *args)
        except (QueueFull, QueueClosed) as error:
            logger.warning("not queued now (%s): %s", key, error)
            return None

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop retrying the model load, cancel queued work, wait up to `timeout` s for running jobs. Kept work
        (webhook events, deferred tasks) stays in the store for the next start."""
        self.loader.close()
        if self.deferred is not None:
            self.deferred.close()
        if self.ahead is not None:
            self.ahead.close()
        self.queues.shutdown(timeout)

