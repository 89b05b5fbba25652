"""DINOvBackend: the model class of the Label Studio ML backend (label-studio-ml 2.x interface).

    backend = DINOvBackend(project_id=3, label_config=xml, runtime=runtime)
    backend.setup()                                   # -> model_version
    backend.predict(tasks, context=None)              # one prediction per task, in task order
    backend.fit("ANNOTATION_UPDATED", webhook_payload)

Objects of this class are cheap and made per request; what lives as long as the process (the model,
the reference store, the image loader, the feature cache, the background worker) is the Runtime.

Pre-annotation (no context): every task image is segmented generically against the project's
per-label banks of in-context examples (the regions of its annotations, up to N per label, most
recent first, never the task's own annotation). A reference drawn as a box or a keypoint is first
turned into the object's mask by interactive segmentation on its own image, since a filled box is
half background. Prompt embeddings are cached in the store per (annotation, region, annotation's
updated_at, checkpoint), so no reference image is encoded twice.

Interactive refinement (context): the regions drawn now (clicks, negative clicks, boxes, strokes)
give one mask with the drawn label; INTERACTIVE_MODE=similar returns every similar object instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from labelstudio_backend.images import ImageLoader
from labelstudio_backend.label_config import LabelConfigError, ParsedConfig, parse_label_config
from labelstudio_backend.regions import RegionError, RegionPrompt, mask_to_regions, region_to_prompt
from labelstudio_backend.settings import PER_PROJECT_FIELDS, Settings, SettingsError, parse_extra_params

logger = logging.getLogger(__name__)

EMBEDDING_KEY_VERSION = "v1"   # bump when the way a region becomes a prompt mask changes
DUPLICATE_IOU = 0.8            # same-label instances overlapping more than this are one object
FAILED_REFERENCE_RETRY_S = 600  # a reference whose image failed is retried after this long
FIRST_SYNC_WAIT_S = 20.0       # how long the first prediction of a project waits for its reference sync
TRAINING_EVENTS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                   "START_TRAINING", "PROJECT_DELETED", "PROJECT_UPDATED", "TASKS_CREATED", "TASKS_DELETED")


def box_reference_mask(segmented: np.ndarray | None, filled_box: np.ndarray, min_cover: float = 0.3) -> np.ndarray:
    """The prompt mask of a box reference: the object segmented from the box, clipped to the box; the
    filled box when the segmentation covers less than `min_cover` of it (a miss, not the object)."""
    if segmented is None:
        return filled_box
    inside = segmented & filled_box
    if inside.sum() < min_cover * filled_box.sum():
        return filled_box
    return inside


class BackendError(ValueError):
    """A request the backend cannot serve as given; the message says why (answered as a 4xx)."""


class ModelUnavailable(RuntimeError):
    """The model could not be loaded (answered as 503 with the reason)."""


class Predictor(Protocol):
    """What the backend uses of dinov.predictor.DINOvPredictor (a test double implements the same)."""
    checkpoint_id: str

    def encode_image(self, image: np.ndarray) -> Any: ...
    def encode_prompts(self, encoded: Any, masks: np.ndarray) -> np.ndarray: ...
    def segment_generic(self, encoded: Any, classes: Sequence[np.ndarray], score_threshold: float | None = ...,
                        max_instances: int = ..., max_examples: int = ...) -> list: ...
    def segment_interactive(self, encoded: Any, points=None, point_labels=None, boxes=None, stroke=None) -> Any: ...


def default_model_factory(settings: Settings) -> Predictor:
    from dinov.predictor import DINOvPredictor

    return DINOvPredictor.from_checkpoint(settings.checkpoint, device=settings.device, cache_dir=settings.model_dir)


def parse_project_id(project: Any) -> int:
    """Label Studio names a project '<id>.<created unix time>'; webhooks give {'id': <id>}."""
    if isinstance(project, dict):
        project = project.get("id")
    text = str(project if project is not None else "").split(".", 1)[0].strip()
    if not text.isdigit():
        raise BackendError(f"project {project!r} is not a Label Studio project id ('<id>' or '<id>.<created>')")
    return int(text)


# --- process-wide state --------------------------------------------------------------------------------------

class _LRU:
    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


_DEVICE_LOCKS: dict[str, threading.Lock] = defaultdict(threading.Lock)


class Runtime:
    """Everything that lives as long as the worker process.

    model_factory(settings) -> predictor; store: a ReferenceStore (default: MODEL_DIR/references.sqlite3);
    syncer(project_id) pulls a project's annotations from the Label Studio API into the store (run in
    the background on a project's first use and on START_TRAINING; None: webhooks only).
    """

    def __init__(self, settings: Settings, model_factory: Callable[[Settings], Predictor] | None = None,
                 store: Any = None, images: ImageLoader | None = None,
                 syncer: Callable[[int], Any] | None = None):
        self.settings = settings
        self.model_factory = model_factory or default_model_factory
        self.images = images or ImageLoader(settings)
        self.syncer = syncer
        self._store = store
        self._predictor: Predictor | None = None
        self._model_error: str | None = None
        self._model_lock = threading.Lock()
        self._store_lock = threading.Lock()
        self.features = _LRU(settings.feature_cache_size)     # url -> encoded image
        self.embeddings = _LRU(4096)                           # embedding key -> vector
        self._failed_refs: dict[str, float] = {}
        self.background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinov-background")
        self._synced: dict[int, Future] = {}
        self._sync_lock = threading.Lock()
        self.last_sync: dict[int, str] = {}
        self.estimates: dict[int, dict] = {}
        self.known_projects: set[int] = set()
        self.on_task_failed: Callable[[str], None] = lambda reason: None  # the server counts these

    # the model

    def start_loading(self) -> Future:
        """Load the model in the background so /setup and /health answer at once."""
        return self.background.submit(self._load_quietly)

    def _load_quietly(self) -> None:
        try:
            self.predictor
        except ModelUnavailable:
            pass

    @property
    def predictor(self) -> Predictor:
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
    def model_loaded(self) -> bool:
        return self._predictor is not None

    @property
    def model_error(self) -> str | None:
        return self._model_error

    @property
    def checkpoint_id(self) -> str:
        return str(getattr(self._predictor, "checkpoint_id", None) or self.settings.checkpoint)

    @property
    def device_lock(self) -> threading.Lock:
        """Model work is serialised per device: one lock per device, shared by every runtime of the process."""
        return _DEVICE_LOCKS[str(getattr(self._predictor, "device", self.settings.device))]

    def encode(self, url: str, task_id: int | None) -> Any:
        """The encoded image at `url`, from the per-process feature cache when it is there."""
        key = (url, self.checkpoint_id)
        encoded = self.features.get(key)
        if encoded is None:
            predictor = self.predictor  # an unloadable model is the error to report, not the image
            image = self.images.load(url, task_id)
            with self.device_lock:
                encoded = predictor.encode_image(image)
            self.features.put(key, encoded)
        return encoded

    # the reference store

    @property
    def store(self):
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    from labelstudio_backend.store import ReferenceStore

                    self.settings.model_dir.mkdir(parents=True, exist_ok=True)
                    self._store = ReferenceStore(self.settings.db_path)
        return self._store

    def ensure_synced(self, project_id: int, force: bool = False) -> Future | None:
        """Start the project's reference sync in the background (once per process, or again if forced)."""
        if self.syncer is None:
            return None
        with self._sync_lock:
            future = self._synced.get(project_id)
            if future is not None and not force and not (future.done() and future.exception() is not None):
                return future
            future = self.background.submit(self._sync, project_id)
            self._synced[project_id] = future
            return future

    def _sync(self, project_id: int) -> None:
        try:
            self.syncer(project_id)
            self.last_sync[project_id] = _now()
        except Exception:
            logger.exception("syncing the references of project %s from Label Studio failed", project_id)
            raise

    # per-project settings (Label Studio sends extra_params to /setup only; /predict may reach another worker)

    def _project_file(self, project_id: int) -> Path:
        return self.settings.model_dir / "projects" / f"{project_id}.json"

    def save_project(self, project_id: int, extra_params: Any, label_config: str | None) -> None:
        params = parse_extra_params(extra_params)
        self.settings.with_overrides(params)  # refuse bad values before keeping them
        record = {"extra_params": params, "label_config": label_config, "updated_at": _now()}
        _write_json(self._project_file(project_id), record)

    def load_project(self, project_id: int) -> dict:
        return _read_json(self._project_file(project_id)) or {}

    def save_estimate(self, project_id: int, estimate: dict) -> None:
        self.estimates[project_id] = estimate
        _write_json(self._project_file(project_id).with_suffix(".estimate.json"), estimate)

    def load_estimate(self, project_id: int) -> dict | None:
        """The last leave-one-out estimate (this process's, or one another worker wrote)."""
        return self.estimates.get(project_id) or _read_json(self._project_file(project_id).with_suffix(".estimate.json"))

    def forget_project(self, project_id: int) -> None:
        self.estimates.pop(project_id, None)
        self._synced.pop(project_id, None)
        for path in (self._project_file(project_id), self._project_file(project_id).with_suffix(".estimate.json")):
            try:
                path.unlink()
            except OSError:
                pass

    def project_settings(self, project_id: int | None) -> Settings:
        if project_id is None:
            return self.settings
        return self.settings.with_overrides(self.load_project(project_id).get("extra_params"))

    # bookkeeping

    def reference_failed(self, key: str) -> bool:
        failed_at = self._failed_refs.get(key)
        return failed_at is not None and time.time() - failed_at < FAILED_REFERENCE_RETRY_S

    def mark_reference_failed(self, key: str) -> None:
        self._failed_refs[key] = time.time()

    def submit(self, what: str, fn: Callable, *args) -> Future:
        def run():
            try:
                return fn(*args)
            except Exception:
                logger.exception("background job failed: %s", what)
                raise
        return self.background.submit(run)

    def shutdown(self) -> None:
        self.background.shutdown(wait=False, cancel_futures=True)


