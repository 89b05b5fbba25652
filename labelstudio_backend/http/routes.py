"""The routes of Label Studio's ML backend protocol (/health, /setup, /predict, /webhook, /train) and of operations
(/metrics, /references), as a Blueprint that create_app registers. Each route parses its request and hands it to
one object: a DINOvBackend (setup, predict), the webhook inbox (webhook, train) or the runtime.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from labelstudio_backend.errors import BackendError
from labelstudio_backend.http import edge, label_studio_hooks
from labelstudio_backend.http.auth import BasicAuth
from labelstudio_backend.http.metrics import Metrics, per_label
from labelstudio_backend.http.training_routes import training_status
from labelstudio_backend.http.webhook_credentials import WebhookGuard
from labelstudio_backend.labelstudio.payload import parse_project_id
from labelstudio_backend.references.webhooks import WebhookInbox
from labelstudio_backend.runtime.runtime import Runtime
from labelstudio_backend.serving.backend import DINOvBackend
from labelstudio_backend.serving.leave_one_out import leave_one_out


def protocol_blueprint(runtime: Runtime, metrics: Metrics, auth: BasicAuth | None,
                       webhooks: WebhookGuard | None) -> Blueprint:
    """The protocol's and operations' routes over one runtime. auth: basic auth when it is on (an anonymous
    /health then shows state only). webhooks: gives the project's Label Studio webhook
    the basic auth credentials on /setup (None: basic auth is off, or no Label Studio API to do it with)."""
    routes = Blueprint("protocol", __name__)

    def body() -> dict:
        """The request's JSON object (BackendError: 400 with what is wrong)."""
        try:
            data = request.get_json(silent=True, force=True)
        except RecursionError:  # nested deeper than the JSON parser goes
            data = None
        if data is None:
            raise BackendError("the request body is not valid JSON")
        if not isinstance(data, dict):
            raise BackendError(f"the request body must be a JSON object, got {type(data).__name__}")
        return data

    # --- Label Studio's protocol

    @routes.get("/")
    @routes.get("/health")
    def health() -> Any:
        authorized = edge.is_authorized(auth, request.headers.get("Authorization"))  # else state only
        # Label Studio is told LOADING (200) while the model loads, so it keeps the connection usable
        answer, code = label_studio_hooks.health_answer(health_report(runtime), request.headers)
        return jsonify(edge.health_for(answer, authorized, runtime.settings)), code

    @routes.post("/setup")
    def setup() -> Any:
        data = body()
        if "project" not in data:
            raise BackendError("/setup needs 'project' ('<id>.<created>')")
        model = DINOvBackend(data["project"], data.get("schema") or data.get("label_config"), runtime=runtime)
        version = model.setup(data.get("extra_params"))
        if webhooks is not None and model.project_id is not None:  # its Label Studio webhook gets the credentials
            webhooks.ensure(model.project_id, request.host, request.script_root + "/webhook")
        return jsonify({"model_version": version})

    @routes.post("/predict")
    def predict() -> Any:
        data = body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BackendError("/predict needs 'tasks': a non-empty list of tasks")
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise BackendError("'params' must be an object")
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise BackendError("params.context must be an object or null")
        model = DINOvBackend(data.get("project"), data.get("label_config"), runtime=runtime)
        return jsonify({"results": model.predict(tasks, context=context)})

    @routes.post("/webhook")
    def webhook() -> Any:
        data = body()
        event = data.get("action")
        if not isinstance(event, str) or not event:
            raise BackendError("a webhook needs 'action' (the event name)")
        metrics.webhooks.labels(event=event).inc()
        if data.get("project") is None:
            return jsonify({"status": "ignored", "event": event, "reason": "no project in the payload"})
        return jsonify(WebhookInbox(runtime).receive(event, data))

    @routes.post("/train")
    def train() -> Any:
        data = body()
        project_id = parse_project_id(data.get("project"))
        return jsonify(WebhookInbox(runtime).receive("START_TRAINING", {"project": {"id": project_id}}))

    # --- operations

    @routes.get("/metrics")
    def prometheus() -> Any:
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @routes.route("/references", methods=["GET", "POST"])
    def references() -> Any:
        project_id = parse_project_id(request.args.get("project"))
        runtime.known_projects.add(project_id)
        answer: dict[str, Any] = {"project": project_id}
        if request.method == "POST":
            action = request.args.get("action", "")
            if action == "sync":
                # full: what Label Studio has replaces the store's view; QueueFull: 503 with Retry-After
                if runtime.ensure_synced(project_id, force=True, full=True) is None:
                    raise BackendError("no Label Studio API sync is configured (LABEL_STUDIO_URL and "
                                       "LABEL_STUDIO_API_KEY); references come from webhooks only")
                answer["started"] = "sync"
            elif action == "estimate":
                model = DINOvBackend(project_id, None, runtime=runtime)
                model.check_label_config()  # needs the config /setup stored
                runtime.queues["estimates"].submit(  # QueueFull: 503 with Retry-After
                    ("estimate", project_id), lambda: runtime.projects.save_estimate(project_id, leave_one_out(model)))
                answer["started"] = "estimate"
            else:
                raise BackendError("POST /references needs action=sync or action=estimate")
        store = runtime.store
        stats = store.stats(project_id)
        answer.update({"revision": store.revision(project_id),
                       "last_sync": runtime.last_sync.get(project_id) or stats.get("last_sync"),
                       "last_sync_error": runtime.sync_errors.get(project_id),
                       "examples_per_label": per_label(stats), "stats": stats,
                       "leave_one_out": runtime.projects.load_estimate(project_id),
                       "training": training_status(runtime, project_id)})
        return jsonify(answer), (202 if request.method == "POST" else 200)

    return routes


def health_report(runtime: Runtime) -> dict:
    """/health: UP when the model can be used and the store read; otherwise UNAVAILABLE with the reason (an
    orchestrator restarts or routes around the process). The queues and the kept work are shown either way."""
    status = runtime.model_status()
    reason = status.reason
    answer: dict[str, Any] = {"status": "UP", "model_class": DINOvBackend.__name__,
                              "model": {"checkpoint": runtime.checkpoint_id, "loaded": status.usable,
                                        "state": status.state, "attempts": status.attempts, "error": status.error}}
    try:
        answer["webhooks"] = {"pending": runtime.store.pending_event_count()}
        answer["background"] = runtime.store.background_counts()
    except Exception as error:  # the store cannot be read: nothing would work
        reason = reason or f"the reference store {runtime.settings.db_path} cannot be read: {error}"
    answer["queues"] = runtime.queues.stats()
    if reason:
        answer.update(status="UNAVAILABLE", reason=reason)
    return answer
