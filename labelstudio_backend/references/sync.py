"""Incremental sync of a project's annotations from the Label Studio API into the reference store.

Webhooks keep the store current while the backend runs; the sync catches up on what happened while it
was down or while a webhook was lost. It reads ``GET /api/projects/<id>/tasks/`` (Label Studio 1.23:
a plain JSON list per page, tasks newest ``updated_at`` first, each with its annotations; 404 past the
last page). Saving or deleting an annotation touches its task's ``updated_at``, so an incremental sync
reads pages only until the tasks are older than the watermark of the previous sync (the newest task
``updated_at`` it saw, on Label Studio's clock, less a safety margin). A full sync (first use, or asked
for) reads every page and also drops tasks that no longer exist.

Endpoints that would make Label Studio call the ML backend back are avoided: ``/api/tasks/?fields=all``
and ``/api/tasks/<id>/`` retrieve predictions for unpredicted tasks when the project asks for automatic
predictions. The export endpoint with ``ids[]`` checks tasks a full sync did not see (they may have moved
between pages while it read them).

Deletions happen only on confirmed answers: a project is dropped after two 404s a moment apart, a task after the
export (a JSON list) does not hold it. An answer of the wrong shape (HTML, an object instead of a list, a task
without its annotations list) raises LabelStudioError before the store changes, as does Label Studio down.

The API calls and their authentication are labelstudio_client.LabelStudioClient's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from labelstudio_backend.errors import LabelStudioError
from labelstudio_backend.fetching.labelstudio_client import LabelStudioClient
from labelstudio_backend.store import ReferenceStore, normalize_timestamp

logger = logging.getLogger(__name__)

# Saves committed while a sync ran may carry a timestamp just before its watermark.
WATERMARK_MARGIN = timedelta(minutes=2)
CONFIRM_PAUSE_S = 1.0  # a project answered 404 is asked again after this pause before its data is deleted


@dataclass
class SyncReport:
    """What one sync changed in the store."""

    project_id: int
    full: bool
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    tasks_seen: int = 0
    pages: int = 0
    project_deleted: bool = False
    watermark: str | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def image_key_from_project(project: dict) -> str | None:
    """The task data key of the config's only Image tag (None with zero or several)."""
    parsed = project.get("parsed_label_config") or {}
    keys = {
        entry.get("value")
        for control in parsed.values()
        if isinstance(control, dict)
        for entry in control.get("inputs") or []
        if isinstance(entry, dict) and str(entry.get("type", "")).lower() == "image" and entry.get("value")
    }
    return keys.pop() if len(keys) == 1 else None


def _check_tasks(tasks: list, what: str) -> None:
    """Every task of an answer has an integer id and a list of annotations; otherwise the whole answer is an
    error that changes nothing (a task read without its annotations would lose them all)."""
    for task in tasks:
        if not (isinstance(task, dict) and isinstance(task.get("id"), int)
                and isinstance(task.get("annotations"), list)):
            raise LabelStudioError(f"unexpected task in {what} (no id or no annotations list): {str(task)[:200]}")


def _apply_task(store: ReferenceStore, project_id: int, task: dict, known: dict[int, tuple[int, str]],
                report: SyncReport, image_key: str | None, full: bool = False) -> None:
    """Bring one task's annotations in the store to what Label Studio has. A full sync is authoritative: the
    stored version is replaced even when its timestamp is equal or later (a forged or future one)."""
    task_id = int(task["id"])
    present: set[int] = set()
    for annotation in task.get("annotations") or []:
        if not isinstance(annotation, dict) or "id" not in annotation:
            continue
        annotation_id = int(annotation["id"])
        stored = known.get(annotation_id)
        if annotation.get("was_cancelled"):
            if stored is not None:
                report.removed += store.delete_annotations(project_id, [annotation_id])
            continue
        present.add(annotation_id)
        stamp = normalize_timestamp(annotation.get("updated_at") or annotation.get("created_at"))
        if stored is not None and stored[1] == stamp and not full:
            report.unchanged += 1
            continue
        try:
            outcome = store.upsert_annotation(project_id, task, annotation, image_key=image_key, authoritative=full)
        except ValueError as exc:  # one malformed annotation must not stop the sync
            report.errors.append(f"task {task_id} annotation {annotation_id}: {exc}")
            logger.warning("sync project %s: skipped annotation %s: %s", project_id, annotation_id, exc)
            continue
        if outcome == "added":
            report.added += 1
        elif outcome == "updated":
            report.updated += 1
        elif outcome == "removed":
            report.removed += 1
        else:
            report.unchanged += 1
    gone = [a for a, (t, _) in known.items() if t == task_id and a not in present]
    if gone:
        report.removed += store.delete_annotations(project_id, gone)


