"""DINOvBackend: the model class of the Label Studio ML backend (label-studio-ml 2.x interface). It orchestrates;
the work is done by the runtime (model, caches), a reference source, instances (selection, regions) and regions.

    backend = DINOvBackend(project_id=3, label_config=xml, runtime=runtime)
    backend.setup()                                   # -> model_version
    backend.predict(tasks, context=None)              # one prediction per task, in task order

Objects of this class are cheap and made per request; what lives as long as the process is the Runtime.

Pre-annotation (no context): every task image is segmented generically against the project's per-label banks
of in-context examples (references.StoreReferences by default: the regions of its annotations, up to N per
label, most recent first, never the task's own annotation; a bulk job passes its pinned references instead).

Interactive refinement (context): the regions drawn now (clicks, negative clicks, boxes, strokes) give one
mask with the drawn label; INTERACTIVE_MODE=similar returns every similar object instead.

Opening a task (a /predict of one task without context) also tells the runtime's encode-ahead
(serving/encode_ahead.py), which prepares the tasks the annotator gets next with `prepare_ahead`; their predictions
wait in `runtime.predicted_ahead` for the call that opens them, and are used only if nothing they depend on
changed (model version, labeling config, the references' revision, the image).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Sequence

import numpy as np

from dinov.postprocess import prediction_score
from labelstudio_backend.errors import BackendError, ModelUnavailable
from labelstudio_backend.labelstudio.label_config import LabelConfigError, ParsedConfig, parse_label_config
from labelstudio_backend.labelstudio.payload import parse_project_id, task_id_of
from labelstudio_backend.labelstudio.regions import RegionPrompt, region_to_prompt
from labelstudio_backend.references.sources import ReferenceSource, StoreReferences, embed_ahead
from labelstudio_backend.runtime.runtime import Runtime
from labelstudio_backend.runtime.work_queues import QueueClosed, QueueFull
from labelstudio_backend.serving import versions
from labelstudio_backend.serving.instances import (
    LabeledMask,
    SelectionRules,
    build_prediction,
    empty_prediction,
    select_instances,
    similar_to_drawn,
)
from labelstudio_backend.settings import Settings

logger = logging.getLogger(__name__)

FIRST_SYNC_WAIT_S = 20.0       # how long the first prediction of a project waits for its reference sync
SETUP_MODEL_WAIT_S = 2.0       # how long /setup waits for a model that is loading, to name it in model_version


class DINOvBackend:
    """Label Studio ML backend model class: setup / predict, per project (webhook events go to the inbox).

    Args:
        project_id: Label Studio's project ('<id>.<created>', an id, or None for a call without one).
        label_config: the labeling config XML (default: the one /setup stored for the project).
        runtime: the process's Runtime.
        references: where the examples come from (default: the store's current examples of the project).
        settings: the settings to predict with (default: the process's, with the project's extra_params).
    """

    def __init__(self, project_id: int | str | None = None, label_config: str | None = None,
                 runtime: Runtime | None = None, references: ReferenceSource | None = None,
                 settings: Settings | None = None, **kwargs: Any):
        if runtime is None:
            raise BackendError("DINOvBackend needs a Runtime (create_app builds one)")
        self.project_id = parse_project_id(project_id) if project_id not in (None, "") else None
        self.runtime = runtime
        self.model = runtime.model_for(self.project_id)  # the project's fine-tuned model, when it has one
        if label_config is None and self.project_id is not None:
            label_config = runtime.projects.load(self.project_id).get("label_config")
        self.label_config = label_config
        self._default_references = references is None
        self._configure(settings or runtime.projects.settings_for(self.project_id), references)
        if self.project_id is not None:
            runtime.known_projects.add(self.project_id)

    def _configure(self, settings: Settings, references: ReferenceSource | None = None) -> None:
        self.settings = settings
        self.references = references or StoreReferences(self.runtime, self.model, self.project_id, settings)

    # --- label-studio-ml interface

    @property
    def parsed_label_config(self) -> ParsedConfig:
        if not self.label_config:
            raise LabelConfigError("no labeling config: Label Studio sends it with /setup and /predict")
        return parse_label_config(self.label_config)

    def check_label_config(self) -> None:
        """Raise LabelConfigError when the project's labeling config is missing or unusable."""
        _ = self.parsed_label_config

    @property
    def model_version(self) -> str:
        """Names the served model and the settings that change predictions (serving/versions.py), so that a new
        model or settings make Label Studio ask for new predictions; new annotations do not."""
        return versions.model_version(self.model, self.settings)

    def setup(self, extra_params: Any = None) -> str:
        """Remember the project's config and extra_params, start its reference sync, return model_version."""
        if self.label_config:
            self.check_label_config()  # a config this backend cannot use is refused here, where LS shows it
        if self.project_id is not None:
            self.runtime.projects.save(self.project_id, extra_params, self.label_config)
            self.model = self.runtime.model_for(self.project_id)  # PROJECT_MODEL may have changed
            settings = self.runtime.projects.settings_for(self.project_id)
            self._configure(settings, None if self._default_references else self.references)
            try:
                self.runtime.ensure_synced(self.project_id)
            except (QueueFull, QueueClosed) as error:  # the first /predict asks again
                logger.warning("project %s: no reference sync queued now: %s", self.project_id, error)
        try:  # the version names the loaded model (its file's digest): give a load under way a moment
            self.model.load_model(timeout=SETUP_MODEL_WAIT_S)
        except ModelUnavailable:
            pass  # still loading (a first download) or failed: the configured name stands in until it loads
        return self.model_version

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> list[dict | list]:
        """One prediction per task, in task order.

        Without context: pre-annotation. A task whose image fails gets `[]` (stored as nothing, reason logged); tasks
        left when PREDICT_TIME_BUDGET runs out get `[]` (stored as nothing) while the runtime's deferred predictions
        predicts and posts them. With a context holding drawn regions: interactive refinement of one task.
        """
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise BackendError("'tasks' must be a list of task objects")
        config = self.parsed_label_config
        with self.runtime.foreground.request():  # background model work waits while this runs
            if isinstance(context, dict) and context.get("result"):
                if len(tasks) != 1:
                    raise BackendError(f"an interactive call must carry exactly one task, got {len(tasks)}")
                self.runtime.on_tasks_predicted("interactive", 1)
                return [self.predict_interactive(tasks[0], context["result"], config)]
            self.runtime.on_tasks_predicted("batch", len(tasks))
            if len(tasks) == 1 and self.runtime.ahead is not None and self.project_id is not None:
                # an annotator opened this task: the next ones are prepared in the background
                self.runtime.ahead.task_opened(self.project_id, self.label_config, tasks[0])
            return self.predict_tasks(tasks, config)

    # --- pre-annotation

    def predict_tasks(self, tasks: list[dict], config: ParsedConfig) -> list[dict | list]:
        """Pre-annotate tasks within PREDICT_TIME_BUDGET: a prediction per task, `[]` for a task deferred.

        The budget covers everything the call does: the wait for the project's first sync and for the model, the
        embedding of the references (done ahead of time in the embeddings queue; a call that finds them not ready
        waits for that job at most the budget left, then defers its tasks), and each task, the first included:
        a task starts only if the budget left holds one more task at the recent pace of this process.
        """
        started = time.perf_counter()
        budget = self.settings.predict_time_budget
        left = lambda: budget - (time.perf_counter() - started)  # noqa: E731
        self._wait_for_first_sync(min(FIRST_SYNC_WAIT_S, budget / 4))
        self.model.load_model(timeout=max(0.0, left()))  # ModelUnavailable (503, with the reason) otherwise
        version = self.model_version
        labels = config.output_labels
        results: list[dict | list] = [[] for _ in tasks]  # [] for a task: Label Studio stores nothing for it
        # Tasks that a background run of an earlier call predicts (or has just posted) are left to it.
        claimed = self._claimed(version)
        open_indices = [i for i, task in enumerate(tasks) if task_id_of(task.get("id")) not in claimed]
        if open_indices and not self._references_ready(labels, left() - self.runtime.task_seconds):
            logger.warning("project %s: the references are not embedded yet; deferring %d tasks", self.project_id,
                           len(open_indices))
            self.defer_tasks([tasks[i] for i in open_indices], version)
            return results
        computed = 0
        for position, index in enumerate(open_indices):
            task = tasks[index]
            elapsed = time.perf_counter() - started
            pace = max(self.runtime.task_seconds, elapsed / computed if computed else 0.0)
            if elapsed + pace > budget:
                logger.warning("project %s: time budget of %.0f s reached after %d of %d tasks; deferring the rest",
                               self.project_id, budget, position, len(open_indices))
                self.defer_tasks([tasks[i] for i in open_indices[position:]], version)
                break
            ahead = self._predicted_ahead(task, config, version)
            if ahead is not None:  # prepared while the annotator was on an earlier task
                results[index] = ahead
                continue
            computed += 1
            task_started = time.perf_counter()
            try:
                results[index] = self.preannotate(task, config, labels, version)
            except ModelUnavailable:
                raise
            except Exception as e:  # a bad image, a huge one, an out-of-memory: this task only
                expected = isinstance(e, (ValueError, OSError))
                logger.warning("project %s task %s: no prediction: %s", self.project_id, task.get("id"), e,
                               exc_info=not expected)
                self.runtime.on_task_failed(type(e).__name__)
                results[index] = []  # not predicted: Label Studio stores nothing and asks again
            else:
                self.runtime.record_task_seconds(time.perf_counter() - task_started)
        return results

    def ahead_key(self, task: dict, config: ParsedConfig, version: str) -> tuple:
        """What a prediction made ahead depends on: project, task, image, model version (model and settings),
        labeling config and the references' revision (a new or changed annotation makes it stale)."""
        digest = hashlib.sha1((self.label_config or "").encode()).hexdigest()
        return (self.project_id, task_id_of(task.get("id")), config.image_url(task), version, digest,
                self.references.revision())

    def _predicted_ahead(self, task: dict, config: ParsedConfig, version: str) -> dict | None:
        if self.project_id is None or not len(self.runtime.predicted_ahead):
            return None
        try:
            return self.runtime.predicted_ahead.pop(self.ahead_key(task, config, version))
        except LabelConfigError:  # no image URL: preannotate says so
            return None

    def prepare_ahead(self, task: dict, config: ParsedConfig) -> str:
        """Encode the task's image and predict it for when it opens (the encode-ahead's work, one task): "kept"
        (its prediction waits in runtime.predicted_ahead), "encoded" (its references are not embedded yet: the
        features only), or "had" (prepared already). Raises as preannotate does; ModelUnavailable while the
        model is not loaded (nothing is waited for)."""
        self.model.load_model(timeout=0)
        version = self.model_version
        key = self.ahead_key(task, config, version)
        if key in self.runtime.predicted_ahead:
            return "had"
        labels = config.output_labels
        if not self._references_ready(labels, 0):  # queued for embedding; the features are what costs most
            self.model.encode(config.image_url(task), task_id_of(task.get("id")))
            return "encoded"
        self.runtime.predicted_ahead.put(key, self.preannotate(task, config, labels, version))
        return "kept"

    def _claimed(self, version: str) -> frozenset[int]:
        """Task ids of the project kept for (or just posted by) the background predictions of this version."""
        deferred = self.runtime.deferred
        if deferred is None or self.project_id is None:
            return frozenset()
        return deferred.claimed(self.project_id, version)

    def _references_ready(self, labels: Sequence[str], wait_s: float) -> bool:
        """Whether the references are embedded; if not, their embedding is queued and waited for `wait_s` s."""
        ready = getattr(self.references, "ready", None)
        if ready is None or self.project_id is None or ready(labels):
            return True  # (pinned references of a bulk job are embedded when pinned)
        job = embed_ahead(self.runtime, self.project_id, labels)
        if job is None or wait_s <= 0:
            return False
        try:
            job.result(timeout=wait_s)
        except Exception:  # still running (or failed: its log says why); the tasks go to the background
            return False
        return ready(labels)

    def defer_tasks(self, tasks: list[dict], model_version: str) -> list[list]:
        """`[]` for each task that did not fit into PREDICT_TIME_BUDGET (Label Studio stores nothing for it);
        the runtime's deferred predictions predict them in the background and post them (without them, or
        without a project, the next "Retrieve predictions" asks again)."""
        deferred = self.runtime.deferred
        if deferred is None or self.project_id is None:
            logger.warning("%d tasks left without prediction; the next \"Retrieve predictions\" asks again",
                           len(tasks))
            return [[] for _ in tasks]
        return deferred.defer(self.project_id, self.label_config, tasks, model_version)

    def _wait_for_first_sync(self, timeout: float) -> None:
        if self.project_id is None:
            return
        try:
            future = self.runtime.ensure_synced(self.project_id)
        except (QueueFull, QueueClosed):  # other projects' syncs wait: predict from the store as it is
            return
        if future is not None and not future.done():
            try:
                future.result(timeout=timeout)
            except Exception:  # a failed or slow sync leaves the store as the webhooks made it
                pass

    def preannotate(self, task: dict, config: ParsedConfig, labels: Sequence[str], version: str) -> dict:
        """The prediction of one task: generic segmentation against the banks of `labels` (never the task's own
        examples), the instances selected and turned into regions. Raises on a bad image (caller decides)."""
        task_id = task_id_of(task.get("id"))
        banks = self.references.banks(labels, exclude_task_id=task_id)
        if not banks:
            return empty_prediction(version)
        encoded = self.model.encode(config.image_url(task), task_id)
        bank_labels = list(banks)
        s = self.settings
        found = self.model.load_model().segment_generic(
            encoded, [banks[label] for label in bank_labels], score_threshold=s.score_threshold,
            max_instances=s.max_instances_per_label * len(bank_labels), max_examples=s.max_examples_per_label)
        instances = (LabeledMask(bank_labels[i.class_index], i.mask, float(i.score)) for i in found)
        kept = select_instances(instances, SelectionRules.from_settings(s))
        # the share of the model's candidate score mass that was kept when the model says it (README: What a score
        # means), else the mean region score
        score = prediction_score([k.score for k in kept], getattr(found, "candidate_score_sum", None))
        return build_prediction(kept, config, version, s.polygon_tolerance, s.min_area, score=score)

    # --- interactive

    def predict_interactive(self, task: dict, drawn: list, config: ParsedConfig) -> dict:
        """The object the drawn regions (clicks, boxes, strokes; one label) point at, or with
        INTERACTIVE_MODE=similar every object like it."""
        if not isinstance(drawn, list) or not all(isinstance(r, dict) for r in drawn):
            raise BackendError("context.result must be a list of regions")
        encoded = self.model.encode(config.image_url(task), task_id_of(task.get("id")))
        size = tuple(encoded.image_size)
        limit = self.settings.max_image_pixels  # region bombs: refused before decoding (issue 20)
        prompts: list[RegionPrompt] = [region_to_prompt(region, size, limit) for region in drawn
                                       if region.get("to_name") in (None, config.image_name)]
        label = next((p.label for p in prompts if p.positive and p.label), None) \
            or next((p.label for p in prompts if p.label), None)
        if label is None:
            raise BackendError("the drawn regions carry no label; pick a label before clicking or drawing")
        config.output_for(label)  # LabelConfigError for a label unknown to the config
        points = [p.point for p in prompts if p.point is not None]
        point_labels = [1 if p.positive else 0 for p in prompts if p.point is not None]
        boxes = [p.box for p in prompts if p.box is not None]
        strokes = [p.mask for p in prompts if p.mask is not None]
        stroke = np.logical_or.reduce(strokes) if strokes else None
        if not any(point_labels) and not boxes and stroke is None:
            raise BackendError("only negative clicks were drawn; add a positive click, a box or a stroke")

        result = self.model.load_model().segment_interactive(
            encoded, points=np.array(points) if points else None,
            point_labels=np.array(point_labels) if points else None,
            boxes=np.array(boxes) if boxes else None, stroke=stroke)
        best = getattr(result, "best", None)
        version = self.model_version
        if best is None or not np.asarray(best.mask).any():
            return empty_prediction(version)
        obj = LabeledMask(label, np.asarray(best.mask, dtype=bool), min(max(float(best.predicted_iou), 0.0), 1.0))
        if self.settings.interactive_mode == "object":
            return build_prediction([obj], config, version, self.settings.polygon_tolerance)
        negatives = [p for p, positive in zip(points, point_labels) if not positive]
        return self._all_similar(encoded, obj, negatives, config, version)

    def _all_similar(self, encoded: Any, obj: LabeledMask, negatives: list, config: ParsedConfig, version: str) -> dict:
        """Every object in the image like the one drawn: generic segmentation with its mask as the example."""
        s = self.settings
        predictor = self.model.load_model()
        example = np.asarray(predictor.encode_prompts(encoded, obj.mask[None]), dtype=np.float32)
        found = predictor.segment_generic(encoded, [example], score_threshold=s.score_threshold,
                                          max_instances=s.max_instances_per_label, max_examples=1)
        instances = [LabeledMask(obj.label, np.asarray(i.mask, dtype=bool), float(i.score)) for i in found]
        kept = select_instances(similar_to_drawn(instances, obj, negatives), SelectionRules.from_settings(s))
        return build_prediction(kept, config, version, s.polygon_tolerance, s.min_area)
