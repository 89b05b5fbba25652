"""The Flask app: Label Studio's ML backend protocol, wired to one Runtime.

    GET  /health, /          {"status": "UP", "model_class": "DINOvBackend", ...}; 503 {"status": "UNAVAILABLE",
                             "reason"} while the model cannot be used (loading, or a failed load waiting to retry)
    POST /setup              {"project": "<id>.<created>", "schema", "hostname", "access_token", "extra_params"}
                             -> {"model_version"}
    POST /predict            {"tasks", "project", "label_config", "params": {"context", ...}} -> {"results"}
    POST /webhook            Label Studio's webhook events; kept in the store before the answer, applied in order
                             in the background (references/webhooks.py)
    POST /train              older Label Studio's "Start training" (treated as START_TRAINING)
    GET  /metrics            Prometheus text: requests, latencies, errors, references per project
    GET  /references?project=<id>                 examples per label, revision, last sync, leave-one-out estimate,
                                                  training state
    POST /references?project=<id>&action=sync|estimate    start a sync or a leave-one-out estimate (503 with
                                                          Retry-After when its queue is full)
    GET/POST /training?project=<id>[&action=start|cancel|rollback]   fine-tuning jobs (training_routes.py)

Errors are JSON {"error": message, "status": code}: 4xx for bad requests with a message that says
what is wrong (401 without the basic auth credentials, 413 for a body over MAX_REQUEST_BYTES), 503 while
the model cannot be loaded or a work queue is full (with Retry-After), 500 (no trace, only an id to find
in the log) for anything unexpected.

create_app is the one place where the runtime's parts are wired (deferred predictions, training jobs, project
models, the metrics hooks) and the routes registered: routes.py (the protocol and operations), training_routes.py.

With BASIC_AUTH_USER/BASIC_AUTH_PASS set, every endpoint but /health requires them (labelstudio_backend.http.auth);
/setup then also gives the project's Label Studio webhook to this backend the same credentials
(labelstudio_backend.http.webhook_credentials), so that /webhook can require them too.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from labelstudio_backend.errors import BackendError, ModelUnavailable
from labelstudio_backend.fetching.images import ImageLoader
from labelstudio_backend.http import edge, label_studio_hooks
from labelstudio_backend.http.auth import REALM, AuthFailed, BasicAuth
from labelstudio_backend.http.metrics import Metrics
from labelstudio_backend.http.routes import protocol_blueprint
from labelstudio_backend.http.training_routes import training_blueprint
from labelstudio_backend.http.webhook_credentials import WebhookGuard
from labelstudio_backend.references.sources import embed_ahead
from labelstudio_backend.references.webhooks import WebhookInbox
from labelstudio_backend.runtime.runtime import Predictor, Runtime
from labelstudio_backend.runtime.work_queues import QueueFull
from labelstudio_backend.serving.deferred import StoreDeferredPredictions
from labelstudio_backend.serving.encode_ahead import EncodeAhead
from labelstudio_backend.serving.project_models import ProjectModels
from labelstudio_backend.settings import Settings, SettingsError
from labelstudio_backend.store import ReferenceStore
from labelstudio_backend.store.work import InboxFull
from labelstudio_backend.training.scheduler import TrainingJobs

logger = logging.getLogger(__name__)


def create_runtime(settings: Settings, model_factory: Callable[[Settings], Predictor] | None = None, *,
                   store: ReferenceStore | None = None, images: ImageLoader | None = None,
                   syncer: Callable[..., Any] | None = None) -> Runtime:
    """The process's Runtime with every part wired: references embedded ahead after each change, deferred
    predictions (resuming what a previous process kept), the next tasks encoded ahead (ENCODE_AHEAD_TASKS), kept
    webhook events applied, Start Training's jobs and the projects' fine-tuned models."""
    runtime = Runtime(settings, model_factory=model_factory, store=store, images=images, syncer=syncer)
    runtime.on_references_changed = lambda project_id: embed_ahead(runtime, project_id)
    runtime.deferred = StoreDeferredPredictions(runtime)
    runtime.deferred.schedule()  # resume the tasks a previous process kept
    if settings.encode_ahead_tasks > 0:
        runtime.ahead = EncodeAhead(runtime)
    WebhookInbox(runtime).schedule()  # apply the events a previous process kept but did not apply
    training = TrainingJobs(settings, submit=lambda fn, *args: runtime.queues["training"].submit(None, fn, *args))
    runtime.training = training
    runtime.project_models = ProjectModels(runtime, training.store)
    return runtime


def create_app(model_factory: Callable[[Settings], Predictor] | None = None, settings: Settings | None = None, *,
               store: ReferenceStore | None = None, images: ImageLoader | None = None,
               syncer: Callable[..., Any] | None = None, load_model: bool = True) -> Flask:
    """The Flask app. model_factory(settings) -> predictor (default: DINOvPredictor.from_checkpoint of
    DINOV_CHECKPOINT); settings default to Settings.from_env(); store, images and syncer replace the
    defaults (the SQLite store in MODEL_DIR, the image loader, no Label Studio API sync). With
    load_model the model starts loading in the background at once."""
    settings = settings or Settings.from_env()
    runtime = create_runtime(settings, model_factory, store=store, images=images, syncer=syncer)
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes  # larger bodies: 413 before they are read
    app.extensions["dinov"] = runtime
    metrics = Metrics(runtime)
    runtime.on_task_failed = lambda reason: metrics.task_failures.labels(reason=reason).inc()
    runtime.on_tasks_predicted = lambda mode, count: metrics.predicted_tasks.labels(mode=mode).inc(count)
    if load_model:
        runtime.start_loading()
    auth = BasicAuth(*settings.basic_auth) if settings.basic_auth else None
    client = getattr(runtime.images, "client", None)
    webhooks = WebhookGuard(client, auth) if auth and client is not None and client.api_key else None
    if auth is not None and webhooks is None:
        logger.warning("basic auth is on but LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY are not both set: the backend "
                       "cannot give its Label Studio webhook the credentials, so webhook events will be refused "
                       "(401) until you set the header 'Authorization: Basic ...' on the webhook yourself")
    app.register_blueprint(protocol_blueprint(runtime, metrics, auth, webhooks))
    app.register_blueprint(training_blueprint(runtime))

    # --- request plumbing

    @app.before_request
    def _start() -> Any:
        g.started = time.perf_counter()
        if auth is None or (request.path == "/health" and not label_studio_hooks.health_needs_auth(request.headers)):
            return None
        try:
            auth.check(request.headers.get("Authorization"))
        except AuthFailed as e:
            return jsonify({"error": str(e), "status": 401}), 401, {"WWW-Authenticate": f'Basic realm="{REALM}"'}
        return None

    @app.after_request
    def _record(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(endpoint=endpoint, method=request.method, status=str(response.status_code)).inc()
        if "started" in g:
            metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - g.started)
        return response

    edge.install(app, settings)  # after auth: chunked bodies counted (413), 401/403 logged (issue 20)

    @app.errorhandler(Exception)
    def _error(error: Exception) -> Any:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        headers: dict[str, str] = {}
        if isinstance(error, RequestEntityTooLarge):
            status, message = 413, (f"the request body is larger than MAX_REQUEST_BYTES={settings.max_request_bytes} "
                                    "bytes; send fewer tasks per request or raise MAX_REQUEST_BYTES")
        elif isinstance(error, HTTPException):
            status, message = error.code or 500, str(error.description)
        elif isinstance(error, (QueueFull, InboxFull)):  # overload: the caller may come back
            status, message = 503, str(error)
            headers["Retry-After"] = str(error.retry_after)
        elif isinstance(error, ModelUnavailable):
            status, message = 503, str(error)
        elif isinstance(error, (BackendError, SettingsError)):
            status, message = 400, str(error)
        elif isinstance(error, ValueError):  # bad config, region, image or prompt: the message says which
            status, message = 422, str(error)
        else:
            incident = uuid.uuid4().hex[:8]
            logger.exception("unexpected error %s on %s %s", incident, request.method, request.path)
            status, message = 500, f"internal error {incident}; the backend's log has the details"
        if status < 500 or status == 503:
            logger.warning("%s %s -> %d: %s", request.method, request.path, status, message)
        metrics.errors.labels(endpoint=endpoint, kind=type(error).__name__).inc()
        return jsonify({"error": message, "status": status}), status, headers

    return app