# --- the model class ---------------------------------------------------------------------------------------

@dataclass
class _Kept:
    label: str
    mask: np.ndarray
    score: float


class DINOvBackend:
    """Label Studio ML backend model class: setup / predict / fit, per project."""

    def __init__(self, project_id: int | str | None = None, label_config: str | None = None,
                 runtime: Runtime | None = None, **kwargs):
        if runtime is None:
            raise BackendError("DINOvBackend needs a Runtime (create_app builds one)")
        self.runtime = runtime
        self.project_id = parse_project_id(project_id) if project_id not in (None, "") else None
        if label_config is None and self.project_id is not None:
            label_config = runtime.load_project(self.project_id).get("label_config")
        self.label_config = label_config
        self.settings = runtime.project_settings(self.project_id)
        if self.project_id is not None:
            runtime.known_projects.add(self.project_id)

    # --- label-studio-ml interface

    @property
    def parsed_label_config(self) -> ParsedConfig:
        if not self.label_config:
            raise LabelConfigError("no labeling config: Label Studio sends it with /setup and /predict")
        return parse_label_config(self.label_config)

    @property
    def model_version(self) -> str:
        """Names the checkpoint, the project's reference revision and its per-project settings, so that new
        examples or settings make Label Studio ask for new predictions."""
        revision = self.runtime.store.revision(self.project_id) if self.project_id is not None else 0
        tuned = {name: getattr(self.settings, name) for name in sorted(PER_PROJECT_FIELDS)}
        digest = hashlib.sha1(json.dumps(tuned, sort_keys=True, default=str).encode()).hexdigest()[:6]
        return f"dinov-{self.runtime.checkpoint_id}-refs{revision}-{digest}"

    def setup(self, extra_params: Any = None) -> str:
        """Remember the project's config and extra_params, start its reference sync, return model_version."""
        if self.label_config:
            self.parsed_label_config  # a config this backend cannot use is refused here, where LS shows it
        if self.project_id is not None:
            self.runtime.save_project(self.project_id, extra_params, self.label_config)
            self.settings = self.runtime.project_settings(self.project_id)
            self.runtime.ensure_synced(self.project_id)
        return self.model_version

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict | list]:
        """One prediction per task, in task order.

        Without context: pre-annotation. A task whose image fails gets an empty result (reason
        logged); tasks left when PREDICT_TIME_BUDGET runs out get what `defer_tasks` returns (`[]`, stored
        as nothing, while a background thread predicts and posts them). With a context
        holding drawn regions: interactive refinement of exactly one task.
        """
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise BackendError("'tasks' must be a list of task objects")
        config = self.parsed_label_config
        if isinstance(context, dict) and context.get("result"):
            if len(tasks) != 1:
                raise BackendError(f"an interactive call must carry exactly one task, got {len(tasks)}")
            return [self.predict_interactive(tasks[0], context["result"], config)]
        return self.predict_tasks(tasks, config)

    def fit(self, event: str, data: dict, **kwargs) -> dict:
        """Apply a webhook event to the reference store (quickly; heavy work goes to the background)."""
        if event not in TRAINING_EVENTS:
            return {"status": "ignored", "event": event}
        runtime, pid = self.runtime, self.project_id
        if pid is None:
            raise BackendError(f"{event}: the payload names no project")
        if event in ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"):
            pairs = _annotation_task_pairs(data)
            runtime.submit(f"{event} in project {pid}", self._upsert_and_warm, pairs)
            return {"status": "queued", "event": event, "annotations": len(pairs)}
        if event == "ANNOTATIONS_DELETED":
            ids = [int(a["id"] if isinstance(a, dict) else a) for a in data.get("annotations") or []]
            runtime.submit(f"{event} in project {pid}", runtime.store.delete_annotations, pid, ids)
            return {"status": "queued", "event": event, "annotations": len(ids)}
        if event == "TASKS_DELETED":  # their annotations go with them
            ids = [int(t["id"] if isinstance(t, dict) else t) for t in data.get("tasks") or []]
            runtime.submit(f"{event} in project {pid}", runtime.store.delete_tasks, pid, ids)
            return {"status": "queued", "event": event, "tasks": len(ids)}
        if event == "START_TRAINING":
            runtime.ensure_synced(pid, force=True)
            return {"status": "syncing", "event": event}
        if event == "PROJECT_DELETED":
            runtime.submit(f"{event} {pid}", runtime.store.delete_project, pid)
            runtime.forget_project(pid)
            return {"status": "queued", "event": event}
        if event == "PROJECT_UPDATED" and isinstance(data.get("project"), dict):
            config = data["project"].get("label_config")
            if config:  # keep the newest config for calls that arrive without one
                record = runtime.load_project(pid)
                runtime.save_project(pid, record.get("extra_params"), config)
        return {"status": "ok", "event": event}

    def _upsert_and_warm(self, pairs: list[tuple[dict, dict]]) -> None:
        image_key = None
        try:
            image_key = self.parsed_label_config.value_key if self.label_config else None
        except LabelConfigError:
            pass
        for task, annotation in pairs:
            self.runtime.store.upsert_annotation(self.project_id, task, annotation, image_key=image_key)
        if not self.label_config:
            return
        # Embed the new examples now, so that the next prediction does not wait for them.
        try:
            self.label_banks(self.parsed_label_config.output_labels)
        except (ValueError, OSError, ModelUnavailable) as e:
            logger.info("project %s: examples not embedded ahead of time: %s", self.project_id, e)

    # --- pre-annotation

    def predict_tasks(self, tasks: list[dict], config: ParsedConfig) -> list[dict | list]:
        started = time.perf_counter()
        budget = self.settings.predict_time_budget
        self._wait_for_first_sync(min(FIRST_SYNC_WAIT_S, budget / 4))
        version = self.model_version
        labels = config.output_labels
        results: list[dict | list] = []
        claimed = self._background_claims(version)
        computed = 0
        for index, task in enumerate(tasks):
            if claimed and _int_or_none(task.get("id")) in claimed:
                results.append([])  # a background run of an earlier call predicts (or just posted) it
                continue
            elapsed = time.perf_counter() - started
            per_task = elapsed / computed if computed else 0.0
            if computed and elapsed + per_task > budget:
                logger.warning("project %s: time budget of %.0f s reached after %d of %d tasks; deferring the rest",
                               self.project_id, budget, index, len(tasks))
                results.extend(self.defer_tasks(tasks[index:], version))
                break
            computed += 1
            try:
                results.append(self._preannotate(task, config, labels, version))
            except ModelUnavailable:
                raise
            except Exception as e:  # a bad image, a huge one, an out-of-memory: this task only
                expected = isinstance(e, (ValueError, OSError))
                logger.warning("project %s task %s: no prediction: %s", self.project_id, task.get("id"), e,
                               exc_info=not expected)
                self.runtime.on_task_failed(type(e).__name__)
                results.append({"result": [], "score": 0.0, "model_version": version})
        return results

    def defer_tasks(self, tasks: list[dict], model_version: str) -> list[dict | list]:
        """Answers for the tasks that did not fit into PREDICT_TIME_BUDGET: `[]` each (Label Studio stores
        nothing for it), while a background thread predicts them and posts the predictions through the API
        (labelstudio_backend.bulk; without LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY the next run asks again)."""
        from labelstudio_backend.bulk import defer_to_background

        return defer_to_background(self, tasks, model_version)

    def _background_claims(self, model_version: str) -> frozenset[int]:
        from labelstudio_backend.bulk import background_claims

        return background_claims(self.runtime, self.project_id, model_version)

    def _wait_for_first_sync(self, timeout: float) -> None:
        if self.project_id is None:
            return
        future = self.runtime.ensure_synced(self.project_id)
        if future is not None and not future.done():
            try:
                future.result(timeout=timeout)
            except Exception:  # a failed or slow sync leaves the store as the webhooks made it
                pass

    def _preannotate(self, task: dict, config: ParsedConfig, labels: Sequence[str], version: str) -> dict:
        task_id = _int_or_none(task.get("id"))
        banks = self.label_banks(labels, exclude_task_id=task_id)
        if not banks:
            return {"result": [], "score": 0.0, "model_version": version}
        url = config.image_url(task)
        encoded = self.runtime.encode(url, task_id)
        bank_labels = list(banks)
        predictor = self.runtime.predictor
        with self.runtime.device_lock:
            instances = predictor.segment_generic(
                encoded, [banks[label] for label in bank_labels], score_threshold=self.settings.score_threshold,
                max_instances=self.settings.max_instances_per_label * len(bank_labels),
                max_examples=self.settings.max_examples_per_label)
        kept = self._select(((bank_labels[i.class_index], i.mask, float(i.score)) for i in instances))
        return self._prediction(kept, config, version)

    def _select(self, instances: Iterable[tuple[str, np.ndarray, float]]) -> list[_Kept]:
        """Best first: at most N per label, no duplicates, no overlap between labels unless allowed, min area."""
        s = self.settings
        kept: list[_Kept] = []
        counts: dict[str, int] = defaultdict(int)
        claimed: np.ndarray | None = None
        own: dict[str, np.ndarray] = {}
        for label, mask, score in sorted(instances, key=lambda item: -item[2]):
            if counts[label] >= s.max_instances_per_label:
                continue
            mask = np.asarray(mask, dtype=bool)
            if claimed is None:
                claimed = np.zeros_like(mask)
            if not s.allow_overlap:
                mask = mask & ~(claimed & ~own.get(label, np.zeros_like(mask)))
            area = int(mask.sum())
            if area < max(1, s.min_area):
                continue
            if any(k.label == label and _iou(k.mask, mask) > DUPLICATE_IOU for k in kept):
                continue
            kept.append(_Kept(label, mask, score))
            counts[label] += 1
            claimed |= mask
            own[label] = own.get(label, np.zeros_like(mask)) | mask
        return kept

    def _prediction(self, kept: list[_Kept], config: ParsedConfig, version: str) -> dict:
        result = []
        for item in kept:
            result.extend(mask_to_regions(item.mask, item.label, config.output_for(item.label), config.image_name,
                                          score=item.score, polygon_tolerance=self.settings.polygon_tolerance,
                                          min_area=self.settings.min_area))
        score = float(np.mean([k.score for k in kept])) if kept else 0.0
        return {"result": result, "score": score, "model_version": version}

    # --- reference banks

    def label_banks(self, labels: Sequence[str], exclude_task_id: int | None = None) -> dict[str, np.ndarray]:
        """label -> prompt embeddings [k, D] of its examples (labels without any are left out)."""
        if self.project_id is None or not labels:
            return {}
        examples = self.runtime.store.examples(
            self.project_id, labels=list(labels), per_label=self.settings.max_examples_per_label,
            exclude_task_id=exclude_task_id, **self._reference_filter())
        vectors = self.embed_examples(examples)
        banks: dict[str, list[np.ndarray]] = defaultdict(list)
        for example in examples:
            vector = vectors.get(self._embedding_key(example))
            if vector is not None and example.label in labels:
                banks[example.label].append(vector)
        return {label: np.stack(banks[label]) for label in labels if banks.get(label)}

    def _reference_filter(self) -> dict:
        """REFERENCES as the store's filter arguments."""
        s = self.settings
        return {"ground_truth_only": s.references == "ground_truth",
                "annotators": [int(a) for a in s.reference_annotators] if s.references == "annotators" else None}

    def _embedding_key(self, example) -> str:
        """Per (annotation, region, annotation's updated_at, checkpoint), and the prompt-mask method's version."""
        return "|".join([EMBEDDING_KEY_VERSION, str(example.annotation_id), str(example.region_id),
                         str(example.updated_at), self.runtime.checkpoint_id])

    def embed_examples(self, examples: Sequence) -> dict[str, np.ndarray]:
        """Embedding of each example: process cache, then the store, then computed (grouped by image)."""
        runtime = self.runtime
        runtime.predictor  # the checkpoint id is part of the key
        found: dict[str, np.ndarray] = {}
        missing: dict[tuple[str, int | None], list] = defaultdict(list)
        for example in examples:
            key = self._embedding_key(example)
            vector = runtime.embeddings.get(key)
            if vector is None:
                vector = runtime.store.get_embedding(key)
                if vector is not None:
                    runtime.embeddings.put(key, vector)
            if vector is not None:
                found[key] = vector
            elif not runtime.reference_failed(key):
                missing[(example.image_url, _int_or_none(example.task_id))].append(example)
        for (url, task_id), group in missing.items():
            try:
                encoded = runtime.encode(url, task_id)
            except ModelUnavailable:
                raise
            except Exception as e:
                logger.warning("project %s: reference image %s of task %s cannot be used: %s",
                               self.project_id, url, task_id, e, exc_info=not isinstance(e, (ValueError, OSError)))
                for example in group:
                    runtime.mark_reference_failed(self._embedding_key(example))
                continue
            masks, keys, owners = [], [], []
            for example in group:
                key = self._embedding_key(example)
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
                continue
            predictor = runtime.predictor
            with runtime.device_lock:
                vectors = np.asarray(predictor.encode_prompts(encoded, np.stack(masks)), dtype=np.float32)
            for key, owner, vector in zip(keys, owners, vectors):
                runtime.store.put_embedding(key, vector, project_id=self.project_id, annotation_id=owner)
                runtime.embeddings.put(key, vector)
                found[key] = vector
        return found

    def reference_mask(self, encoded: Any, region: dict) -> np.ndarray | None:
        """The prompt mask of a reference region on its own (encoded) image.

        Brushes, polygons and ellipses are used as drawn. A box or a keypoint would be a poor prompt
        as it stands, so the object is segmented from it first (the filled box if nothing is found).
        Negative keypoints are not examples.
        """
        size = tuple(encoded.image_size)
        prompt = region_to_prompt(region, size)
        if prompt.mask is not None:
            return prompt.mask
        if not prompt.positive:
            return None
        predictor = self.runtime.predictor
        with self.runtime.device_lock:
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

    # --- interactive

    def predict_interactive(self, task: dict, drawn: list, config: ParsedConfig) -> dict:
        if not isinstance(drawn, list) or not all(isinstance(r, dict) for r in drawn):
            raise BackendError("context.result must be a list of regions")
        task_id = _int_or_none(task.get("id"))
        encoded = self.runtime.encode(config.image_url(task), task_id)
        size = tuple(encoded.image_size)
        prompts: list[RegionPrompt] = []
        for region in drawn:
            if region.get("to_name") not in (None, config.image_name):
                continue
            prompts.append(region_to_prompt(region, size))
        label = next((p.label for p in prompts if p.positive and p.label), None) \
            or next((p.label for p in prompts if p.label), None)
        if label is None:
            raise BackendError("the drawn regions carry no label; pick a label before clicking or drawing")
        control = config.output_for(label)  # LabelConfigError for a label unknown to the config
        points = [p.point for p in prompts if p.point is not None]
        point_labels = [1 if p.positive else 0 for p in prompts if p.point is not None]
        boxes = [p.box for p in prompts if p.box is not None]
        strokes = [p.mask for p in prompts if p.mask is not None]
        stroke = np.logical_or.reduce(strokes) if strokes else None
        if not any(point_labels) and not boxes and stroke is None:
            raise BackendError("only negative clicks were drawn; add a positive click, a box or a stroke")

        predictor = self.runtime.predictor
        with self.runtime.device_lock:
            result = predictor.segment_interactive(
                encoded, points=np.array(points) if points else None,
                point_labels=np.array(point_labels) if points else None,
                boxes=np.array(boxes) if boxes else None, stroke=stroke)
        best = getattr(result, "best", None)
        version = self.model_version
        if best is None or not np.asarray(best.mask).any():
            return {"result": [], "score": 0.0, "model_version": version}
        obj = _Kept(label, np.asarray(best.mask, dtype=bool), min(max(float(best.predicted_iou), 0.0), 1.0))
        if self.settings.interactive_mode == "object":
            regions = mask_to_regions(obj.mask, label, control, config.image_name, score=obj.score,
                                      polygon_tolerance=self.settings.polygon_tolerance)
            return {"result": regions, "score": obj.score, "model_version": version}
        negatives = [p for p, positive in zip(points, point_labels) if not positive]
        return self._all_similar(encoded, obj, negatives, config, version)

    def _all_similar(self, encoded: Any, obj: _Kept, negatives: list, config: ParsedConfig, version: str) -> dict:
        """Every object in the image like the one drawn: generic segmentation with its mask as the example."""
        predictor = self.runtime.predictor
        with self.runtime.device_lock:
            example = np.asarray(predictor.encode_prompts(encoded, obj.mask[None]), dtype=np.float32)
            instances = predictor.segment_generic(
                encoded, [example], score_threshold=self.settings.score_threshold,
                max_instances=self.settings.max_instances_per_label, max_examples=1)
        found = []
        for inst in instances:
            mask = np.asarray(inst.mask, dtype=bool)
            if any(_covers(mask, point) for point in negatives):
                continue
            found.append((obj.label, mask, float(inst.score)))
        if not any(_iou(mask, obj.mask) > 0.5 for _, mask, _ in found):
            found.append((obj.label, obj.mask, obj.score))  # the drawn object itself is always in
        return self._prediction(self._select(found), config, version)

    # --- quality estimate

    def leave_one_out(self, max_tasks: int | None = 50) -> dict:
        """Predict each annotated task from the other tasks' examples and compare with its own regions.

        Per label: mean mask IoU (union of predicted vs union of annotated masks, over the tasks that
        have the label) and recall (annotated regions matched by a prediction with IoU >= 0.5).
        Keypoint regions are not ground truth and are skipped.
        """
        if self.project_id is None:
            raise BackendError("leave_one_out needs a project")
        config = self.parsed_label_config
        labels = config.output_labels
        examples = self.runtime.store.examples(self.project_id, labels=list(labels), per_label=1_000_000,
                                               **self._reference_filter())
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
                prediction = self._preannotate(task, config, labels, "leave-one-out")
                encoded = self.runtime.encode(url, _int_or_none(task_id))
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
                ious[label].append(_iou(union_truth, union_pred))
                matched[label].extend(any(_iou(m, p) >= 0.5 for p in preds) for m in masks)
            evaluated += 1
        per_label = {label: {"mean_iou": float(np.mean(ious[label])), "recall": float(np.mean(matched[label])),
                             "tasks": len(ious[label]), "regions": len(matched[label])} for label in ious}
        return {"tasks_evaluated": evaluated, "labels": per_label, "computed_at": _now(),
                "revision": self.runtime.store.revision(self.project_id), "model_version": self.model_version}


