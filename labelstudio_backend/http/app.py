"""The HTTP side of the backend: Label Studio's ML backend protocol on Flask.

    GET  /health, /          {"status": "UP", "model_class": "DINOvBackend", ...}; 503 {"status": "UNAVAILABLE",
                             "reason"} while the model cannot be used (loading, or a failed load waiting to retry)
    POST /setup              {"project": "<id>.<created>", "schema", "hostname", "access_token", "extra_params"}
                             -> {"model_version"}
    POST /predict            {"tasks", "project", "label_config", "params": {"context", ...}} -> {"results"}
    POST /webhook            Label Studio's webhook events; kept in the store before the answer, applied in order
                             in the background (webhooks.py)
    POST /train              older Label Studio's "Start training" (treated as START_TRAINING)
    GET  /metrics            Prometheus text: requests, latencies, errors, references per project
    GET  /references?project=<id>                 examples per label, revision, last sync, leave-one-out estimate,
                                                  training state
    POST /references?project=<id>&action=sync|estimate    start a sync or a leave-one-out estimate (503 with
                                                          Retry-After when its queue is full)
    GET/POST /training?project=<id>[&action=start|cancel|rollback]   fine-tuning jobs (training_api)

Errors are JSON {"error": message, "status": code}: 4xx for bad requests with a message that says
what is wrong (401 without the basic auth credentials, 413 for a body over MAX_REQUEST_BYTES), 503 while
the model cannot be loaded or a work queue is full (with Retry-After), 500 (no trace, only an id to find
in the log) for anything unexpected.

With BASIC_AUTH_USER/BASIC_AUTH_PASS set, every endpoint but /health requires them (labelstudio_backend.http.auth);
/setup then also gives the project's Label Studio webhook to this backend the same credentials
(labelstudio_backend.http.webhook_credentials), so that /webhook can require them too.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from labelstudio_backend.http import label_studio_hooks, training_routes
from labelstudio_backend.serving import deferred
from labelstudio_backend.http.auth import REALM, AuthFailed, BasicAuth
from labelstudio_backend.serving.backend import DINOvBackend
from labelstudio_backend.errors import BackendError, ModelUnavailable
from labelstudio_backend.serving.leave_one_out import leave_one_out
from labelstudio_backend.fetching.images import ImageLoader
from labelstudio_backend.labelstudio.payload import parse_project_id
from labelstudio_backend.references.sources import embed_ahead
from labelstudio_backend.runtime.runtime import Predictor, Runtime
from labelstudio_backend.settings import Settings, SettingsError
from labelstudio_backend.http.webhook_credentials import WebhookGuard
from labelstudio_backend.store.work import InboxFull
from labelstudio_backend.references.webhooks import WebhookInbox
from labelstudio_backend.runtime.work_queues import QueueFull

logger = logging.getLogger(__name__)


def create_app(model_factory: Callable[[Settings], Predictor] | None = None, settings: Settings | None = None, *,
               store: Any = None, images: ImageLoader | None = None, syncer: Callable[[int], Any] | None = None,
               load_model: bool = True) -> Flask:
    """The Flask app. model_factory(settings) -> predictor (default: DINOvPredictor.from_checkpoint of
    DINOV_CHECKPOINT); settings default to Settings.from_env(); store, images and syncer replace the
    defaults (the SQLite store in MODEL_DIR, the image loader, no Label Studio API sync). With
    load_model the model starts loading in the background at once."""
    settings = settings or Settings.from_env()
    runtime = Runtime(settings, model_factory=model_factory, store=store, images=images, syncer=syncer)
    runtime.on_references_changed = lambda project_id: embed_ahead(runtime, project_id)
    deferred.install(runtime)  # /predict's tasks over its time budget; resumes those a previous process kept
    WebhookInbox(runtime).schedule()  # apply the events a previous process kept but did not apply
    training_routes.install_training(runtime)  # Start Training: per-project fine-tuning and its models
    app = Flask(__name__)
    app.json.sort_keys = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes  # larger bodies: 413 before they are read
    app.extensions["dinov"] = runtime
    metrics = _Metrics(runtime)
    training_routes.install(app, runtime, metrics.registry)
    training_routes.install_label_studio_hooks(app, runtime)  # /job_status, /versions
    runtime.on_task_failed = lambda reason: metrics.task_failures.labels(reason=reason).inc()
    if load_model:
        runtime.start_loading()
    auth = BasicAuth(*settings.basic_auth) if settings.basic_auth else None
    client = getattr(runtime.images, "client", None)
    webhooks = WebhookGuard(client, auth) if auth and client is not None and client.api_key else None
    if auth is not None and webhooks is None:
        logger.warning("basic auth is on but LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY are not both set: the backend "
                       "cannot give its Label Studio webhook the credentials, so webhook events will be refused "
                       "(401) until you set the header 'Authorization: Basic ...' on the webhook yourself")

    # --- request plumbing

    @app.before_request
    def _start():
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

    @app.errorhandler(Exception)
    def _error(error: Exception):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        headers = {}
        if isinstance(error, RequestEntityTooLarge):
            status, message = 413, (f"the request body is larger than MAX_REQUEST_BYTES={settings.max_request_bytes} "
                                    "bytes; send fewer tasks per request or raise MAX_REQUEST_BYTES")
        elif isinstance(error, HTTPException):
            status, message = error.code or 500, error.description
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

    def body() -> dict:
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

    @app.get("/")
    @app.get("/health")
    def health():
        answer, code = label_studio_hooks.health_answer(health_report(runtime), request.headers)
        return jsonify(answer), code

    @app.post("/setup")
    def setup():
        data = body()
        if "project" not in data:
            raise BackendError("/setup needs 'project' ('<id>.<created>')")
        model = DINOvBackend(data["project"], data.get("schema") or data.get("label_config"), runtime=runtime)
        version = model.setup(data.get("extra_params"))
        if webhooks is not None:  # the webhook Label Studio made for this backend gets the credentials
            webhooks.ensure(model.project_id, request.host, request.script_root + "/webhook")
        return jsonify({"model_version": version})

    @app.post("/predict")
    def predict():
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
        mode = "interactive" if context and context.get("result") else "batch"
        results = model.predict(tasks, context=context)
        metrics.predicted_tasks.labels(mode=mode).inc(len(tasks))
        return jsonify({"results": results})

    @app.post("/webhook")
    def webhook():
        data = body()
        event = data.get("action")
        if not isinstance(event, str) or not event:
            raise BackendError("a webhook needs 'action' (the event name)")
        metrics.webhooks.labels(event=event).inc()
        project = data.get("project")
        if project is None:
            return jsonify({"status": "ignored", "event": event, "reason": "no project in the payload"})
        config = project.get("label_config") if isinstance(project, dict) else None
        model = DINOvBackend(project, config, runtime=runtime)
        return jsonify(model.fit(event, data))

    @app.post("/train")
    def train():
        data = body()
        model = DINOvBackend(data.get("project"), data.get("label_config"), runtime=runtime)
        return jsonify(model.fit("START_TRAINING", {"project": {"id": model.project_id}}))

    # --- operations

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.route("/references", methods=["GET", "POST"])
    def references():
        project_id = parse_project_id(request.args.get("project"))
        runtime.known_projects.add(project_id)
        answer: dict[str, Any] = {"project": project_id}
        if request.method == "POST":
            action = request.args.get("action", "")
            if action == "sync":
                if runtime.ensure_synced(project_id, force=True) is None:  # QueueFull: 503 with Retry-After
                    raise BackendError("no Label Studio API sync is configured (LABEL_STUDIO_URL and "
                                       "LABEL_STUDIO_API_KEY); references come from webhooks only")
                answer["started"] = "sync"
            elif action == "estimate":
                model = DINOvBackend(project_id, None, runtime=runtime)
                model.parsed_label_config  # needs the config /setup stored
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
                       "examples_per_label": _per_label(stats), "stats": stats,
                       "leave_one_out": runtime.projects.load_estimate(project_id),
                       "training": training_routes.training_status(runtime, project_id)})
        return jsonify(answer), (202 if request.method == "POST" else 200)

    return app


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


class _Metrics:
    """Prometheus metrics in a registry of the app's own (several apps can live in one process)."""

    def __init__(self, runtime: Runtime):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("dinov_requests", "HTTP requests", ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("dinov_request_seconds", "Request latency", ["endpoint"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100))
        self.errors = Counter("dinov_errors", "Requests that failed, by exception", ["endpoint", "kind"], registry=r)
        self.predicted_tasks = Counter("dinov_predicted_tasks", "Tasks predicted", ["mode"], registry=r)
        self.task_failures = Counter("dinov_task_failures", "Tasks answered with an empty prediction",
                                     ["reason"], registry=r)
        self.webhooks = Counter("dinov_webhooks", "Webhook events received", ["event"], registry=r)
        loaded = Gauge("dinov_model_loaded", "1 once the model is loaded", registry=r)
        loaded.set_function(lambda: 1.0 if runtime.model_loaded else 0.0)
        r.register(_ReferenceCollector(runtime))
        r.register(_QueueCollector(runtime))


class _QueueCollector:
    """Jobs waiting and running per work queue, read at scrape time."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def describe(self):
        return []

    def collect(self):
        pending = GaugeMetricFamily("dinov_queue_pending", "Jobs waiting per work queue", labels=["queue"])
        running = GaugeMetricFamily("dinov_queue_running", "Jobs running per work queue", labels=["queue"])
        rejected = GaugeMetricFamily("dinov_queue_rejected", "Jobs refused by a full queue", labels=["queue"])
        for name, stats in self.runtime.queues.stats().items():
            pending.add_metric([name], float(stats["pending"]))
            running.add_metric([name], float(stats["running"]))
            rejected.add_metric([name], float(stats["rejected"]))
        yield pending
        yield running
        yield rejected


class _ReferenceCollector:
    """References per project and label, read from the store at scrape time."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def describe(self):
        return []

    def collect(self):
        examples = GaugeMetricFamily("dinov_references", "In-context examples per project and label",
                                     labels=["project", "label"])
        revision = GaugeMetricFamily("dinov_reference_revision", "Reference revision per project", labels=["project"])
        for project_id in sorted(self.runtime.known_projects):
            try:
                stats = self.runtime.store.stats(project_id)
                revision.add_metric([str(project_id)], float(self.runtime.store.revision(project_id)))
            except Exception:  # a scrape never fails because of one project
                logger.debug("no reference stats for project %s", project_id, exc_info=True)
                continue
            for label, count in _per_label(stats).items():
                examples.add_metric([str(project_id), str(label)], float(count))
        yield examples
        yield revision


def _per_label(stats: Any) -> dict:
    if not isinstance(stats, dict):
        return {}
    for key in ("examples_per_label", "labels", "per_label"):
        value = stats.get(key)
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if isinstance(v, (int, float))}
    return {}
