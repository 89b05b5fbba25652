"""The Runtime: what lives as long as the worker process (the model, its feature cache, the reference store,
the image loader, the background executor, the reference syncs, the per-project records).

    runtime = Runtime(settings, model_factory=..., store=..., images=..., syncer=...)
    runtime.load_model()                  # -> the predictor (raises ModelUnavailable with the reason)
    runtime.encode(url, task_id)          # the encoded image, from the feature cache when it is there
    runtime.submit("what", fn, *args)     # background work (the one place that uses the executor)

Objects of labelstudio_backend.backend.DINOvBackend are made per request and use one Runtime.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Hashable, Protocol, Sequence

import numpy as np

from labelstudio_backend.errors import ModelUnavailable
from labelstudio_backend.images import ImageLoader
from labelstudio_backend.payload import utc_now
from labelstudio_backend.projects import ProjectRecords
from labelstudio_backend.settings import Settings

logger = logging.getLogger(__name__)

FAILED_REFERENCE_RETRY_S = 600  # a reference whose image failed is retried after this long
EMBEDDING_MEMORY_CACHE_SIZE = 4096  # prompt embeddings kept in memory (the store keeps all of them)


class Predictor(Protocol):
    """What the backend uses of dinov.predictor.DINOvPredictor (the tests' doubles implement the same)."""
    checkpoint_id: str

    def encode_image(self, image: np.ndarray) -> Any: ...
    def encode_prompts(self, encoded: Any, masks: np.ndarray) -> np.ndarray: ...
    def segment_generic(self, encoded: Any, classes: Sequence[np.ndarray], score_threshold: float | None = ...,
                        max_instances: int = ..., max_examples: int = ...) -> list: ...
    def segment_interactive(self, encoded: Any, points=None, point_labels=None, boxes=None, stroke=None) -> Any: ...


def default_model_factory(settings: Settings) -> Predictor:
    """DINOvPredictor of DINOV_CHECKPOINT on DEVICE (downloaded into MODEL_DIR when it is a released name)."""
    from dinov.predictor import DINOvPredictor

    return DINOvPredictor.from_checkpoint(settings.checkpoint, device=settings.device, cache_dir=settings.model_dir)


def feature_key(url: str, checkpoint_id: str) -> tuple[str, str]:
    """Key of an encoded image in the feature cache: the image URL and the weights that encoded it."""
    return (url, checkpoint_id)


class LRUCache:
    """A thread-safe mapping that keeps the `size` most recently used entries."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        """The value, or None when absent (and mark it used)."""
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key: Hashable, value: Any) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


# Model work is serialised per device: one lock per device, shared by every runtime of the process.
DEVICE_LOCKS: dict[str, threading.Lock] = defaultdict(threading.Lock)


class Runtime:
    """Everything that lives as long as the worker process.

    Args:
        settings: the process's settings (per-project overrides are applied per request, not here).
        model_factory: settings -> predictor (default: default_model_factory).
        store: a ReferenceStore (default: MODEL_DIR/references.sqlite3, opened on first use).
        images: the image loader (default: ImageLoader(settings)).
        syncer: syncer(project_id) pulls a project's annotations from the Label Studio API into the store (run in
            the background on a project's first use and on START_TRAINING; None: webhooks only).
    """

    def __init__(self, settings: Settings, model_factory: Callable[[Settings], Predictor] | None = None,
                 store: Any = None, images: Any = None, syncer: Callable[[int], Any] | None = None):
        self.settings = settings
        self.model_factory = model_factory or default_model_factory
        self.images = images or ImageLoader(settings)
        self.syncer = syncer
        self.projects = ProjectRecords(settings)
        self._store = store
        self._predictor: Predictor | None = None
        self._model_error: str | None = None
        self._model_lock = threading.Lock()
        self._store_lock = threading.Lock()
        self.features = LRUCache(settings.feature_cache_size)        # feature_key -> encoded image
        self.embeddings = LRUCache(EMBEDDING_MEMORY_CACHE_SIZE)      # embedding key -> vector
        self._failed_refs: dict[str, float] = {}
        self.background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinov-background")
        self._synced: dict[int, Future] = {}
        self._sync_lock = threading.Lock()
        self.last_sync: dict[int, str] = {}
        self.known_projects: set[int] = set()
        self.on_task_failed: Callable[[str], None] = lambda reason: None  # the server counts these
        self.deferral: Deferral | None = None  # None: tasks over the time budget are left for the next call
        self.training: Any = None        # labelstudio_backend.training.TrainingJobs (the server installs it)
        self.project_models: Any = None  # labelstudio_backend.project_models.ProjectModels (likewise)

    # --- the model

    def load_model(self) -> Predictor:
        """The predictor, loaded on the first call; raises ModelUnavailable (with the reason) when it cannot be
        loaded, on this and every later call."""
        if self._predictor is None:
            with self._model_lock:
                if self._predictor is None:
                    if self._model_error is not None:
                        raise ModelUnavailable(self._model_error)
                    started = time.perf_counter()
                    try:
                        self._predictor = self.model_factory(self.settings)
                    except Exception as e:  # any failure to load is reported, not raised as a trace
                        self._model_error = (f"loading DINOV_CHECKPOINT={self.settings.checkpoint} on "
                                             f"DEVICE={self.settings.device} failed: {e}")
                        logger.error(self._model_error, exc_info=not isinstance(e, (ValueError, OSError)))
                        raise ModelUnavailable(self._model_error) from None
                    logger.info("model %s loaded in %.1f s", self.checkpoint_id, time.perf_counter() - started)
        return self._predictor

    @property
    def predictor(self) -> Predictor:
        """The loaded predictor (load_model on first use)."""
        return self.load_model()

    def start_loading(self) -> Future:
        """Load the model in the background so that /setup and /health answer at once."""
        return self.submit("loading the model", self._load_quietly)

    def _load_quietly(self) -> None:
        try:
            self.load_model()
        except ModelUnavailable:
            pass  # model_error says why; requests answer 503

    @property
    def model_loaded(self) -> bool:
        return self._predictor is not None

    @property
    def model_error(self) -> str | None:
        return self._model_error

    @property
    def checkpoint_id(self) -> str:
        return str(getattr(self._predictor, "checkpoint_id", None) or self.settings.checkpoint)

    @property
    def model_name(self) -> str:
        """The loaded checkpoint's readable name, e.g. "demo-1a2b3c4d" (name and the start of its digest)."""
        return str(getattr(self._predictor, "model_name", None) or self.settings.checkpoint)

    @property
    def on_gpu(self) -> bool:
        return "cuda" in str(getattr(self.load_model(), "device", "cpu"))

    @property
    def device_lock(self) -> threading.Lock:
        """The lock that serialises model work on the predictor's device."""
        return DEVICE_LOCKS[str(getattr(self._predictor, "device", self.settings.device))]

    def for_project(self, project_id: int | None) -> Any:
        """The runtime as the project sees it: a view with the project's fine-tuned model when it has an active
        one (labelstudio_backend.project_models), else this runtime (the base model)."""
        if project_id is None or self.project_models is None:
            return self
        return self.project_models.view(project_id) or self

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
        if encoded is None:
            image = self.images.load(url, task_id)
            with self.device_lock:
                encoded = predictor.encode_image(image)
            self.features.put(key, encoded)
        return encoded

    def remember_encoded(self, url: str, encoded: Any, checkpoint_id: str | None = None) -> None:
        """Put an image encoded elsewhere (a bulk batch) into the feature cache, where encode() finds it."""
        self.features.put(feature_key(url, checkpoint_id or self.checkpoint_id), encoded)

    # --- the reference store and its sync

    @property
    def store(self) -> Any:
        """The ReferenceStore (opened on first use, in the worker that uses it: never before gunicorn forks)."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    from labelstudio_backend.store import ReferenceStore

                    self.settings.model_dir.mkdir(parents=True, exist_ok=True)
                    self._store = ReferenceStore(self.settings.db_path)
        return self._store

    def ensure_synced(self, project_id: int, force: bool = False) -> Future | None:
        """Start the project's reference sync in the background (once per process, or again if forced or
        failed); None without a syncer."""
        if self.syncer is None:
            return None
        with self._sync_lock:
            future = self._synced.get(project_id)
            if future is not None and not force and not (future.done() and future.exception() is not None):
                return future
            future = self.submit(f"syncing the references of project {project_id}", self._sync, project_id)
            self._synced[project_id] = future
            return future

    def _sync(self, project_id: int) -> None:
        report = self.syncer(project_id)
        self.last_sync[project_id] = utc_now()
        if getattr(report, "project_deleted", False) and self.project_models is not None:
            self.project_models.delete_project(project_id)  # confirmed gone from Label Studio: its checkpoints too

    def forget_project(self, project_id: int) -> None:
        """PROJECT_DELETED: drop the project's records and sync state (the store is cleared separately)."""
        self._synced.pop(project_id, None)
        self.projects.forget(project_id)

    # --- references that failed

    def reference_failed(self, key: str) -> bool:
        """Whether the example with this embedding key failed less than FAILED_REFERENCE_RETRY_S ago."""
        failed_at = self._failed_refs.get(key)
        return failed_at is not None and time.time() - failed_at < FAILED_REFERENCE_RETRY_S

    def mark_reference_failed(self, key: str) -> None:
        self._failed_refs[key] = time.time()

    # --- background work

    def submit(self, what: str, fn: Callable, *args: Any) -> Future:
        """Run fn(*args) in the background; a failure is logged with `what` (and kept in the future)."""
        def run():
            try:
                return fn(*args)
            except Exception:
                logger.exception("background job failed: %s", what)
                raise
        return self.background.submit(run)

    def shutdown(self) -> None:
        self.background.shutdown(wait=False, cancel_futures=True)


class Deferral(Protocol):
    """Where /predict hands the tasks that did not fit into PREDICT_TIME_BUDGET (the server installs
    labelstudio_backend.background.BackgroundPredictions as runtime.deferral)."""

    def claimed(self, project_id: int, model_version: str) -> frozenset[int]: ...
    def defer(self, project_id: int, label_config: str | None, tasks: list[dict], model_version: str) -> list: ...
