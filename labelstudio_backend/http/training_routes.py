"""The training side of the HTTP API and of /metrics.

    GET  /training?project=<id>                          the latest job (state, progress, figures) and the
                                                         active checkpoint
    POST /training?project=<id>&action=start|cancel|rollback
    POST /job_status {"job": "<id>"}                     Label Studio's question about the job its Start Training
                                                         started (the `job` of the START_TRAINING answer); 410
                                                         for a job this backend does not know
    GET  /versions[?project=<id>]                        Label Studio's list of model versions: the project's
                                                         fine-tuned one's and the base model's (without a project,
                                                         as Label Studio 1.23.2 asks: every served project model)

`install(app, runtime, registry)` adds the route, the training state to GET /references, and the metrics
dinov_training_state{project,state}, dinov_training_progress{project} and dinov_training_miou{project,model}.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify, request
from prometheus_client.core import GaugeMetricFamily

from labelstudio_backend.errors import BackendError
from labelstudio_backend.labelstudio.payload import parse_project_id
from labelstudio_backend.serving.project_models import ProjectModels
from labelstudio_backend.serving.versions import all_versions, project_versions
from labelstudio_backend.runtime.runtime import Runtime
from labelstudio_backend.store.training import STATES
from labelstudio_backend.training.scheduler import TrainingJobs

logger = logging.getLogger(__name__)


def install_training(runtime: Runtime) -> None:
    """Give the runtime its training jobs and per-project models (what the backend and the bulk job use)."""
    runtime.training = TrainingJobs(runtime.settings,
                                    submit=lambda fn, *args: runtime.queues["training"].submit(None, fn, *args))
    runtime.project_models = ProjectModels(runtime, runtime.training.store)


def training_status(runtime: Runtime, project_id: int) -> dict:
    """The latest job of the project, the active checkpoint, and why a stored one is not served (if so)."""
    status = runtime.training.status(project_id)
    job = status["job"]
    if job is not None and job["state"] == "running" and job["steps"]:
        job["progress"] = round(job["step"] / job["steps"], 3)
    runtime.project_models.active(project_id)  # refreshes `stale`
    status["served"] = runtime.for_project(project_id).checkpoint_id
    status["needs_training"] = runtime.project_models.stale.get(project_id)
    return status


def install(app: Flask, runtime: Runtime, registry: Any) -> None:
    registry.register(_TrainingCollector(runtime))

    @app.route("/training", methods=["GET", "POST"])
    def training():
        project_id = parse_project_id(request.args.get("project"))
        runtime.known_projects.add(project_id)
        if request.method == "POST":
            action = request.args.get("action", "")
            if action == "start":
                record = runtime.projects.load(project_id)
                runtime.training.start(project_id, record.get("label_config"),
                                       runtime.projects.settings_for(project_id), reason="POST /training")
            elif action == "cancel":
                runtime.training.cancel(project_id, "cancelled through POST /training")
            elif action == "rollback":
                previous = runtime.training.store.clear_active(project_id)
                logger.info("project %s rolled back to the base model (was %s)", project_id,
                            previous.checkpoint_id if previous else "the base model already")
            else:
                raise BackendError("POST /training needs action=start, cancel or rollback")
        answer = {"project": project_id, **training_status(runtime, project_id)}
        return jsonify(answer), (202 if request.method == "POST" else 200)


def install_label_studio_hooks(app: Flask, runtime: Runtime) -> None:
    """Label Studio's /job_status and /versions (what its ml/api_connector.py asks)."""

    @app.route("/job_status", methods=["GET", "POST"])
    def job_status():
        data = request.get_json(silent=True, force=True)
        job = (data.get("job") if isinstance(data, dict) else None) or request.args.get("job")
        if job in (None, ""):
            raise BackendError("/job_status needs 'job' (the id the Start Training answer gave)")
        status = runtime.training.job_status(job)
        if status is None:  # Label Studio 1.23.2 reads 410 as "removed"
            return jsonify({"error": f"no training job {job} here (deleted with its project, or another "
                                     "MODEL_DIR)", "status": 410}), 410
        return jsonify(status)

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        data = request.get_json(silent=True, force=True)
        project = (data.get("project") if isinstance(data, dict) else None) or request.args.get("project")
        if project in (None, ""):  # Label Studio 1.23.2's GET carries no body
            return jsonify(all_versions(runtime))
        project_id = parse_project_id(project)
        return jsonify(project_versions(runtime, project_id, runtime.projects.settings_for(project_id)))


class _TrainingCollector:
    """Training state per project, read from the training store at scrape time."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def describe(self):
        return []

    def collect(self):
        state = GaugeMetricFamily("dinov_training_state", "1 for the state of the project's latest training job",
                                  labels=["project", "state"])
        progress = GaugeMetricFamily("dinov_training_progress", "Steps done / steps of the running job",
                                     labels=["project"])
        miou = GaugeMetricFamily("dinov_training_miou", "Validation mIoU of the latest finished job",
                                 labels=["project", "model"])
        try:
            for project_id in self.runtime.training.store.projects():
                job = self.runtime.training.store.latest_job(project_id)
                if job is None:
                    continue
                for name in STATES:
                    state.add_metric([str(project_id), name], 1.0 if job["state"] == name else 0.0)
                if job["steps"]:
                    progress.add_metric([str(project_id)], job["step"] / job["steps"])
                for model in ("before", "after"):
                    if model in job["figures"]:
                        miou.add_metric([str(project_id), model], float(job["figures"][model]["miou"]))
        except Exception:  # a scrape never fails because of training
            logger.debug("no training metrics", exc_info=True)
        yield state
        yield progress
        yield miou