def sync_project(
    store: ReferenceStore,
    base_url: str,
    api_key: str,
    project_id: int,
    full: bool | None = None,
    page_size: int = 100,
    client: LabelStudioClient | None = None,
) -> SyncReport:
    """Bring the store's copy of the project's annotations up to date with Label Studio.

    Args:
        full: read every task (and drop tasks that no longer exist); None = full on the first sync of the
            project, incremental (tasks updated since the last sync) afterwards.
        page_size: tasks per API page.
        client: reuse a client (tests, or one session for many calls); built from base_url/api_key otherwise.

    Raises labelstudio_backend.errors.LabelStudioError when Label Studio is unreachable or refuses the token.
    """
    started = time.monotonic()
    began_at = datetime.now(UTC)
    project_id = int(project_id)
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    client = client or LabelStudioClient(base_url, api_key)
    client.check_configured()
    previous = store.sync_watermark(project_id)
    full = previous is None if full is None else full
    report = SyncReport(project_id=project_id, full=full)

    project = client.project(project_id)
    if project is None:  # a 404: asked again before anything is deleted (a proxy may misroute one request)
        time.sleep(CONFIRM_PAUSE_S)
        project = client.project(project_id)
    if project is None:  # deleted in Label Studio (no webhook tells a backend about that)
        store.delete_project(project_id)
        report.project_deleted = True
        report.seconds = time.monotonic() - started
        logger.info("sync project %s: the project no longer exists in Label Studio; its data was removed", project_id)
        return report
    image_key = image_key_from_project(project)

    cutoff = None
    if not full and previous is not None:
        cutoff = normalize_timestamp(datetime.fromisoformat(previous) - WATERMARK_MARGIN)
    known = store.annotation_versions(project_id)
    seen_tasks: set[int] = set()
    newest = previous
    page = 1
    while True:
        tasks = client.task_page(project_id, page, page_size)
        if not tasks:
            break
        report.pages += 1
        _check_tasks(tasks, f"page {page} of the task list of project {project_id}")
        older_than_cutoff = False
        for task in tasks:
            stamp = normalize_timestamp(task.get("updated_at"))
            if cutoff is not None and stamp is not None and stamp < cutoff:
                older_than_cutoff = True  # newest first: everything after this is older still
                break
            if int(task["id"]) in seen_tasks:
                continue  # a task moved to a later page while we read
            seen_tasks.add(int(task["id"]))
            report.tasks_seen += 1
            if stamp is not None and (newest is None or stamp > newest):
                newest = stamp
            _apply_task(store, project_id, task, known, report, image_key, full)
        if older_than_cutoff:  # (no short-page test: Label Studio may cap page_size, TASK_API_PAGE_SIZE_MAX)
            break
        page += 1

    if full:
        # Tasks with stored annotations that no page showed: deleted, or moved between pages while we read.
        unseen = sorted({t for t, _ in known.values()} - seen_tasks)
        for start in range(0, len(unseen), 200):
            chunk = unseen[start : start + 200]
            exported = client.export_tasks(project_id, chunk)
            _check_tasks(exported, f"the export of project {project_id}")
            existing = {int(t["id"]): t for t in exported}
            for task_id in chunk:
                if task_id in existing:
                    _apply_task(store, project_id, existing[task_id], known, report, image_key, full)
                else:
                    report.removed += store.delete_tasks(project_id, [task_id])

    report.watermark = newest
    store.set_last_sync(project_id, began_at, watermark=newest)
    report.seconds = time.monotonic() - started
    logger.info(
        "sync project %s (%s): %d added, %d updated, %d removed, %d tasks read in %.2f s",
        project_id, "full" if full else "incremental", report.added, report.updated, report.removed,
        report.tasks_seen, report.seconds,
    )
    return report


def make_syncer(settings: Any, store: ReferenceStore | None = None) -> Callable[..., SyncReport]:
    """The callable the server runs in the background: syncer(project_id, full=None) -> SyncReport.

    settings needs label_studio_url, label_studio_api_key and db_path (labelstudio_backend.settings.Settings).
    The store opens lazily, in the worker that first syncs (never before gunicorn forks).
    """
    client = LabelStudioClient.from_settings(settings)
    lock = threading.Lock()
    opened: list[ReferenceStore] = [store] if store is not None else []

    def syncer(project_id: int, full: bool | None = None) -> SyncReport:
        with lock:  # one sync at a time per process: they share the client's session
            if not opened:
                opened.append(ReferenceStore(settings.db_path))
            return sync_project(opened[0], client.base_url, client.api_key, project_id, full=full, client=client)

    return syncer
