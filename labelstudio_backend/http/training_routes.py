"""The training side of the HTTP API.

    GET  /training?project=<id>                          the latest job (state, progress, figures) and the
                                                         active checkpoint
    POST /training?project=<id>&action=start|cancel|rollback
    POST /job_status {"job": "<id>"}                     Label Studio's question about the job its Start Training
                                                         started (the `job` of the START_TRAINING answer); 410
                                                         for a job this backend does not know
    GET  /versions[?project=<id>]                        Label Studio's list of model versions: the project's
                                                         fine-tuned one's and the base model's (without a project,
                                                         as Label Studio 1.23.2 asks: every served project model)

`training_blueprint(runtime)` is registered by create_app, which also wires the runtime's training jobs and project
models; `training_status` is also shown under "training" in GET /references.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request

from labelstudio_backend.errors import BackendError
from labelstudio_backend.labelstudio.payload import parse_project_id
from labelstudio_backend.runtime.runtime import Runtime
from labelstudio_backend.serving.versions import all_versions, project_versions

logger = logging.getLogger(__name__)


def training_status(runtime: Runtime, project_id: int) -> dict:
    """The latest job of the project, the active checkpoint, and why a stored one is not served (if so)."""
    if runtime.training is None:
        return {"job": None, "enabled": False}
    status = runtime.training.status(project_id)
    job = status["job"]
    if job is not None and job["state"] == "running" and job["steps"]:
        job["progress"] = round(job["step"] / job["steps"], 3)
    status["served"] = runtime.model_for(project_id).checkpoint_id
    if runtime.project_models is not None:
        runtime.project_models.active(project_id)  # refreshes `stale`
        status["needs_training"] = runtime.project_models.stale.get(project_id)
    return status


def training_blueprint(runtime: Runtime) -> Blueprint:
    routes = Blueprint("training", __name__)

    @routes.route("/training", methods=["GET", "POST"])
    def training() -> tuple[Response, int]:
        project_id = parse_project_id(request.args.get("project"))
        runtime.known_projects.add(project_id)
        jobs = runtime.training
        if jobs is None:
            raise BackendError("training is not available in this process")
        if request.method == "POST":
            action = request.args.get("action", "")
            if action == "start":
                record = runtime.projects.load(project_id)
                jobs.start(project_id, record.get("label_config"), runtime.projects.settings_for(project_id),
                           reason="POST /training")
            elif action == "cancel":
                jobs.cancel(project_id, "cancelled through POST /training")
            elif action == "rollback":
                previous = jobs.store.clear_active(project_id)
                logger.info("project %s rolled back to the base model (was %s)", project_id,
                            previous.checkpoint_id if previous else "the base model already")
            else:
                raise BackendError("POST /training needs action=start, cancel or rollback")
        answer = {"project": project_id, **training_status(runtime, project_id)}
        return jsonify(answer), (202 if request.method == "POST" else 200)


    @routes.route("/job_status", methods=["GET", "POST"])
    def job_status() -> Any:
        """Label Studio's question about the job its Start Training started (410: a job this backend does not
        know, which Label Studio 1.23.2 reads as removed)."""
        data = request.get_json(silent=True, force=True)
        job = (data.get("job") if isinstance(data, dict) else None) or request.args.get("job")
        if job in (None, ""):
            raise BackendError("/job_status needs 'job' (the id the Start Training answer gave)")
        status = runtime.training.job_status(job) if runtime.training is not None else None
        if status is None:
            return jsonify({"error": f"no training job {job} here (deleted with its project, or another "
                                     "MODEL_DIR)", "status": 410}), 410
        return jsonify(status)

    @routes.route("/versions", methods=["GET", "POST"])
    def versions() -> Any:
        """Label Studio's list of model versions: the project's fine-tuned one's and the base model's (without a
        project, as Label Studio 1.23.2 asks: every served project model)."""
        data = request.get_json(silent=True, force=True)
        project = (data.get("project") if isinstance(data, dict) else None) or request.args.get("project")
        if project in (None, ""):  # Label Studio 1.23.2's GET carries no body
            return jsonify(all_versions(runtime))
        project_id = parse_project_id(project)
        return jsonify(project_versions(runtime, project_id, runtime.projects.settings_for(project_id)))

    return routes
