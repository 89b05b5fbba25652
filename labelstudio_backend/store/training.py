"""Training jobs and each project's active fine-tuned checkpoint, in MODEL_DIR/training.sqlite3.

    store = TrainingStore(settings.model_dir / "training.sqlite3")
    job_id = store.create_job(project_id, reason="START_TRAINING")
    store.update_job(job_id, state="running", step=10, steps=300)     # only while the job is queued or running
    store.set_active(project_id, ActiveModel(...)); store.active(project_id)

Every worker process (and the training child process) reads and writes the same file, so all of them serve
the same checkpoint and see the same job states. A file of its own (not a table of the reference store), so that
its schema never has to move in step with the reference store's migrations.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from labelstudio_backend.labelstudio.payload import utc_now
from labelstudio_backend.store.schema import Database

OPEN_STATES = ("queued", "running")
STATES = ("queued", "running", "done", "rejected", "failed", "cancelled")
_JOB_FIELDS = ("state", "step", "steps", "message", "figures", "worker_pid", "child_pid", "annotated")


@dataclass(frozen=True)
class ActiveModel:
    """A project's served fine-tuned checkpoint: a delta file against the base checkpoint `base_digest`."""

    project_id: int
    path: str
    checkpoint_id: str     # names the weights in cache keys and model_version
    base_digest: str
    score_threshold: float
    job_id: int
    activated_at: str = ""


def training_db(model_dir: Path) -> Path:
    """The training store's file in MODEL_DIR."""
    return Path(model_dir) / "training.sqlite3"


def _create_tables(db: sqlite3.Connection) -> None:
    # IF NOT EXISTS: files written before the training store had schema versions hold these tables at version 0
    db.execute("""CREATE TABLE IF NOT EXISTS jobs (
        job_id INTEGER PRIMARY KEY AUTOINCREMENT, project_id INTEGER NOT NULL, reason TEXT NOT NULL,
        state TEXT NOT NULL, step INTEGER NOT NULL DEFAULT 0, steps INTEGER NOT NULL DEFAULT 0,
        message TEXT NOT NULL DEFAULT '', figures TEXT NOT NULL DEFAULT '{}', worker_pid INTEGER,
        child_pid INTEGER, created_at TEXT NOT NULL, updated_at TEXT NOT NULL)""")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_by_project ON jobs (project_id, job_id)")
    db.execute("""CREATE TABLE IF NOT EXISTS active_models (
        project_id INTEGER PRIMARY KEY, path TEXT NOT NULL, checkpoint_id TEXT NOT NULL,
        base_digest TEXT NOT NULL, score_threshold REAL NOT NULL, job_id INTEGER NOT NULL,
        activated_at TEXT NOT NULL)""")


def _create_annotation_counts(db: sqlite3.Connection) -> None:
    # TRAIN_EVERY_ANNOTATIONS: the new annotations of each project since its last automatic start, shared by
    # every worker process and kept across restarts
    db.execute("""CREATE TABLE IF NOT EXISTS annotation_counts (
        project_id INTEGER PRIMARY KEY, new_annotations INTEGER NOT NULL)""")


def _create_start_requests(db: sqlite3.Connection) -> None:
    # Label Studio's START_TRAINING events of a project with "train on submission" on, coalesced: how many came
    # since the last job started, when the last came and the project's annotated tasks it named; and per job the
    # annotated tasks of the project when it was started (0: not known)
    db.execute("""CREATE TABLE IF NOT EXISTS start_requests (
        project_id INTEGER PRIMARY KEY, pending INTEGER NOT NULL, last_request REAL NOT NULL,
        annotated INTEGER NOT NULL)""")
    db.execute("ALTER TABLE jobs ADD COLUMN annotated INTEGER NOT NULL DEFAULT 0")


# TRAINING_MIGRATIONS[v] upgrades a training store file at user_version v to v + 1.
TRAINING_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: _create_tables,
                                                                        1: _create_annotation_counts,
                                                                        2: _create_start_requests}


