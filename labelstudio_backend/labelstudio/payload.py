"""Small helpers over Label Studio's JSON payloads and the backend's own records.

Every function here is pure (no I/O except the two JSON file helpers) and used by several layers.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labelstudio_backend.errors import BackendError

MAX_ID = 2**63 - 1  # SQLite's INTEGER and Label Studio's bigint ids: nothing larger is an id


def ascii_id(value: Any) -> int | None:
    """An id as an int: a non-negative int, or a string of ASCII digits 0-9 (no sign, no other script's digits),
    at most MAX_ID; None for anything else (a bool, a float, '٣', 2**63)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 19:
            return None
        number = int(text)
    else:
        return None
    return number if 0 <= number <= MAX_ID else None


def parse_project_id(project: Any) -> int:
    """Label Studio's project reference -> its id.

    Label Studio names a project '<id>.<created unix time>' in /setup and /predict; webhooks give
    {'id': <id>}. Raises BackendError for anything else (ASCII digits only, at most MAX_ID).
    """
    if isinstance(project, dict):
        project = project.get("id")
    text = project if isinstance(project, int) and not isinstance(project, bool) else \
        str(project if project is not None else "").split(".", 1)[0].strip()
    number = ascii_id(text)
    if number is None:
        raise BackendError(f"project {str(project)[:40]!r} is not a Label Studio project id ('<id>' or "
                           f"'<id>.<created>', ASCII digits, at most {MAX_ID})")
    return number


def task_id_of(value: Any) -> int | None:
    """A task id as an int, or None when the value is missing or not an id (e.g. folder-mode tasks, or out of
    range: see ascii_id)."""
    return ascii_id(value)


def annotation_task_pairs(data: dict) -> list[tuple[dict, dict]]:
    """(task, annotation) pairs of an ANNOTATION(S)_CREATED / ANNOTATION_UPDATED webhook payload.

    A single event has {"annotation": {...}, "task": {...}}; the bulk event has lists of both. An
    annotation is paired with the task it names, or with the only task of the payload.
    Raises BackendError for a payload without annotations or with an annotation whose task is missing.
    """
    annotations, tasks = data.get("annotation"), data.get("task")
    if isinstance(annotations, dict):
        annotations, tasks = [annotations], [tasks]
    if not isinstance(annotations, list) or not annotations:
        raise BackendError("the webhook payload has no 'annotation'")
    tasks_by_id = {t.get("id"): t for t in (tasks or []) if isinstance(t, dict)}
    pairs = []
    for annotation in annotations:
        if not isinstance(annotation, dict):
            raise BackendError("an annotation in the webhook payload is not an object")
        task = tasks_by_id.get(annotation.get("task"))
        if task is None and len(tasks_by_id) == 1:
            task = next(iter(tasks_by_id.values()))
        if task is None:
            raise BackendError(f"the webhook payload has no task for annotation {annotation.get('id')}")
        pairs.append((task, annotation))
    return pairs


def utc_now() -> str:
    """The current time as ISO 8601 UTC to the second, e.g. '2024-05-01T12:00:00+00:00'."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json(path: Path, record: dict) -> None:
    """Write `record` to `path` atomically, so that another worker never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """The JSON object at `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def task_key(task: dict) -> Any:
    """What identifies a task in a job's output: its image URL in folder mode, else its Label Studio id."""
    return task["key"] if "key" in task else task.get("id")