# --- helpers -------------------------------------------------------------------------------------------------

def _annotation_task_pairs(data: dict) -> list[tuple[dict, dict]]:
    """(task, annotation) pairs of ANNOTATION(S)_CREATED / ANNOTATION_UPDATED payloads."""
    annotations, tasks = data.get("annotation"), data.get("task")
    if isinstance(annotations, dict):
        annotations, tasks = [annotations], [tasks]
    if not isinstance(annotations, list) or not annotations:
        raise BackendError("the webhook payload has no 'annotation'")
    tasks_by_id = {t.get("id"): t for t in (tasks or []) if isinstance(t, dict)}
    pairs = []
    for annotation in annotations:
        if not isinstance(annotation, dict):
            raise BackendError("an annotation in the webhook payload is not an object")
        task = tasks_by_id.get(annotation.get("task"))
        if task is None and len(tasks_by_id) == 1:
            task = next(iter(tasks_by_id.values()))
        if task is None:
            raise BackendError(f"the webhook payload has no task for annotation {annotation.get('id')}")
        pairs.append((task, annotation))
    return pairs


def _write_json(path: Path, record: dict) -> None:
    """Atomically, so that another worker never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _covers(mask: np.ndarray, point) -> bool:
    x = min(max(int(point[0]), 0), mask.shape[1] - 1)
    y = min(max(int(point[1]), 0), mask.shape[0] - 1)
    return bool(mask[y, x])


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
