"""Deferred predictions of /predict: when a "Retrieve predictions" call brings more tasks than fit into
PREDICT_TIME_BUDGET, the backend answers [] for the rest (stored as nothing) and hands them here. They are kept in
the store (store/work.py) before the answer, predicted by the "deferred" queue with the task batches of
task_batches.py and posted through the Label Studio API; a restart resumes what a crash interrupted.

    runtime.deferred = StoreDeferredPredictions(runtime)   # what create_app wires
    deferred.defer(project_id, label_config, tasks, model_version) -> [[] per task]
    deferred.claimed(project_id, model_version)           -> task ids kept, or posted in the last CLAIM_TTL_S
    deferred.schedule()                                   # at start: resume what is kept

- One process at a time drains the kept tasks (a file lock in MODEL_DIR): gunicorn workers never predict the same
  task twice, and on a CPU only one of them holds the model for background work.
- Before posting, the sink asks Label Studio whether the task has a prediction of the version already (posted
  just before a crash, by another worker, by a bulk job), so that no task gets two.
- A task is forgotten once posted (after CLAIM_TTL_S), once it cannot be predicted (a broken image), or after
  MAX_TASK_ATTEMPTS failed posts (Label Studio down); the next "Retrieve predictions" asks for it again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from labelstudio_backend.fetching.labelstudio_client import LabelStudioClient
from labelstudio_backend.labelstudio.payload import task_id_of, utc_now
from labelstudio_backend.runtime.kept_work import drain_kept
from labelstudio_backend.runtime.runtime import Runtime
from labelstudio_backend.serving.backend import DINOvBackend
from labelstudio_backend.serving.sinks import DONE, EXISTS, LabelStudioSink, Outcome
from labelstudio_backend.serving.task_batches import BulkReport, Pipeline, Recorder, image_loader
from labelstudio_backend.store.work import DeferredTask

logger = logging.getLogger(__name__)

BATCH_TASKS = 32  # tasks taken from the store at a time
RETRY_PAUSE_S = 30.0  # after a batch that posted nothing (Label Studio down), the next attempt waits this long


class StoreDeferredPredictions:
    """The runtime's deferred predictions: kept in the store, predicted and posted by the "deferred" queue."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.client = getattr(runtime.images, "client", None) or LabelStudioClient.from_settings(runtime.settings)
        self.lock_path = runtime.settings.model_dir / "deferred.lock"
        self.stop = threading.Event()

    @property
    def configured(self) -> bool:
        """Posting needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY."""
        return bool(self.client.base_url and self.client.api_key)

    def defer(self, project_id: int, label_config: str | None, tasks: list[dict], model_version: str) -> list[list]:
        """[] for each task (Label Studio stores nothing for it); the tasks are kept and predicted in the
        background. Without LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY they are only left for the next run."""
        if not self.configured:
            logger.warning("%d tasks left without prediction: predicting them in the background needs "
                           "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY; the next \"Retrieve predictions\" asks again",
                           len(tasks))
            return [[] for _ in tasks]
        usable = [t for t in tasks if task_id_of(t.get("id")) is not None]
        kept = self.runtime.store.defer_tasks(project_id, model_version, label_config, usable)
        logger.info("project %s: %d tasks kept for background prediction (%d already were)", project_id, kept,
                    len(usable) - kept)
        self.schedule()
        return [[] for _ in tasks]

    def claimed(self, project_id: int, model_version: str) -> frozenset[int]:
        """Task ids kept for background prediction, or posted in the last CLAIM_TTL_S (any worker's)."""
        return self.runtime.store.claimed_task_ids(project_id, model_version)

    def schedule(self) -> None:
        """Make sure a drain is pending (one is enough: it takes every kept task)."""
        if self.configured:
            self.runtime.try_submit("deferred", "drain", self.drain)

    def close(self) -> None:
        """Stop after the current batch (the process is stopping; what is left stays kept)."""
        self.stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no task is kept or being predicted (tests)."""
        queue = self.runtime.queues["deferred"]
        return queue.wait_idle(timeout) and self.runtime.store.background_counts()["pending"] == 0

    def drain(self) -> int:
        """Predict and post every kept task, batch by batch; returns how many were posted."""
        store = self.runtime.store
        return drain_kept(self.lock_path, lambda: store.pending_tasks(limit=BATCH_TASKS), self._run_batch,
                          retry=self.schedule, retry_after_s=RETRY_PAUSE_S, stop=self.stop, on_start=store.prune_posted)

    def _run_batch(self, batch: Sequence[DeferredTask]) -> tuple[int, bool]:
        """(posted, whether to try again later: nothing was posted nor given up, so Label Studio is down)."""
        try:
            done, settled = self._run(list(batch))
        except Exception:  # the model, the config: counted as a failed attempt of each task
            logger.exception("deferred predictions of project %s failed", batch[0].project_id)
            done, settled = 0, 0
        if not settled:
            logger.warning("deferred predictions: nothing posted; next attempt in %.0f s", RETRY_PAUSE_S)
        return done, not settled

    def _run(self, batch: list[DeferredTask]) -> tuple[int, int]:
        """Predict and post one batch (one project and model version); (posted, settled) counts."""
        first = batch[0]
        project_id, version = first.project_id, first.model_version
        store = self.runtime.store
        posted: list[int] = []
        dropped: list[int] = []

        def on_task(task: dict, outcome: Outcome) -> None:
            if outcome.status in (DONE, EXISTS):
                posted.append(int(task["id"]))
            elif not outcome.reason.startswith(("writing the prediction failed", "not written")):
                dropped.append(int(task["id"]))  # the task itself cannot be predicted (a write that failed: kept)

        report = BulkReport(job=f"deferred-{project_id}", project=project_id, model_version=version,
                            selected=len(batch), started_at=utc_now())
        try:
            backend = DINOvBackend(project_id, first.label_config, runtime=self.runtime)
            config = backend.parsed_label_config
            # On a CPU a batch holds the model for a long time; interactive calls should not wait for it.
            batch_size = 4 if self.runtime.on_gpu else 1
            # A stop of its own: the recorder sets it when Label Studio keeps refusing writes (this batch only).
            recorder = Recorder(LabelStudioSink(self.client, project_id), report, threading.Event(), on_task=on_task)
            Pipeline(backend, config, version, recorder, image_loader(self.runtime, config),
                     batch_size=batch_size, workers=2).run([t.task for t in batch])
        finally:
            store.tasks_posted(project_id, version, posted)
            store.drop_tasks(project_id, version, dropped)
            unsettled = {t.task_id for t in batch} - set(posted) - set(dropped)
            store.tasks_failed(project_id, version, sorted(unsettled))
        if posted and report.seconds > 0:  # the pace /predict's budget counts on stays current when all is deferred
            self.runtime.record_task_seconds(report.seconds / len(posted))
        logger.info("project %s: deferred predictions of %d kept tasks: %d posted, %d failed, %d given up in "
                    "%.1f s", project_id, len(batch), len(posted), len(unsettled), len(dropped), report.seconds)
        return len(posted), len(posted) + len(dropped)

