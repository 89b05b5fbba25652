"""Reference store: the project's annotated regions (the in-context examples) and a prompt-embedding cache.

One SQLite file under MODEL_DIR, shared by every gunicorn worker and thread:

- WAL journal and a busy timeout, so readers never block the writer and concurrent writers wait their turn;
- every write runs in one ``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two writers
  never deadlock upgrading a read lock);
- one connection per (process, thread), opened lazily, so a store created before gunicorn forks stays usable;
- the schema is versioned with ``PRAGMA user_version``; ``_MIGRATIONS[v]`` brings a file from version v to
  v + 1 and runs inside the same transaction as the version bump.

Each region of a non-cancelled annotation becomes one row per label it carries. A region is the group of
result items sharing an ``id``: the geometry item (brush, rectangle, polygon, ellipse, keypoint, with or
without the ``labels`` suffix) plus the labels found on any item of the group (separate Labels tags).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

SCHEMA_VERSION = 2

# Region types that carry a shape usable as a prompt (the "...labels" variants are reduced to these).
GEOMETRY_TYPES = frozenset({"brush", "rectangle", "polygon", "ellipse", "keypoint", "bitmask"})

# Keys under which Label Studio keeps a task's image when the region's to_name does not match a data key.
_IMAGE_KEY_FALLBACKS = ("image", "img", "url", "image_url")
_URL_PREFIXES = ("http://", "https://", "/data/", "s3://", "gs://", "azure-blob://", "data:image/")

UpsertOutcome = Literal["added", "updated", "removed", "unchanged"]


class StoreError(ValueError):
    """Bad input to the reference store (malformed annotation or task JSON, incompatible database)."""


@dataclass(frozen=True)
class Example:
    """One labelled region of one annotation: an in-context example for its label."""

    annotation_id: int
    task_id: int
    region_id: str
    label: str
    region: dict  # the Label Studio result item of the region's geometry, as stored
    image_url: str  # as in the task data (/data/upload/..., http(s)://, s3://, ...)
    original_size: tuple[int, int] | None  # (original_width, original_height), Label Studio's order
    updated_at: str  # annotation's updated_at, normalised to UTC "YYYY-MM-DDTHH:MM:SS.ffffffZ"
    completed_by: int | None = None
    ground_truth: bool = False
    from_name: str = ""
    region_type: str = ""  # geometry type without the "labels" suffix: brush, rectangle, ...

    @property
    def original_width(self) -> int | None:
        return None if self.original_size is None else self.original_size[0]

    @property
    def original_height(self) -> int | None:
        return None if self.original_size is None else self.original_size[1]

    def embedding_key(self, checkpoint_id: str) -> str:
        """Cache key of this region's prompt embedding: changes with the annotation and with the weights."""
        return f"a{self.annotation_id}/r{self.region_id}/{self.updated_at}/{checkpoint_id}"


@dataclass(frozen=True)
class _Row:
    region_index: int
    region_id: str
    label: str
    from_name: str
    region_type: str
    region_json: str
    image_url: str
    original_width: int | None
    original_height: int | None
    task_id: int
    completed_by: int | None
    ground_truth: int
    updated_at: str


# ----------------------------------------------------------------------------------------------- migrations


