"""Label Studio's webhook events: kept in the store before /webhook answers 200, then applied in order by the
webhooks queue, so that no event is lost to a crash, a restart or a slow store.

    inbox = WebhookInbox(runtime)
    inbox.receive("ANNOTATION_CREATED", payload)   # checks the payload, keeps it, schedules the drain
    inbox.drain()                                  # the webhooks queue's job: apply every kept event, oldest first

- One process at a time drains (a file lock in MODEL_DIR), so gunicorn workers never apply events out of order.
- An event is deleted only after it was applied. One applied but not yet deleted when the process died is applied
  again after the restart, which changes nothing: upserts and deletions are idempotent, and the events after it
  were not applied yet.
- An event whose application fails stops the drain (a deletion must not overtake its creation) and is tried again
  after RETRY_PAUSE_S; one that failed MAX_ATTEMPTS times, or whose payload cannot be applied (a ValueError), is
  dropped with an error in the log (the next sync repairs what it would have done).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from labelstudio_backend.errors import BackendError
from labelstudio_backend.labelstudio.label_config import LabelConfigError, parse_label_config
from labelstudio_backend.labelstudio.payload import annotation_task_pairs, parse_project_id
from labelstudio_backend.runtime.kept_work import drain_kept
from labelstudio_backend.runtime.runtime import Runtime
from labelstudio_backend.runtime.work_queues import QueueClosed, QueueFull
from labelstudio_backend.store.work import StoredEvent

logger = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")
KEPT_EVENTS = (*ANNOTATION_EVENTS, "ANNOTATIONS_DELETED", "TASKS_DELETED", "START_TRAINING", "PROJECT_DELETED",
               "PROJECT_UPDATED")
MAX_ATTEMPTS = 5
RETRY_PAUSE_S = 5.0


class WebhookInbox:
    """Receives events into the store and applies them (cheap to make: the state is the store and the queue)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.lock_path = runtime.settings.model_dir / "webhooks.lock"

    def receive(self, event: str, data: dict) -> dict:
        """Keep the event (BackendError for a payload that cannot be applied: refused, never kept)."""
        if event not in KEPT_EVENTS:
            return {"status": "ignored", "event": event}
        project_id = parse_project_id(data.get("project"))
        counted = _check(event, data)
        training = {}
        if event == "START_TRAINING" and self.runtime.training is not None:  # the job (or why none) now: its id
            training = self.runtime.training.request(project_id, _config(self.runtime, project_id, data),  # for LS
                                                     self.runtime.projects.settings_for(project_id), data.get("project"))
        event_id = self.runtime.store.add_event(project_id, event, data)
        self.runtime.known_projects.add(project_id)
        self.schedule()
        return {"status": "queued", "event": event, "id": event_id, **counted, **training}

    def schedule(self) -> None:
        """Make sure a drain is pending (one is enough: it applies every kept event). Not queued (a queue shut
        down), the events stay kept and the next drain or start applies them."""
        self.runtime.try_submit("webhooks", "drain", self.drain)

    def drain(self) -> int:
        """Apply every kept event, oldest first; returns how many were applied."""
        store = self.runtime.store
        return drain_kept(self.lock_path, lambda: store.next_events(limit=100), self._apply_events,
                          retry=self.schedule, retry_after_s=RETRY_PAUSE_S)

    def _apply_events(self, events: Sequence[StoredEvent]) -> tuple[int, bool]:
        """Apply events in order: (applied, whether to stop and retry later: an event failed for a reason that
        may pass, and the events after it must not overtake it)."""
        store, applied = self.runtime.store, 0
        for event in events:
            try:
                self.apply(event)
            except ValueError as error:  # the payload itself is bad: trying again cannot help
                logger.error("webhook event %s (%s, project %s) dropped: %s", event.id, event.event,
                             event.project_id, error)
            except Exception as error:  # the store is busy, a disk is full: tried again
                attempts = store.event_failed(event.id, f"{type(error).__name__}: {error}")
                if attempts < MAX_ATTEMPTS:
                    logger.warning("webhook event %s (%s, project %s) failed (attempt %d), retried in %.0f s: %s",
                                   event.id, event.event, event.project_id, attempts, RETRY_PAUSE_S, error)
                    return applied, True
                logger.error("webhook event %s (%s, project %s) dropped after %d attempts: %s; the next sync "
                             "repairs the references", event.id, event.event, event.project_id, attempts, error)
            store.finish_event(event.id)
            applied += 1
        return applied, False

    def apply(self, stored: StoredEvent) -> None:
        """What an event changes: the store, the project records; follow-up work goes to its queue."""
        runtime, pid, event, data = self.runtime, stored.project_id, stored.event, stored.payload
        if event in ANNOTATION_EVENTS:
            image_key = _image_key(runtime.projects.load(pid).get("label_config")
                                   or (data.get("project") or {}).get("label_config"))
            pairs = annotation_task_pairs(data)
            for task, annotation in pairs:
                runtime.store.upsert_annotation(pid, task, annotation, image_key=image_key)
            runtime.on_references_changed(pid)  # embed the new examples before a prediction needs them
            settings = runtime.projects.settings_for(pid)
            if runtime.training is not None and settings.train_every_annotations:  # TRAIN_EVERY_ANNOTATIONS
                runtime.training.count_annotations(pid, len(pairs), _config(runtime, pid, data), settings)
        elif event == "ANNOTATIONS_DELETED":
            runtime.store.delete_annotations(pid, _ids(data.get("annotations")))
        elif event == "TASKS_DELETED":  # their annotations go with them
            runtime.store.delete_tasks(pid, _ids(data.get("tasks")))
        elif event == "START_TRAINING":
            try:
                runtime.ensure_synced(pid, force=True)
            except (QueueFull, QueueClosed) as error:  # a sync of the project or of others waits already
                logger.warning("project %s: START_TRAINING: no sync queued now: %s", pid, error)
            # the fine-tuning job itself was started (or coalesced) when the event came in: receive()
        elif event == "PROJECT_DELETED":
            runtime.store.delete_project(pid)
            if runtime.training is not None:  # its running job stops
                runtime.training.cancel(pid, "the project was deleted")
            if runtime.project_models is not None:  # its fine-tuned checkpoints go with it
                runtime.project_models.delete_project(pid)
            runtime.forget_project(pid)
        elif event == "PROJECT_UPDATED":
            config = (data.get("project") or {}).get("label_config")
            if config:  # keep the newest config for calls that arrive without one
                record = runtime.projects.load(pid)
                runtime.projects.save(pid, record.get("extra_params"), config)


