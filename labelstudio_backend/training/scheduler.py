"""Training jobs per project: queued, run one at a time per device in a child process, cancellable.

    jobs = TrainingJobs(settings)
    jobs.start(project_id, label_config, reason="START_TRAINING")   # -> the job record (state "queued")
    jobs.cancel(project_id, "why")
    jobs.status(project_id)                                          # -> latest job, active checkpoint

    jobs.request(project_id, label_config, settings, project)      # Label Studio's START_TRAINING: the answer
    jobs.job_status("7")                                             # Label Studio's /job_status

A newer start of the same project cancels its queued or running job; jobs of different projects wait their turn
(one worker here, and a file lock in MODEL_DIR across gunicorn workers, so one job per device). The job runs in
a spawned child process (labelstudio_backend.training.job.run_job) at low priority with one torch thread:
predictions keep flowing in this process, and cancelling is ending the child. A job whose worker process died
(a restart) is reported failed when the next worker starts; the active checkpoint is only ever replaced by a
finished job, so it stays intact.

Label Studio's START_TRAINING (its Start Training, and its project switch "Start model training on annotation
submission", which sends one per saved annotation) goes through request(). With the switch off, it starts a job
at once. With it on (the event's project has min_annotations_to_start_training > 0), the events coalesce: a job
starts when TRAIN_ON_SUBMISSION_TASKS annotated tasks were added since the last job started, or TRAIN_QUIET_S
after the last event; a running job keeps running unless it trains on less than 1/RESTART_RATIO of the
annotated tasks that now exist (then it is restarted); nothing starts while the project has fewer annotated tasks
than a job needs. The quiet-period timer lives in the process that got the last event (a restart forgets it; the
pending count stays in the store, and the next event arms it again).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
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
RESTART_RATIO = 1.5  # a running job is restarted for a submission when the project has this many times its tasks
MIN_TASKS = 6  # annotated tasks a job needs (training.data: 3 to train on, 3 to check the result on)
# Label Studio's words for a job's state (its MLBackendTrainJob.is_running checks "queued" and "started")
LS_JOB_STATUS = {"queued": "queued", "running": "started", "done": "finished", "rejected": "rejected",
                 "failed": "failed", "cancelled": "canceled"}


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
        self._closed = False
        for job_id in self.store.fail_orphans():
            logger.warning("training job %s was cut off by a restart: reported failed", job_id)

    def submit(self, fn: Callable, *args: Any) -> Future:
        """Where jobs wait their turn: the runtime's "training" work queue (a thread of its own without one)."""
        return self._submit(fn, *args)

    def start(self, project_id: int, label_config: str | None, settings: Settings, reason: str,
              annotated: int = 0) -> dict:
        """Queue a training job of the project (cancelling its open one); returns the job record. annotated: the
        project's annotated tasks now, when known (what a later submission compares with)."""
        if not label_config:
            raise BackendError(f"project {project_id}: no labeling config yet; connect the model (/setup) first")
        self.cancel(project_id, f"superseded by a newer training ({reason})")
        job_id = self.store.create_job(project_id, reason, annotated=annotated)
        logger.info("project %s: training job %s queued (%s)", project_id, job_id, reason)
        self.submit(self._run, JobSpec(job_id, int(project_id), settings, label_config))
        return self.store.job(job_id) or {}

    def request(self, project_id: int, label_config: str | None, settings: Settings, project: dict | None,
                reason: str = "START_TRAINING") -> dict:
        """Label Studio's START_TRAINING of the project (`project`: the event's project, with its counts and its
        "train on submission" switch). Returns the answer for Label Studio: {"job": the job id as a string, or
        None when none starts now, "job_status", "message": what happens and how to follow it}."""
        project = project if isinstance(project, dict) else {}
        annotated = _int(project.get("num_tasks_with_annotations"))
        if not _int(project.get("min_annotations_to_start_training")):  # Start Training itself: a job now
            return self._started(self.start(project_id, label_config, settings, reason, annotated), settings)
        if not label_config:
            raise BackendError(f"project {project_id}: no labeling config yet; connect the model (/setup) first")
        open_jobs = self.store.open_jobs(project_id)
        if open_jobs:
            job = open_jobs[-1]
            if job["annotated"] and annotated >= RESTART_RATIO * job["annotated"]:
                return self._started(self.start(project_id, label_config, settings,
                                                 f"{reason}: {annotated} annotated tasks, the running job had "
                                                 f"{job['annotated']}", annotated), settings)
            now = time.time()
            self.store.add_start_request(project_id, annotated, now)
            self._after_quiet(project_id, label_config, settings, now)
            return {"job": str(job["job_id"]), "job_status": LS_JOB_STATUS[job["state"]],
                    "message": f"training job {job['job_id']} of project {project_id} keeps running (it trains on "
                               f"{job['annotated'] or 'the'} annotated tasks; {annotated} now); the new annotations "
                               f"are trained on by the next job, {settings.train_quiet_s:.0f} s after the last "
                               f"submission. Follow it: GET /training?project={project_id}"}
        if annotated and annotated < MIN_TASKS:
            return {"job": None, "job_status": None,
                    "message": f"no training yet: project {project_id} has {annotated} annotated tasks, a job needs "
                               f"{MIN_TASKS}"}
        latest = self.store.latest_job(project_id)
        added = annotated - (latest["annotated"] if latest else 0)
        if annotated and added >= settings.train_on_submission_tasks:
            return self._started(self.start(project_id, label_config, settings,
                                             f"{reason}: {added} newly annotated tasks", annotated), settings)
        now = time.time()
        self.store.add_start_request(project_id, annotated, now)
        self._after_quiet(project_id, label_config, settings, now)
        return {"job": None, "job_status": None,
                "message": f"training of project {project_id} starts {settings.train_quiet_s:.0f} s after the last "
                           f"submission, or at once when {settings.train_on_submission_tasks} more tasks are "
                           f"annotated ({max(added, 0)} since the last job). Follow it: GET /training?project="
                           f"{project_id}"}

    def _started(self, job: dict, settings: Settings) -> dict:
        steps = f"{settings.train_steps} steps"
        minutes = f"{settings.train_minutes:g} min" if settings.train_minutes else "10 min on CPU (15 on a GPU)"
        pid, job_id = job["project_id"], job["job_id"]
        return {"job": str(job_id), "job_status": LS_JOB_STATUS[job["state"]],
                "message": f"training job {job_id} of project {pid} queued: {settings.train_parameters}, at most "
                           f"{steps} or {minutes}, then measured on the validation tasks; a better model is served "
                           f"(the model version changes), otherwise the current one stays. Follow it: GET "
                           f"/training?project={pid} or the backend's log"}

    def _after_quiet(self, project_id: int, label_config: str, settings: Settings, armed_at: float,
                     delay: float | None = None) -> None:
        """A timer of this process: start_when_quiet() TRAIN_QUIET_S after the request made at `armed_at`."""
        def fire() -> None:
            try:
                if not self._closed:
                    self.start_when_quiet(project_id, label_config, settings, armed_at)
            except Exception:  # a timer never takes the process down; the next request tries again
                logger.exception("project %s: the coalesced training start failed", project_id)

        timer = threading.Timer(max(0.0, settings.train_quiet_s if delay is None else delay), fire)
        timer.daemon = True
        timer.start()

    def start_when_quiet(self, project_id: int, label_config: str, settings: Settings, armed_at: float,
                         now: float | None = None) -> dict | None:
        """The quiet period's check for the coalesced request made at `armed_at` (epoch): when it is still the
        project's last and TRAIN_QUIET_S passed, start the job (the store decides which worker does); while a job
        runs, look again after another quiet period. Returns the started job, or None."""
        now = time.time() if now is None else now
        pending = self.store.start_requests(project_id)
        if not pending or not pending["pending"] or pending["last_request"] > armed_at:
            return None  # a job answered the requests already, or a newer request's timer decides
        left = pending["last_request"] + settings.train_quiet_s - now
        if left > 0:  # the timer's clock and the request's differ a little
            self._after_quiet(project_id, label_config, settings, armed_at, delay=left)
            return None
        annotated = self.store.claim_quiet_start(project_id, now - settings.train_quiet_s)
        if annotated is not None:
            return self.start(project_id, label_config, settings, "START_TRAINING: quiet after submissions", annotated)
        if self.store.open_jobs(project_id):
            self._after_quiet(project_id, label_config, settings, armed_at)  # once the running job ends
        return None

    def job_status(self, job: Any) -> dict | None:
        """Label Studio's /job_status of a job id: {"job_status" (its words), "state", "message", "step", "steps",
        "project", "figures"}; None for a job this backend does not know."""
        try:
            record = self.store.job(int(str(job)))
        except (TypeError, ValueError):
            return None
        if record is None:
            return None
        return {"job": str(record["job_id"]), "job_status": LS_JOB_STATUS.get(record["state"], record["state"]),
                "state": record["state"], "project": record["project_id"], "message": record["message"],
                "step": record["step"], "steps": record["steps"], "figures": record["figures"]}

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
        self._closed = True
        self._queue.shutdown(wait=False, cancel_futures=True)


def _int(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0
