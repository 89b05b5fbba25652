"""Work that must survive a crash or a restart, in the store's SQLite file: webhook events from their receipt until
they are applied, and the tasks a /predict deferred to the background until their prediction is posted.

    store.add_event(project_id, "ANNOTATION_CREATED", payload)   # before /webhook answers 200
    for event in store.next_events(): ...; store.finish_event(event.id)
    store.defer_tasks(project_id, model_version, label_config, tasks)
    store.claimed_task_ids(project_id, model_version)            # pending, or posted in the last CLAIM_TTL_S
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

from labelstudio_backend.store.schema import Database, StoreError, chunks

CLAIM_TTL_S = 600.0        # a posted task stays claimed this long (longer than Label Studio's 100 s timeout)
MAX_TASK_ATTEMPTS = 3      # a background task that failed this often is given up (a rerun asks again)


class InboxFull(StoreError):
    """The webhook inbox holds its maximum of unapplied events (answered 503 with Retry-After)."""

    retry_after = 30


@dataclass(frozen=True)
class StoredEvent:
    id: int
    project_id: int
    event: str
    payload: dict
    attempts: int


@dataclass(frozen=True)
class DeferredTask:
    project_id: int
    model_version: str
    task: dict
    label_config: str | None
    attempts: int

    @property
    def task_id(self) -> int:
        return int(self.task["id"])


class WorkStore(Database):
    """The webhook_events and background_tasks tables of a Database."""

    max_pending_events: int = 100_000

    # --- webhook events

    def add_event(self, project_id: int, event: str, payload: dict) -> int:
        """Keep an event until it is applied; its id (events are applied in id order)."""
        text = json.dumps(payload, separators=(",", ":"))
        with self.transaction() as db:
            pending = db.execute("SELECT COUNT(*) FROM webhook_events").fetchone()[0]
            if pending >= self.max_pending_events:
                raise InboxFull(f"{pending} webhook events wait to be applied")
            cursor = db.execute(
                "INSERT INTO webhook_events (project_id, event, payload, received_at) VALUES (?, ?, ?, ?)",
                (int(project_id), str(event), text, time.time()),
            )
            return int(cursor.lastrowid or 0)  # set by every INSERT

    def next_events(self, limit: int = 100) -> list[StoredEvent]:
        rows = self.connection().execute(
            "SELECT id, project_id, event, payload, attempts FROM webhook_events ORDER BY id LIMIT ?", (int(limit),)
        ).fetchall()
        return [StoredEvent(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]

    def finish_event(self, event_id: int) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM webhook_events WHERE id = ?", (int(event_id),))

    def event_failed(self, event_id: int, error: str) -> int:
        """Count a failed attempt; returns the attempts so far."""
        with self.transaction() as db:
            db.execute("UPDATE webhook_events SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                       (error[:1000], int(event_id)))
            row = db.execute("SELECT attempts FROM webhook_events WHERE id = ?", (int(event_id),)).fetchone()
        return int(row[0]) if row else 0

    def pending_event_count(self) -> int:
        return int(self.connection().execute("SELECT COUNT(*) FROM webhook_events").fetchone()[0])

    # --- background predictions

    def defer_tasks(self, project_id: int, model_version: str, label_config: str | None, tasks: Sequence[dict]) -> int:
        """Keep tasks for background prediction; returns how many were new (a task already kept stays as it is)."""
        now = time.time()
        added = 0
        with self.transaction() as db:
            for task in tasks:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO background_tasks (project_id, model_version, task_id, task, label_config, "
                    "state, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                    (int(project_id), model_version, int(task["id"]), json.dumps(task), label_config, now),
                )
                added += cursor.rowcount
        return added

    def claimed_task_ids(self, project_id: int, model_version: str) -> frozenset[int]:
        """Tasks waiting for their background prediction, or whose prediction was posted in the last CLAIM_TTL_S."""
        rows = self.connection().execute(
            "SELECT task_id FROM background_tasks WHERE project_id = ? AND model_version = ? "
            "AND (state = 'pending' OR updated_at > ?)",
            (int(project_id), model_version, time.time() - CLAIM_TTL_S),
        ).fetchall()
        return frozenset(r[0] for r in rows)

    def pending_tasks(self, limit: int = 64) -> list[DeferredTask]:
        """The oldest pending tasks of the oldest (project, model_version) that has any."""
        db = self.connection()
        first = db.execute(
            "SELECT project_id, model_version FROM background_tasks WHERE state = 'pending' "
            "ORDER BY updated_at, task_id LIMIT 1"
        ).fetchone()
        if first is None:
            return []
        rows = db.execute(
            "SELECT task, label_config, attempts FROM background_tasks WHERE state = 'pending' AND project_id = ? "
            "AND model_version = ? ORDER BY task_id LIMIT ?",
            (*first, int(limit)),
        ).fetchall()
        return [DeferredTask(first[0], first[1], json.loads(r[0]), r[1], r[2]) for r in rows]

    def tasks_posted(self, project_id: int, model_version: str, task_ids: Sequence[int]) -> None:
        """Posted (or found already there): kept CLAIM_TTL_S as a claim, then pruned."""
        with self.transaction() as db:
            for chunk in chunks([int(t) for t in task_ids], 500):
                db.execute(
                    f"UPDATE background_tasks SET state = 'posted', updated_at = ? WHERE project_id = ? "
                    f"AND model_version = ? AND task_id IN ({','.join('?' * len(chunk))})",
                    (time.time(), int(project_id), model_version, *chunk),
                )

    def tasks_failed(self, project_id: int, model_version: str, task_ids: Sequence[int]) -> None:
        """One more failed attempt (Label Studio down); a task that failed MAX_TASK_ATTEMPTS times is dropped (the
        next "Retrieve predictions" asks again)."""
        with self.transaction() as db:
            for chunk in chunks([int(t) for t in task_ids], 500):
                marks = ",".join("?" * len(chunk))
                db.execute(
                    f"UPDATE background_tasks SET attempts = attempts + 1 WHERE project_id = ? AND model_version = ? "
                    f"AND task_id IN ({marks})",
                    (int(project_id), model_version, *chunk),
                )
                db.execute(
                    f"DELETE FROM background_tasks WHERE project_id = ? AND model_version = ? AND attempts >= ? "
                    f"AND task_id IN ({marks})",
                    (int(project_id), model_version, MAX_TASK_ATTEMPTS, *chunk),
                )

    def drop_tasks(self, project_id: int, model_version: str, task_ids: Sequence[int]) -> None:
        """Give up tasks that cannot be predicted (a broken image): the next "Retrieve predictions" asks again."""
        with self.transaction() as db:
            for chunk in chunks([int(t) for t in task_ids], 500):
                db.execute(
                    f"DELETE FROM background_tasks WHERE project_id = ? AND model_version = ? "
                    f"AND task_id IN ({','.join('?' * len(chunk))})",
                    (int(project_id), model_version, *chunk),
                )

    def prune_posted(self) -> int:
        """Forget posted tasks whose claim expired."""
        with self.transaction() as db:
            return db.execute("DELETE FROM background_tasks WHERE state = 'posted' AND updated_at <= ?",
                              (time.time() - CLAIM_TTL_S,)).rowcount

    def background_counts(self) -> dict[str, int]:
        rows = self.connection().execute("SELECT state, COUNT(*) FROM background_tasks GROUP BY state").fetchall()
        return {"pending": 0, "posted": 0, **{state: int(n) for state, n in rows}}

    @staticmethod
    def forget_project_work(db: sqlite3.Connection, project_id: int) -> None:
        """Inside a project deletion's transaction: its kept events and background tasks go too."""
        db.execute("DELETE FROM webhook_events WHERE project_id = ?", (int(project_id),))
        db.execute("DELETE FROM background_tasks WHERE project_id = ?", (int(project_id),))