def _check(event: str, data: dict) -> dict[str, int]:
    """What the event carries ({"annotations": n} or {"tasks": n}); BackendError when it cannot be applied."""
    if event in ANNOTATION_EVENTS:
        return {"annotations": len(annotation_task_pairs(data))}
    if event == "ANNOTATIONS_DELETED":
        return {"annotations": len(_ids(data.get("annotations")))}
    if event == "TASKS_DELETED":
        return {"tasks": len(_ids(data.get("tasks")))}
    return {}


def _config(runtime: Runtime, project_id: int, data: dict) -> str | None:
    """The project's labeling config: the one /setup stored, else the one the payload carries."""
    project = data.get("project")
    return runtime.projects.load(project_id).get("label_config") or \
        (project.get("label_config") if isinstance(project, dict) else None)


def _ids(items: Any) -> list[int]:
    if not isinstance(items, list):
        raise BackendError("the webhook payload's list of ids is missing")
    try:
        return [int(item["id"] if isinstance(item, dict) else item) for item in items]
    except (KeyError, TypeError, ValueError):
        raise BackendError("the webhook payload names an item without an integer id") from None


def _image_key(label_config: str | None) -> str | None:
    if not label_config:
        return None
    try:
        return parse_label_config(label_config).value_key
    except LabelConfigError:
        return None
