"""Background predictions of /predict: when a "Retrieve predictions" call brings more tasks than fit into
PREDICT_TIME_BUDGET, the backend answers [] for the rest (stored as nothing) and hands them here; one daemon
thread per process predicts them with the bulk pipeline and posts the predictions through the Label Studio API.

    runtime.deferral = BackgroundPredictions(runtime)     # what the server installs
    deferral.defer(project_id, label_config, tasks, model_version) -> [[] per task]
    deferral.claimed(project_id, model_version)           -> task ids queued, running or just posted
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque

from labelstudio_backend.backend import DINOvBackend
from labelstudio_backend.bulk.pipeline import BulkReport, Pipeline, Recorder, image_loader
from labelstudio_backend.bulk.sinks import DONE, EXISTS, LabelStudioSink, Outcome
from labelstudio_backend.labelstudio_client import LabelStudioClient
from labelstudio_backend.payload import task_id_of, utc_now
from labelstudio_backend.runtime import Runtime

logger = logging.getLogger(__name__)

CLAIM_TTL_S = 600.0  # how long a posted task stays claimed (longer than Label Studio's 100 s timeout)


class BackgroundPredictions:
    """Finishes, in one daemon thread per process, the tasks that /predict deferred, and posts their predictions
    through the Label Studio API.

    Tasks queued, running or posted in the last CLAIM_TTL_S are "claimed": a /predict call answers []
    for them (stored as nothing), so a second "Retrieve predictions" while this runs never predicts a task
    twice. Before posting, the sink asks Label Studio whether the task got a prediction of the version
    meanwhile (another worker, a bulk job).
    """

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.client = getattr(runtime.images, "client", None) or LabelStudioClient.from_settings(runtime.settings)
        self.lock = threading.Lock()
        self.queued: dict[tuple[int, str], set[int]] = defaultdict(set)
        self.posted: dict[tuple[int, str], dict[int, float]] = defaultdict(dict)
        self.jobs: deque[tuple[int, str | None, list[dict], str]] = deque()
        self.wakeup = threading.Condition(self.lock)
        self.idle = threading.Event()
        self.idle.set()
        self.thread: threading.Thread | None = None  # started with the first deferred tasks

    @property
    def configured(self) -> bool:
        """Posting needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY."""
        return bool(self.client.base_url and self.client.api_key)

    def defer(self, project_id: int, label_config: str | None, tasks: list[dict], model_version: str) -> list[list]:
        """[] for each task (Label Studio stores nothing for it); the tasks themselves are predicted in the
        background and posted through the API. Without LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY they are only
        left for the next run."""
        if not self.configured:
            logger.warning("%d tasks left without prediction: predicting them in the background needs "
                           "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY; the next \"Retrieve predictions\" asks again",
                           len(tasks))
            return [[] for _ in tasks]
        queued = self.submit(project_id, label_config, tasks, model_version)
        logger.info("project %s: %d tasks queued for background prediction (%d already were)", project_id,
                    queued, len(tasks) - queued)
        return [[] for _ in tasks]

    def claimed(self, project_id: int, model_version: str) -> frozenset[int]:
        """Task ids a background run of this process predicts (or posted in the last CLAIM_TTL_S)."""
        key = (project_id, model_version)
        with self.lock:
            now = time.monotonic()
            posted = self.posted.get(key, {})
            for task_id in [t for t, at in posted.items() if now - at > CLAIM_TTL_S]:
                del posted[task_id]
            return frozenset(self.queued.get(key, ())) | frozenset(posted)

    def submit(self, project_id: int, label_config: str | None, tasks: list[dict], model_version: str) -> int:
        """Queue the tasks not claimed yet; returns how many were queued."""
        key = (project_id, model_version)
        with self.lock:
            taken = self.queued[key] | set(self.posted[key])
            new = [t for t in tasks if task_id_of(t.get("id")) is not None and int(t["id"]) not in taken]
            if new:
                if self.thread is None:
                    self.thread = threading.Thread(target=self._loop, name="dinov-deferred", daemon=True)
                    self.thread.start()
                self.queued[key].update(int(t["id"]) for t in new)
                self.jobs.append((project_id, label_config, new, model_version))
                self.idle.clear()
                self.wakeup.notify()
        return len(new)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued task is done (for tests and shutdown)."""
        return self.idle.wait(timeout)

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.jobs:
                    self.idle.set()
                    self.wakeup.wait()
                job = self.jobs.popleft()
            try:
                self._run(*job)
            except Exception:
                logger.exception("background predictions of project %s failed", job[0])
            finally:
                with self.lock:  # whatever was not posted can be asked for again
                    self.queued[(job[0], job[3])].difference_update(int(t["id"]) for t in job[2])

    def _run(self, project_id: int, label_config: str | None, tasks: list[dict], model_version: str) -> None:
        backend = DINOvBackend(project_id, label_config, runtime=self.runtime)
        config = backend.parsed_label_config
        key = (project_id, model_version)

        def on_task(task: dict, outcome: Outcome) -> None:
            if outcome.status in (DONE, EXISTS):
                with self.lock:
                    self.posted[key][int(task["id"])] = time.monotonic()

        # On a CPU a batch holds the model for a long time; interactive calls should not wait for it.
        on_gpu = self.runtime.on_gpu
        report = BulkReport(job=f"background-{project_id}", project=project_id, model_version=model_version,
                            selected=len(tasks), started_at=utc_now())
        recorder = Recorder(LabelStudioSink(self.client, project_id), report, threading.Event(), on_task=on_task)
        Pipeline(backend, config, model_version, recorder, image_loader(self.runtime, config),
                 batch_size=4 if on_gpu else 1, workers=2).run(tasks)
        logger.info("project %s: background predictions of %d deferred tasks: %d posted, %d failed in %.1f s",
                    project_id, len(tasks), report.done, len(report.failed), report.seconds)


def install(runtime: Runtime) -> BackgroundPredictions:
    """Make this process's /predict finish deferred tasks in the background (runtime.deferral)."""
    runtime.deferral = BackgroundPredictions(runtime)
    return runtime.deferral