class TrainingStore(Database):
    """The jobs, active_models and annotation_counts tables of MODEL_DIR/training.sqlite3 (connections and
    transactions: Database)."""

    migrations = TRAINING_MIGRATIONS
    row_factory = sqlite3.Row

    # --- jobs

    def create_job(self, project_id: int, reason: str, steps: int = 0, annotated: int = 0) -> int:
        """A queued job; annotated: the project's annotated tasks when it was started (0: not known). Any
        coalesced START_TRAINING requests of the project are answered by it (their count is reset)."""
        now = utc_now()
        with self.transaction() as db:
            cursor = db.execute("INSERT INTO jobs (project_id, reason, state, steps, worker_pid, created_at, "
                                "updated_at, annotated) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                                (int(project_id), reason, int(steps), os.getpid(), now, now, int(annotated)))
            db.execute("UPDATE start_requests SET pending = 0 WHERE project_id = ?", (int(project_id),))
            return int(cursor.lastrowid or 0)  # set by every INSERT

    def update_job(self, job_id: int, only_open: bool = True, **fields: Any) -> bool:
        """Set fields of a job; with only_open (the default) only while it is queued or running, so that a job
        cancelled meanwhile stays cancelled. Returns whether the job was updated."""
        unknown = set(fields) - set(_JOB_FIELDS)
        if unknown or fields.get("state", "queued") not in STATES:
            raise ValueError(f"cannot set {sorted(unknown) or fields.get('state')} on a training job")
        if "figures" in fields:
            fields["figures"] = json.dumps(fields["figures"])
        names = ", ".join(f"{k} = ?" for k in fields)
        condition = " AND state IN ('queued', 'running')" if only_open else ""
        with self.transaction() as db:
            cursor = db.execute(f"UPDATE jobs SET {names}, updated_at = ? WHERE job_id = ?{condition}",
                                (*fields.values(), utc_now(), int(job_id)))
            return cursor.rowcount > 0

    def job(self, job_id: int) -> dict | None:
        row = self.connection().execute("SELECT * FROM jobs WHERE job_id = ?", (int(job_id),)).fetchone()
        return _job(row)

    def latest_job(self, project_id: int) -> dict | None:
        row = self.connection().execute("SELECT * FROM jobs WHERE project_id = ? ORDER BY job_id DESC LIMIT 1",
                                        (int(project_id),)).fetchone()
        return _job(row)

    def open_jobs(self, project_id: int | None = None) -> list[dict]:
        """Queued and running jobs (of one project, or all), oldest first."""
        query = "SELECT * FROM jobs WHERE state IN ('queued', 'running')"
        args: tuple = ()
        if project_id is not None:
            query, args = query + " AND project_id = ?", (int(project_id),)
        rows = self.connection().execute(query + " ORDER BY job_id", args).fetchall()
        return [job for job in map(_job, rows) if job is not None]

    def projects(self) -> list[int]:
        return [int(r[0]) for r in self.connection().execute(
            "SELECT project_id FROM jobs UNION SELECT project_id FROM active_models ORDER BY 1")]

    def fail_orphans(self) -> list[int]:
        """Mark failed the open jobs whose worker process is gone (a restart cut them off); returns their ids."""
        orphans = [job["job_id"] for job in self.open_jobs() if not _alive(job["worker_pid"])]
        for job_id in orphans:
            self.update_job(job_id, state="failed", message="cut off by a restart of the backend; the active "
                                                            "checkpoint is unchanged: start the training again")
        return orphans

    def count_annotations(self, project_id: int, count: int, every: int) -> bool:
        """Add `count` new annotations to the project's count; when that reaches `every`, reset it and return True.
        One transaction: of the workers counting at once, exactly one sees the threshold crossed."""
        with self.transaction() as db:
            db.execute("INSERT INTO annotation_counts (project_id, new_annotations) VALUES (?, ?) ON CONFLICT "
                       "(project_id) DO UPDATE SET new_annotations = new_annotations + excluded.new_annotations",
                       (int(project_id), int(count)))
            total = db.execute("SELECT new_annotations FROM annotation_counts WHERE project_id = ?",
                               (int(project_id),)).fetchone()[0]
            due = total >= every
            if due:
                db.execute("UPDATE annotation_counts SET new_annotations = 0 WHERE project_id = ?", (int(project_id),))
        return due

    def add_start_request(self, project_id: int, annotated: int, now: float) -> int:
        """Count a coalesced START_TRAINING request (at epoch time `now`, naming `annotated` tasks); returns how
        many are pending since the project's last job started."""
        with self.transaction() as db:
            db.execute("INSERT INTO start_requests (project_id, pending, last_request, annotated) VALUES (?, 1, ?, ?) "
                       "ON CONFLICT (project_id) DO UPDATE SET pending = pending + 1, last_request = excluded."
                       "last_request, annotated = max(annotated, excluded.annotated)",
                       (int(project_id), float(now), int(annotated)))
            return int(db.execute("SELECT pending FROM start_requests WHERE project_id = ?",
                                  (int(project_id),)).fetchone()[0])

    def start_requests(self, project_id: int) -> dict | None:
        """{"pending", "last_request", "annotated"} of the project's coalesced START_TRAINING requests, or None."""
        row = self.connection().execute("SELECT pending, last_request, annotated FROM start_requests "
                                        "WHERE project_id = ?", (int(project_id),)).fetchone()
        return dict(row) if row is not None else None

    def claim_quiet_start(self, project_id: int, quiet_before: float) -> int | None:
        """When START_TRAINING requests are pending, the last came before `quiet_before` (epoch) and no job of the
        project is open: claim them (reset; of the workers asking at once exactly one succeeds) and return the
        annotated tasks they named. Otherwise None."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM jobs WHERE project_id = ? AND state IN ('queued', 'running')",
                          (int(project_id),)).fetchone():
                return None
            row = db.execute("SELECT annotated FROM start_requests WHERE project_id = ? AND pending > 0 AND "
                             "last_request <= ?", (int(project_id), float(quiet_before))).fetchone()
            if row is None:
                return None
            db.execute("UPDATE start_requests SET pending = 0 WHERE project_id = ?", (int(project_id),))
            return int(row[0])

    # --- active checkpoints

    def set_active(self, model: ActiveModel) -> None:
        values = asdict(model)
        values["activated_at"] = values["activated_at"] or utc_now()
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO active_models (project_id, path, checkpoint_id, base_digest, "
                       "score_threshold, job_id, activated_at) VALUES (:project_id, :path, :checkpoint_id, "
                       ":base_digest, :score_threshold, :job_id, :activated_at)", values)

    def active(self, project_id: int) -> ActiveModel | None:
        row = self.connection().execute("SELECT * FROM active_models WHERE project_id = ?",
                                        (int(project_id),)).fetchone()
        return ActiveModel(**dict(row)) if row is not None else None

    def clear_active(self, project_id: int) -> ActiveModel | None:
        """Serve the base model to the project again; returns what was active."""
        previous = self.active(project_id)
        with self.transaction() as db:
            db.execute("DELETE FROM active_models WHERE project_id = ?", (int(project_id),))
        return previous

    def delete_project(self, project_id: int) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM active_models WHERE project_id = ?", (int(project_id),))
            db.execute("DELETE FROM jobs WHERE project_id = ?", (int(project_id),))
            db.execute("DELETE FROM annotation_counts WHERE project_id = ?", (int(project_id),))
            db.execute("DELETE FROM start_requests WHERE project_id = ?", (int(project_id),))


def _job(row: sqlite3.Row | None) -> dict | None:
    if row is None:
        return None
    job = dict(row)
    job["figures"] = json.loads(job["figures"] or "{}")
    return job


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
