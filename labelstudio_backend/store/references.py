"""ReferenceStore: per-project in-context examples (the annotated regions) and the prompt-embedding cache, in one
SQLite file under MODEL_DIR, shared by every gunicorn worker and thread (see schema.py for the concurrency rules,
examples.py for how an annotation becomes rows, embeddings.py for the cache).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

from labelstudio_backend.store.embeddings import EmbeddingCache
from labelstudio_backend.store.examples import (
    ROW_COLUMNS,
    Example,
    Row,
    annotation_rows,
    as_id,
    clamp_future,
    example_from_row,
    normalize_timestamp,
    row_order,
    row_values,
)
from labelstudio_backend.store.schema import StoreError, chunks
from labelstudio_backend.store.work import WorkStore

UpsertOutcome = Literal["added", "updated", "removed", "unchanged"]


class ReferenceStore(EmbeddingCache, WorkStore):
    """Per-project in-context examples and the prompt-embedding cache, in one SQLite file.

    Args:
        db_path: the SQLite file (created with its folder if missing), e.g. MODEL_DIR / "references.sqlite3".
        busy_timeout_s: how long a writer waits for another process's write lock before failing.
        max_embedding_rows / max_embedding_bytes: the embedding cache keeps at most this many rows / bytes of
            vectors, evicting the least recently used first.
    """

    def __init__(
        self,
        db_path: Path | str,
        busy_timeout_s: float = 30.0,
        max_embedding_rows: int = 100_000,
        max_embedding_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        if max_embedding_rows < 1 or max_embedding_bytes < 1:
            raise ValueError("max_embedding_rows and max_embedding_bytes must be positive")
        self.max_embedding_rows = int(max_embedding_rows)
        self.max_embedding_bytes = int(max_embedding_bytes)
        super().__init__(db_path, busy_timeout_s)

    # -- annotations

    @staticmethod
    def _bump(db: sqlite3.Connection, project_id: int) -> None:
        db.execute(
            "INSERT INTO projects (project_id, revision) VALUES (?, 1) "
            "ON CONFLICT (project_id) DO UPDATE SET revision = revision + 1",
            (project_id,),
        )

    def upsert_annotation(
        self, project_id: int, task: dict, annotation: dict, image_key: str | None = None,
        authoritative: bool = False,
    ) -> UpsertOutcome:
        """Replace the rows of this annotation by its current regions (none if it was cancelled).

        The revision moves only when the rows change, so a repeated webhook or sync is free; a version
        older than the stored one (by updated_at) is ignored, unless `authoritative` (a full sync: what Label
        Studio holds now wins). A timestamp from the future (beyond FUTURE_SKEW_S) is taken as now. Returns what
        happened: "added", "updated", "removed" (cancelled or emptied) or "unchanged".
        """
        project_id = as_id(project_id, "project_id")
        if not isinstance(annotation, dict) or "id" not in annotation:
            raise StoreError("annotation must be a JSON object with an 'id'")
        annotation = clamp_future(annotation)
        annotation_id = as_id(annotation["id"], "annotation.id")
        new_rows = annotation_rows(task, annotation, image_key)
        incoming = normalize_timestamp(annotation.get("updated_at") or annotation.get("created_at"))
        with self.transaction() as db:
            old_rows = [
                Row(*row)
                for row in db.execute(
                    f"SELECT {ROW_COLUMNS} FROM examples WHERE project_id = ? AND annotation_id = ? "
                    "ORDER BY region_index, label",
                    (project_id, annotation_id),
                )
            ]
            if sorted(old_rows, key=row_order) == sorted(new_rows, key=row_order):
                return "unchanged"
            # A sync page read before a webhook must not undo the webhook's newer version.
            if not authoritative and old_rows and incoming is not None and incoming < old_rows[0].updated_at:
                return "unchanged"
            db.execute(
                "DELETE FROM examples WHERE project_id = ? AND annotation_id = ?", (project_id, annotation_id)
            )
            db.executemany(
                f"INSERT INTO examples (project_id, annotation_id, {ROW_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(project_id, annotation_id, *row_values(row)) for row in new_rows],
            )
            # Embeddings of the annotation's previous version are never asked for again.
            if old_rows and (not new_rows or old_rows[0].updated_at != new_rows[0].updated_at):
                db.execute("DELETE FROM embeddings WHERE annotation_id = ?", (annotation_id,))
            self._bump(db, project_id)
        if not old_rows:
            return "added"
        return "updated" if new_rows else "removed"

    def delete_annotations(self, project_id: int, annotation_ids: Sequence[int]) -> int:
        """Remove these annotations' rows and cached embeddings; returns how many annotations had rows."""
        project_id = as_id(project_id, "project_id")
        ids = [as_id(a, "annotation id") for a in annotation_ids]
        if not ids:
            return 0
        with self.transaction() as db:
            found = 0
            for chunk in chunks(ids, 500):
                marks = ",".join("?" * len(chunk))
                found += db.execute(
                    f"SELECT COUNT(DISTINCT annotation_id) FROM examples "
                    f"WHERE project_id = ? AND annotation_id IN ({marks})",
                    (project_id, *chunk),
                ).fetchone()[0]
                db.execute(
                    f"DELETE FROM examples WHERE project_id = ? AND annotation_id IN ({marks})", (project_id, *chunk)
                )
                db.execute(f"DELETE FROM embeddings WHERE annotation_id IN ({marks})", chunk)
            if found:
                self._bump(db, project_id)
        return found

    def delete_tasks(self, project_id: int, task_ids: Sequence[int]) -> int:
        """Remove every annotation of these tasks (TASKS_DELETED); returns how many annotations had rows."""
        project_id = as_id(project_id, "project_id")
        tasks = [as_id(t, "task id") for t in task_ids]
        annotation_ids: list[int] = []
        db = self.connection()
        for chunk in chunks(tasks, 500):
            marks = ",".join("?" * len(chunk))
            annotation_ids += [
                row[0]
                for row in db.execute(
                    f"SELECT DISTINCT annotation_id FROM examples WHERE project_id = ? AND task_id IN ({marks})",
                    (project_id, *chunk),
                )
            ]
        return self.delete_annotations(project_id, annotation_ids)

    def delete_project(self, project_id: int) -> None:
        """Forget the project: its examples, its cached embeddings, its revision and sync state, its kept work."""
        project_id = as_id(project_id, "project_id")
        with self.transaction() as db:
            db.execute(
                "DELETE FROM embeddings WHERE project_id = ? OR annotation_id IN "
                "(SELECT DISTINCT annotation_id FROM examples WHERE project_id = ?)",
                (project_id, project_id),
            )
            db.execute("DELETE FROM examples WHERE project_id = ?", (project_id,))
            db.execute("DELETE FROM projects WHERE project_id = ?", (project_id,))
            self.forget_project_work(db, project_id)

    def revision(self, project_id: int) -> int:
        """A number that grows with every change to the project's examples (0 before the first)."""
        row = self.connection().execute(
            "SELECT revision FROM projects WHERE project_id = ?", (as_id(project_id, "project_id"),)
        ).fetchone()
        return int(row[0]) if row else 0

    def examples(
        self,
        project_id: int,
        labels: Sequence[str] | None = None,
        per_label: int = 16,
        exclude_task_id: int | None = None,
        ground_truth_only: bool = False,
        annotators: Sequence[int] | None = None,
    ) -> list[Example]:
        """At most per_label examples of each label, most recently updated annotation first.

        Grouped by label (in the order of ``labels`` when given, else alphabetical); within an annotation,
        regions keep their drawing order. ``exclude_task_id`` leaves out a task's own annotations (so a task
        is never predicted from itself); ``annotators`` keeps only annotations completed by these user ids.
        """
        project_id = as_id(project_id, "project_id")
        if per_label < 1:
            raise ValueError(f"per_label must be at least 1, got {per_label}")
        where: list[str] = ["project_id = ?"]
        params: list[int | str] = [project_id]
        if labels is not None:
            labels = list(labels)
            if not labels:
                return []
            where.append(f"label IN ({','.join('?' * len(labels))})")
            params += labels
        if exclude_task_id is not None:
            where.append("task_id != ?")
            params.append(as_id(exclude_task_id, "exclude_task_id"))
        if ground_truth_only:
            where.append("ground_truth = 1")
        if annotators is not None:
            annotators = [as_id(a, "annotator id") for a in annotators]
            if not annotators:
                return []
            where.append(f"completed_by IN ({','.join('?' * len(annotators))})")
            params += annotators
        query = f"""
            SELECT annotation_id, {ROW_COLUMNS} FROM (
                SELECT *, ROW_NUMBER() OVER (
                    PARTITION BY label ORDER BY updated_at DESC, annotation_id DESC, region_index
                ) AS rank
                FROM examples WHERE {' AND '.join(where)}
            ) WHERE rank <= ? ORDER BY label, rank"""
        rows = self.connection().execute(query, (*params, int(per_label))).fetchall()
        found = [example_from_row(row[0], Row(*row[1:])) for row in rows]
        if labels is not None:
            order = {label: i for i, label in enumerate(dict.fromkeys(labels))}
            found.sort(key=lambda e: order[e.label])  # stable: recency order kept within a label
        return found

    def annotation_versions(self, project_id: int) -> dict[int, tuple[int, str]]:
        """annotation id -> (task id, normalised updated_at) of every annotation with rows."""
        rows = self.connection().execute(
            "SELECT annotation_id, MIN(task_id), MAX(updated_at) FROM examples WHERE project_id = ? "
            "GROUP BY annotation_id",
            (as_id(project_id, "project_id"),),
        )
        return {int(a): (int(t), str(u)) for a, t, u in rows}

    # -- sync bookkeeping

    def set_last_sync(self, project_id: int, when: datetime | str, watermark: str | None = None) -> None:
        """Record a finished sync: when it ran and (optionally) the newest task updated_at it saw."""
        project_id = as_id(project_id, "project_id")
        stamp = normalize_timestamp(when)
        mark = normalize_timestamp(watermark)
        with self.transaction() as db:
            db.execute(
                "INSERT INTO projects (project_id, revision, last_sync, sync_watermark) VALUES (?, 0, ?, ?) "
                "ON CONFLICT (project_id) DO UPDATE SET last_sync = excluded.last_sync, "
                "sync_watermark = COALESCE(excluded.sync_watermark, sync_watermark)",
                (project_id, stamp, mark),
            )

    def last_sync(self, project_id: int) -> str | None:
        row = self.connection().execute(
            "SELECT last_sync FROM projects WHERE project_id = ?", (as_id(project_id, "project_id"),)
        ).fetchone()
        return row[0] if row else None

    def sync_watermark(self, project_id: int) -> str | None:
        row = self.connection().execute(
            "SELECT sync_watermark FROM projects WHERE project_id = ?", (as_id(project_id, "project_id"),)
        ).fetchone()
        return row[0] if row else None

    def stats(self, project_id: int) -> dict:
        """What /references shows: examples per label, counts, revision, last sync."""
        project_id = as_id(project_id, "project_id")
        db = self.connection()
        per_label = {
            label: count
            for label, count in db.execute(
                "SELECT label, COUNT(*) FROM examples WHERE project_id = ? GROUP BY label ORDER BY label",
                (project_id,),
            )
        }
        annotations, tasks = db.execute(
            "SELECT COUNT(DISTINCT annotation_id), COUNT(DISTINCT task_id) FROM examples WHERE project_id = ?",
            (project_id,),
        ).fetchone()
        row = db.execute(
            "SELECT revision, last_sync FROM projects WHERE project_id = ?", (project_id,)
        ).fetchone()
        return {
            "project": project_id,
            "examples_per_label": per_label,
            "examples": sum(per_label.values()),
            "annotations": int(annotations),
            "tasks": int(tasks),
            "revision": int(row[0]) if row else 0,
            "last_sync": row[1] if row else None,
        }

    def project_ids(self) -> list[int]:
        rows = self.connection().execute(
            "SELECT project_id FROM projects UNION SELECT DISTINCT project_id FROM examples ORDER BY 1"
        )
        return [int(r[0]) for r in rows]

    # -- embedding cache
