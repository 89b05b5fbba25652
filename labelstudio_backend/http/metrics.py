"""/metrics: Prometheus metrics in a registry of the app's own (several apps can live in one process).

Counters and histograms are updated by the request plumbing and the runtime's hooks; the state of the work queues,
the references and the training jobs is read at scrape time by `ScrapedGauges`, the one way this backend builds a
collector: a function that returns the gauges, each a GaugeMetricFamily filled from the runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from labelstudio_backend.runtime.runtime import Runtime
from labelstudio_backend.store.training import STATES

logger = logging.getLogger(__name__)


class ScrapedGauges(Collector):
    """Gauges computed when Prometheus scrapes: `read()` returns them filled. A failure is logged and yields
    nothing (a scrape never fails because of one part)."""

    def __init__(self, name: str, read: Callable[[], list[GaugeMetricFamily]]):
        self.name, self.read = name, read

    def describe(self) -> list[Any]:
        return []  # computed at scrape time: nothing to declare ahead

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            gauges = self.read()
        except Exception:
            logger.debug("no %s metrics", self.name, exc_info=True)
            return
        yield from gauges


class Metrics:
    """The app's metrics; `registry` is what /metrics serves."""

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
        r.register(ScrapedGauges("reference", lambda: reference_gauges(runtime)))
        r.register(ScrapedGauges("queue", lambda: queue_gauges(runtime)))
        r.register(ScrapedGauges("training", lambda: training_gauges(runtime)))


def queue_gauges(runtime: Runtime) -> list[GaugeMetricFamily]:
    """Jobs waiting, running and refused per work queue."""
    pending = GaugeMetricFamily("dinov_queue_pending", "Jobs waiting per work queue", labels=["queue"])
    running = GaugeMetricFamily("dinov_queue_running", "Jobs running per work queue", labels=["queue"])
    rejected = GaugeMetricFamily("dinov_queue_rejected", "Jobs refused by a full queue", labels=["queue"])
    for name, stats in runtime.queues.stats().items():
        pending.add_metric([name], float(stats["pending"]))
        running.add_metric([name], float(stats["running"]))
        rejected.add_metric([name], float(stats["rejected"]))
    return [pending, running, rejected]


def reference_gauges(runtime: Runtime) -> list[GaugeMetricFamily]:
    """In-context examples per project and label, and each project's reference revision, from the store."""
    examples = GaugeMetricFamily("dinov_references", "In-context examples per project and label",
                                 labels=["project", "label"])
    revision = GaugeMetricFamily("dinov_reference_revision", "Reference revision per project", labels=["project"])
    for project_id in sorted(runtime.known_projects):
        try:
            stats = runtime.store.stats(project_id)
            revision.add_metric([str(project_id)], float(runtime.store.revision(project_id)))
        except Exception:  # one project's stats never fail the scrape
            logger.debug("no reference stats for project %s", project_id, exc_info=True)
            continue
        for label, count in per_label(stats).items():
            examples.add_metric([str(project_id), str(label)], float(count))
    return [examples, revision]


def training_gauges(runtime: Runtime) -> list[GaugeMetricFamily]:
    """The state, progress and validation mIoU of each project's latest training job."""
    state = GaugeMetricFamily("dinov_training_state", "1 for the state of the project's latest training job",
                              labels=["project", "state"])
    progress = GaugeMetricFamily("dinov_training_progress", "Steps done / steps of the running job",
                                 labels=["project"])
    miou = GaugeMetricFamily("dinov_training_miou", "Validation mIoU of the latest finished job",
                             labels=["project", "model"])
    training = runtime.training
    for project_id in training.store.projects() if training is not None else ():
        job = training.store.latest_job(project_id) if training is not None else None
        if job is None:
            continue
        for name in STATES:
            state.add_metric([str(project_id), name], 1.0 if job["state"] == name else 0.0)
        if job["steps"]:
            progress.add_metric([str(project_id)], job["step"] / job["steps"])
        for model in ("before", "after"):
            if model in job["figures"]:
                miou.add_metric([str(project_id), model], float(job["figures"][model]["miou"]))
    return [state, progress, miou]


def per_label(stats: Any) -> dict:
    """Examples per label from the store's stats of a project ({} when it has none)."""
    if not isinstance(stats, dict):
        return {}
    for key in ("examples_per_label", "labels", "per_label"):
        value = stats.get(key)
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if isinstance(v, (int, float))}
    return {}
