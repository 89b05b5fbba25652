"""Training jobs per project: queued, run one at a time per device in a child process, cancellable.

    jobs = TrainingJobs(settings)
    jobs.start(project_id, label_config, reason="START_TRAINING")   # -> the job record (state "queued")
    jobs.cancel(project_id, "why")
    jobs.status(project_id)                                          # -> latest job, active checkpoint

A newer start of the same project cancels its queued or running job; jobs of different projects wait their turn
(one worker here, and a file lock in MODEL_DIR across gunicorn workers, so one job per device). The job runs in
a spawned child process (labelstudio_backend.training.job.run_job) at low priority with one torch thread:
predictions keep flowing in this process, and cancelling is ending the child. A job whose worker process died
(a restart) is reported failed when the next worker starts; the active checkpoint is only ever replaced by a
finished job, so it stays intact.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from dinov.file_lock import exclusive
from labelstudio_backend.errors import BackendError
from labelstudio_backend.settings import Settings
from labelstudio_backend.store.training import TrainingStore, training_db
from labelstudio_backend.training.job import JobSpec, run_job

logger = logging.getLogger(__name__)

POLL_S = 0.5  # how often the waiting worker looks at its child and at cancellations


class TrainingJobs:
    """The process's training jobs.

    Args:
        settings: the process's settings (a job trains with its project's settings, given to start()).
        target: the child's entry point, target(JobSpec) (tests give a stand-in; it must be importable).
        submit: submit(fn, *args) -> Future, the queue jobs wait in (default: a thread of this object's own).
    """

    def __init__(self, settings: Settings, target: Callable[[JobSpec], None] = run_job,
                 submit: Callable[..., Future] | None = None):
        self.settings = settings
        self.target = target
        self.store = TrainingStore(training_db(settings.model_dir))
        self._queue = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinov-training")
        self._submit = submit or self._queue.submit
        for job_id in self.store.fail_orphans():
            logger.warning("training job %s was cut off by a restart: reported failed", job_id)

    def submit(self, fn: Callable, *args: Any) -> Future:
        """Where jobs wait their turn: the runtime's "training" work queue (a thread of its own without one)."""
        return self._submit(fn, *args)

    def start(self, project_id: int, label_config: str | None, settings: Settings, reason: str) -> dict:
        """Queue a training job of the project (cancelling its open one); returns the job record."""
        if not label_config:
            raise BackendError(f"project {project_id}: no labeling config yet; connect the model (/setup) first")
        self.cancel(project_id, f"superseded by a newer training ({reason})")
        job_id = self.store.create_job(project_id, reason)
        logger.info("project %s: training job %s queued (%s)", project_id, job_id, reason)
        self.submit(self._run, JobSpec(job_id, int(project_id), settings, label_config))
        return self.store.job(job_id) or {}

    def count_annotations(self, project_id: int, count: int, label_config: str | None, settings: Settings) -> None:
        """TRAIN_EVERY_ANNOTATIONS: start a job once this many new annotations came in (counted in the training
        store, across the workers and restarts: the worker whose count reaches the threshold starts the job)."""
        due = self.store.count_annotations(project_id, count, settings.train_every_annotations)
        if due and label_config:
            self.start(project_id, label_config, settings, reason=f"{settings.train_every_annotations} new annotations")

    def cancel(self, project_id: int, why: str) -> list[int]:
        """Cancel the project's queued and running jobs; returns their ids."""
        ids = []
        for job in self.store.open_jobs(project_id):
            if self.store.update_job(job["job_id"], state="cancelled", message=why):
                ids.append(job["job_id"])  # the worker that runs it ends its child (it watches the state)
                logger.info("project %s: training job %s cancelled: %s", project_id, job["job_id"], why)
        return ids

    def status(self, project_id: int) -> dict:
        """The latest job of the project and its active checkpoint (None: the base model)."""
        active = self.store.active(project_id)
        return {"job": self.store.latest_job(project_id),
                "active_checkpoint": active.checkpoint_id if active else None}

    def _run(self, spec: JobSpec) -> None:
        job = self.store.job(spec.job_id)
        if job is None or job["state"] != "queued":
            return  # cancelled while it waited
        with exclusive(self.settings.model_dir / "training.lock"):  # one job at a time across MODEL_DIR's workers
            self._run_child(spec)

    def _run_child(self, spec: JobSpec) -> None:
        if not self.store.update_job(spec.job_id, state="running", message="starting"):
            return
        child = multiprocessing.get_context("spawn").Process(target=self.target, args=(spec,),
                                                             name=f"dinov-training-{spec.job_id}", daemon=True)
        child.start()
        self.store.update_job(spec.job_id, child_pid=child.pid)
        while child.is_alive():
            job = self.store.job(spec.job_id)
            if job is None or job["state"] == "cancelled":  # cancelled by any worker, or the project deleted
                child.terminate()  # the job's state says cancelled already
                child.join(10)
                if child.is_alive():
                    child.kill()
                break
            child.join(POLL_S)
        child.join()
        if self.store.update_job(spec.job_id, state="failed",
                                 message=f"the training process ended (exit code {child.exitcode}) before it "
                                         "finished; the active checkpoint is unchanged"):
            logger.error("project %s: training job %s ended with exit code %s", spec.project_id, spec.job_id,
                         child.exitcode)

    def wait(self, project_id: int, timeout: float) -> dict | None:
        """Wait until the project has no open job (the shell command); returns its latest job."""
        deadline = time.monotonic() + timeout
        while self.store.open_jobs(project_id) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return self.store.latest_job(project_id)

    def shutdown(self) -> None:
        self._queue.shutdown(wait=False, cancel_futures=True)