def _migrate_0_to_1(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE projects (
               project_id INTEGER PRIMARY KEY,
               revision INTEGER NOT NULL DEFAULT 0,
               last_sync TEXT
           )"""
    )
    db.execute(
        """CREATE TABLE examples (
               project_id INTEGER NOT NULL,
               annotation_id INTEGER NOT NULL,
               region_index INTEGER NOT NULL,
               region_id TEXT NOT NULL,
               label TEXT NOT NULL,
               from_name TEXT NOT NULL,
               region_type TEXT NOT NULL,
               region_json TEXT NOT NULL,
               image_url TEXT NOT NULL,
               original_width INTEGER,
               original_height INTEGER,
               task_id INTEGER NOT NULL,
               completed_by INTEGER,
               ground_truth INTEGER NOT NULL,
               updated_at TEXT NOT NULL,
               PRIMARY KEY (project_id, annotation_id, region_index, label)
           )"""
    )
    db.execute("CREATE INDEX examples_by_label ON examples (project_id, label, updated_at DESC)")
    db.execute("CREATE INDEX examples_by_task ON examples (project_id, task_id)")


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    # Version 2 adds the prompt-embedding cache and the sync watermark (the newest task updated_at seen by
    # the last sync, on Label Studio's clock, so that an incremental sync never depends on ours).
    db.execute("ALTER TABLE projects ADD COLUMN sync_watermark TEXT")
    db.execute(
        """CREATE TABLE embeddings (
               key TEXT PRIMARY KEY,
               project_id INTEGER,
               annotation_id INTEGER,
               dtype TEXT NOT NULL,
               shape TEXT NOT NULL,
               data BLOB NOT NULL,
               nbytes INTEGER NOT NULL,
               last_used INTEGER NOT NULL
           )"""
    )
    db.execute("CREATE INDEX embeddings_by_use ON embeddings (last_used)")
    db.execute("CREATE INDEX embeddings_by_project ON embeddings (project_id)")
    db.execute("CREATE INDEX embeddings_by_annotation ON embeddings (annotation_id)")


# _MIGRATIONS[v] upgrades a database at user_version v to v + 1.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: _migrate_0_to_1, 1: _migrate_1_to_2}
assert sorted(_MIGRATIONS) == list(range(SCHEMA_VERSION))


# ------------------------------------------------------------------------------------------ JSON parsing


def normalize_timestamp(value: Any) -> str | None:
    """Label Studio timestamp (ISO 8601, any offset, or a datetime) -> UTC 'YYYY-MM-DDTHH:MM:SS.ffffffZ'.

    One fixed format so that timestamps compare correctly as strings in SQL.
    """
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError as exc:
            raise StoreError(f"timestamp {value!r} is not ISO 8601 (expected e.g. 2024-05-01T12:00:00.000000Z)") from exc
    else:
        raise StoreError(f"timestamp must be an ISO 8601 string, got {type(value).__name__}")
    if moment.tzinfo is None:  # Label Studio writes UTC; a naive value is taken as UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise StoreError(f"{what} must be an integer id, got {value!r}")
    try:
        return int(value)
    except ValueError as exc:
        raise StoreError(f"{what} must be an integer id, got {value!r}") from exc


def _user_id(completed_by: Any) -> int | None:
    # The annotation API gives an id; exports and some webhook payloads give the user object.
    if completed_by is None:
        return None
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("id")
        if completed_by is None:
            return None
    return _as_int(completed_by, "annotation.completed_by")


def _labels_of(item: dict) -> list[str]:
    value = item.get("value")
    if not isinstance(value, dict):
        return []
    labels: list[str] = []
    for key, entry in value.items():
        if key.endswith("labels") and isinstance(entry, list):
            labels.extend(str(label) for label in entry if isinstance(label, (str, int, float)))
    return labels


def _geometry_type(item: dict) -> str | None:
    kind = str(item.get("type", "")).lower()
    base = kind[: -len("labels")] if kind.endswith("labels") else kind
    return base if base in GEOMETRY_TYPES else None


def find_image_url(task_data: dict, to_name: str | None = None, image_key: str | None = None) -> str | None:
    """The task's image reference: data[image_key], else data[to_name], else a usual key, else the only URL."""
    for key in (image_key, to_name, *_IMAGE_KEY_FALLBACKS):
        if key and isinstance(task_data.get(key), str) and task_data[key]:
            return task_data[key]
    urls = [v for v in task_data.values() if isinstance(v, str) and v.startswith(_URL_PREFIXES)]
    return urls[0] if len(urls) == 1 else None


def annotation_rows(task: dict, annotation: dict, image_key: str | None = None) -> list[_Row]:
    """The example rows of one annotation (empty for a cancelled one or one without labelled geometry)."""
    if not isinstance(annotation, dict):
        raise StoreError(f"annotation must be a JSON object, got {type(annotation).__name__}")
    if not isinstance(task, dict):
        raise StoreError(f"task must be a JSON object, got {type(task).__name__}")
    if annotation.get("was_cancelled"):
        return []
    task_id = task.get("id", annotation.get("task"))
    if task_id is None:
        raise StoreError("task has no 'id' (and the annotation no 'task'): cannot tell which task it labels")
    task_id = _as_int(task_id, "task.id")
    data = task.get("data")
    if not isinstance(data, dict):
        raise StoreError(f"task {task_id} has no 'data' object: the image URL is read from task.data")
    result = annotation.get("result") or []
    if not isinstance(result, list):
        raise StoreError(f"annotation {annotation.get('id')}: 'result' must be a list of regions")
    updated_at = normalize_timestamp(annotation.get("updated_at") or annotation.get("created_at"))
    if updated_at is None:
        updated_at = normalize_timestamp(datetime.now(timezone.utc))
    completed_by = _user_id(annotation.get("completed_by"))
    ground_truth = int(bool(annotation.get("ground_truth")))

    # Group the items by region id: labels may sit on a separate item (a Labels tag next to a Brush tag).
    groups: dict[str, list[dict]] = {}
    for index, item in enumerate(result):
        if not isinstance(item, dict):
            raise StoreError(f"annotation {annotation.get('id')}: result[{index}] must be a JSON object")
        if item.get("type") == "relation":
            continue
        region_id = str(item.get("id") or f"item{index}")
        groups.setdefault(region_id, []).append(item)

    rows: list[_Row] = []
    for region_index, (region_id, items) in enumerate(groups.items()):
        geometry = next((item for item in items if _geometry_type(item)), None)
        if geometry is None:
            continue
        labels = list(dict.fromkeys(label for item in items for label in _labels_of(item)))
        image_url = find_image_url(data, geometry.get("to_name"), image_key)
        if image_url is None:
            raise StoreError(
                f"task {task_id}: cannot tell which task.data key holds the image (keys: {sorted(data)}); "
                "name the Image tag's value after the key or pass image_key"
            )
        width, height = geometry.get("original_width"), geometry.get("original_height")
        for label in labels:
            rows.append(
                _Row(
                    region_index=region_index,
                    region_id=region_id,
                    label=label,
                    from_name=str(geometry.get("from_name", "")),
                    region_type=_geometry_type(geometry) or "",
                    region_json=json.dumps(geometry, sort_keys=True, separators=(",", ":")),
                    image_url=image_url,
                    original_width=int(width) if width is not None else None,
                    original_height=int(height) if height is not None else None,
                    task_id=task_id,
                    completed_by=completed_by,
                    ground_truth=ground_truth,
                    updated_at=updated_at,
                )
            )
    return rows


# ------------------------------------------------------------------------------------------------ store

_ROW_COLUMNS = (
    "region_index, region_id, label, from_name, region_type, region_json, image_url, original_width, "
    "original_height, task_id, completed_by, ground_truth, updated_at"
)


class ReferenceStore:
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
        self.db_path = Path(db_path)
        self.busy_timeout_s = float(busy_timeout_s)
        self.max_embedding_rows = int(max_embedding_rows)
        self.max_embedding_bytes = int(max_embedding_bytes)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._migrate()

    # -- connections and transactions

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():  # never reuse a connection across fork
            db = sqlite3.connect(self.db_path, timeout=self.busy_timeout_s, isolation_level=None)
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.db_path}: SQLite refused WAL mode ({mode}); use a local filesystem")
            db.execute("PRAGMA synchronous = NORMAL")  # durable at each checkpoint; safe with WAL
            self._local.db, self._local.pid = db, os.getpid()
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def _migrate(self) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.db_path} has schema version {version}, newer than this backend's {SCHEMA_VERSION}: "
                    "upgrade the backend or point MODEL_DIR at another folder"
                )
            for step in range(version, SCHEMA_VERSION):
                _MIGRATIONS[step](db)
            if version != SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        return self._connection().execute("PRAGMA user_version").fetchone()[0]

    # -- annotations

    @staticmethod
    def _bump(db: sqlite3.Connection, project_id: int) -> None:
        db.execute(
            "INSERT INTO projects (project_id, revision) VALUES (?, 1) "
            "ON CONFLICT (project_id) DO UPDATE SET revision = revision + 1",
            (project_id,),
        )

    def upsert_annotation(
        self, project_id: int, task: dict, annotation: dict, image_key: str | None = None
    ) -> UpsertOutcome:
        """Replace the rows of this annotation by its current regions (none if it was cancelled).

        The revision moves only when the rows change, so a repeated webhook or sync is free; a version
        older than the stored one (by updated_at) is ignored. Returns what happened: "added", "updated", "removed" (cancelled or emptied) or "unchanged".
        """
        project_id = _as_int(project_id, "project_id")
        if not isinstance(annotation, dict) or "id" not in annotation:
            raise StoreError("annotation must be a JSON object with an 'id'")
        annotation_id = _as_int(annotation["id"], "annotation.id")
        new_rows = annotation_rows(task, annotation, image_key)
        incoming = normalize_timestamp(annotation.get("updated_at") or annotation.get("created_at"))
        with self._write() as db:
            old_rows = [
                _Row(*row)
                for row in db.execute(
                    f"SELECT {_ROW_COLUMNS} FROM examples WHERE project_id = ? AND annotation_id = ? "
                    "ORDER BY region_index, label",
                    (project_id, annotation_id),
                )
            ]
            if sorted(old_rows, key=_row_order) == sorted(new_rows, key=_row_order):
                return "unchanged"
            # A sync page read before a webhook must not undo the webhook's newer version.
            if old_rows and incoming is not None and incoming < old_rows[0].updated_at:
                return "unchanged"
            db.execute(
                "DELETE FROM examples WHERE project_id = ? AND annotation_id = ?", (project_id, annotation_id)
            )
            db.executemany(
                f"INSERT INTO examples (project_id, annotation_id, {_ROW_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(project_id, annotation_id, *_row_values(row)) for row in new_rows],
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
        project_id = _as_int(project_id, "project_id")
        ids = [_as_int(a, "annotation id") for a in annotation_ids]
        if not ids:
            return 0
        with self._write() as db:
            found = 0
            for chunk in _chunks(ids, 500):
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
        project_id = _as_int(project_id, "project_id")
        tasks = [_as_int(t, "task id") for t in task_ids]
        annotation_ids: list[int] = []
        db = self._connection()
        for chunk in _chunks(tasks, 500):
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
        """Forget the project: its examples, its cached embeddings, its revision and sync state."""
        project_id = _as_int(project_id, "project_id")
        with self._write() as db:
            db.execute(
                "DELETE FROM embeddings WHERE project_id = ? OR annotation_id IN "
                "(SELECT DISTINCT annotation_id FROM examples WHERE project_id = ?)",
                (project_id, project_id),
            )
            db.execute("DELETE FROM examples WHERE project_id = ?", (project_id,))
            db.execute("DELETE FROM projects WHERE project_id = ?", (project_id,))

    def revision(self, project_id: int) -> int:
        """A number that grows with every change to the project's examples (0 before the first)."""
        row = self._connection().execute(
            "SELECT revision FROM projects WHERE project_id = ?", (_as_int(project_id, "project_id"),)
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
        project_id = _as_int(project_id, "project_id")
        if per_label < 1:
            raise ValueError(f"per_label must be at least 1, got {per_label}")
        where, params = ["project_id = ?"], [project_id]
        if labels is not None:
            labels = list(labels)
            if not labels:
                return []
            where.append(f"label IN ({','.join('?' * len(labels))})")
            params += labels
        if exclude_task_id is not None:
            where.append("task_id != ?")
            params.append(_as_int(exclude_task_id, "exclude_task_id"))
        if ground_truth_only:
            where.append("ground_truth = 1")
        if annotators is not None:
            annotators = [_as_int(a, "annotator id") for a in annotators]
            if not annotators:
                return []
            where.append(f"completed_by IN ({','.join('?' * len(annotators))})")
            params += annotators
        query = f"""
            SELECT annotation_id, {_ROW_COLUMNS} FROM (
                SELECT *, ROW_NUMBER() OVER (
                    PARTITION BY label ORDER BY updated_at DESC, annotation_id DESC, region_index
                ) AS rank
                FROM examples WHERE {' AND '.join(where)}
            ) WHERE rank <= ? ORDER BY label, rank"""
        rows = self._connection().execute(query, (*params, int(per_label))).fetchall()
        found = [_example(row[0], _Row(*row[1:])) for row in rows]
        if labels is not None:
            order = {label: i for i, label in enumerate(dict.fromkeys(labels))}
            found.sort(key=lambda e: order[e.label])  # stable: recency order kept within a label
        return found

    def annotation_versions(self, project_id: int) -> dict[int, tuple[int, str]]:
        """annotation id -> (task id, normalised updated_at) of every annotation with rows."""
        rows = self._connection().execute(
            "SELECT annotation_id, MIN(task_id), MAX(updated_at) FROM examples WHERE project_id = ? "
            "GROUP BY annotation_id",
            (_as_int(project_id, "project_id"),),
        )
        return {int(a): (int(t), str(u)) for a, t, u in rows}

    # -- sync bookkeeping

    def set_last_sync(self, project_id: int, when: datetime | str, watermark: str | None = None) -> None:
        """Record a finished sync: when it ran and (optionally) the newest task updated_at it saw."""
        project_id = _as_int(project_id, "project_id")
        stamp = normalize_timestamp(when)
        mark = normalize_timestamp(watermark)
        with self._write() as db:
            db.execute(
                "INSERT INTO projects (project_id, revision, last_sync, sync_watermark) VALUES (?, 0, ?, ?) "
                "ON CONFLICT (project_id) DO UPDATE SET last_sync = excluded.last_sync, "
                "sync_watermark = COALESCE(excluded.sync_watermark, sync_watermark)",
                (project_id, stamp, mark),
            )

    def last_sync(self, project_id: int) -> str | None:
        row = self._connection().execute(
            "SELECT last_sync FROM projects WHERE project_id = ?", (_as_int(project_id, "project_id"),)
        ).fetchone()
        return row[0] if row else None

    def sync_watermark(self, project_id: int) -> str | None:
        row = self._connection().execute(
            "SELECT sync_watermark FROM projects WHERE project_id = ?", (_as_int(project_id, "project_id"),)
        ).fetchone()
        return row[0] if row else None

    def stats(self, project_id: int) -> dict:
        """What /references shows: examples per label, counts, revision, last sync."""
        project_id = _as_int(project_id, "project_id")
        db = self._connection()
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
        rows = self._connection().execute(
            "SELECT project_id FROM projects UNION SELECT DISTINCT project_id FROM examples ORDER BY 1"
        )
        return [int(r[0]) for r in rows]

    # -- embedding cache

    def get_embedding(self, key: str) -> np.ndarray | None:
        """The cached vector for this key (and mark it used), or None."""
        with self._write() as db:
            row = db.execute("SELECT dtype, shape, data FROM embeddings WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE embeddings SET last_used = (SELECT COALESCE(MAX(last_used), 0) + 1 FROM embeddings) "
                "WHERE key = ?",
                (key,),
            )
        dtype, shape, data = row
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(json.loads(shape)).copy()

    def put_embedding(
        self, key: str, vec: np.ndarray, project_id: int | None = None, annotation_id: int | None = None
    ) -> None:
        """Cache a vector; evicts the least recently used rows beyond the row and byte bounds.

        Give project_id / annotation_id so that deleting the project or the annotation drops the vector too.
        """
        if not isinstance(key, str) or not key:
            raise StoreError("embedding key must be a non-empty string")
        array = np.ascontiguousarray(np.asarray(vec))
        if array.dtype.kind not in "fiu" or array.size == 0:
            raise StoreError(f"embedding must be a non-empty numeric array, got dtype {array.dtype} size {array.size}")
        data = array.tobytes()
        if len(data) > self.max_embedding_bytes:
            raise StoreError(
                f"embedding of {len(data)} bytes exceeds the cache bound of {self.max_embedding_bytes} bytes"
            )
        project = None if project_id is None else _as_int(project_id, "project_id")
        annotation = None if annotation_id is None else _as_int(annotation_id, "annotation_id")
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO embeddings (key, project_id, annotation_id, dtype, shape, data, nbytes, "
                "last_used) VALUES (?, ?, ?, ?, ?, ?, ?, (SELECT COALESCE(MAX(last_used), 0) + 1 FROM embeddings))",
                (key, project, annotation, array.dtype.str, json.dumps(list(array.shape)), data, len(data)),
            )
            count, total = db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM embeddings").fetchone()
            if count > self.max_embedding_rows or total > self.max_embedding_bytes:
                self._evict(db, count, total)

    def _evict(self, db: sqlite3.Connection, count: int, total: int) -> None:
        doomed = []
        for key, nbytes in db.execute("SELECT key, nbytes FROM embeddings ORDER BY last_used"):
            if count <= self.max_embedding_rows and total <= self.max_embedding_bytes:
                break
            doomed.append((key,))
            count, total = count - 1, total - nbytes
        db.executemany("DELETE FROM embeddings WHERE key = ?", doomed)

    def embedding_stats(self) -> dict:
        count, total = self._connection().execute(
            "SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM embeddings"
        ).fetchone()
        return {"rows": int(count), "bytes": int(total), "max_rows": self.max_embedding_rows,
                "max_bytes": self.max_embedding_bytes}


def _row_order(row: _Row) -> tuple:
    return (row.region_index, row.label)


def _row_values(row: _Row) -> tuple:
    return (
        row.region_index, row.region_id, row.label, row.from_name, row.region_type, row.region_json,
        row.image_url, row.original_width, row.original_height, row.task_id, row.completed_by, row.ground_truth,
        row.updated_at,
    )


def _example(annotation_id: int, row: _Row) -> Example:
    size = None
    if row.original_width is not None and row.original_height is not None:
        size = (int(row.original_width), int(row.original_height))
    return Example(
        annotation_id=int(annotation_id),
        task_id=int(row.task_id),
        region_id=row.region_id,
        label=row.label,
        region=json.loads(row.region_json),
        image_url=row.image_url,
        original_size=size,
        updated_at=row.updated_at,
        completed_by=row.completed_by,
        ground_truth=bool(row.ground_truth),
        from_name=row.from_name,
        region_type=row.region_type,
    )


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
