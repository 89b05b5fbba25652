"""The SQLite files of the stores: the reference store's schema and migrations, and Database, the connections,
transactions and schema versioning of any store's file (the training store, store/training.py, has a file and
migrations of its own).

- WAL journal and a busy timeout, so readers never block the writer and concurrent writers wait their turn;
- every write runs in one ``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two writers
  never deadlock upgrading a read lock);
- one connection per (process, thread), opened lazily, so a store created before gunicorn forks stays usable;
- the schema is versioned with ``PRAGMA user_version``; ``migrations[v]`` (the reference store's: ``MIGRATIONS``)
  brings a file from version v to v + 1 and runs inside the same transaction as the version bump.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA_VERSION = 3


class StoreError(ValueError):
    """Bad input to the reference store (malformed annotation or task JSON, incompatible database)."""


def migrate_0_to_1(db: sqlite3.Connection) -> None:
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


def migrate_1_to_2(db: sqlite3.Connection) -> None:
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


def migrate_2_to_3(db: sqlite3.Connection) -> None:
    # Version 3 keeps work that must survive a crash or a restart (store/work.py): webhook events from their
    # receipt until they are applied, and the tasks a /predict deferred until their prediction is posted.
    db.execute(
        """CREATE TABLE webhook_events (
               id INTEGER PRIMARY KEY AUTOINCREMENT,
               project_id INTEGER NOT NULL,
               event TEXT NOT NULL,
               payload TEXT NOT NULL,
               received_at REAL NOT NULL,
               attempts INTEGER NOT NULL DEFAULT 0,
               last_error TEXT
           )"""
    )
    db.execute(
        """CREATE TABLE background_tasks (
               project_id INTEGER NOT NULL,
               model_version TEXT NOT NULL,
               task_id INTEGER NOT NULL,
               task TEXT NOT NULL,
               label_config TEXT,
               state TEXT NOT NULL,
               attempts INTEGER NOT NULL DEFAULT 0,
               updated_at REAL NOT NULL,
               PRIMARY KEY (project_id, model_version, task_id)
           )"""
    )
    db.execute("CREATE INDEX background_by_state ON background_tasks (state, updated_at)")


# MIGRATIONS[v] upgrades a database at user_version v to v + 1.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: migrate_0_to_1, 1: migrate_1_to_2,
                                                               2: migrate_2_to_3}
assert sorted(MIGRATIONS) == list(range(SCHEMA_VERSION))


class Database:
    """A SQLite file at the current schema version, one connection per (process, thread).

    Args:
        db_path: the SQLite file (created with its folder if missing).
        busy_timeout_s: how long a writer waits for another process's write lock before failing.

    A subclass for another file sets `migrations` (migrations[v] upgrades version v to v + 1; the file's current
    version is len(migrations)) and, if it wants other rows than tuples, `row_factory` (e.g. sqlite3.Row).
    """

    migrations: dict[int, Callable[[sqlite3.Connection], None]] = MIGRATIONS
    row_factory: Callable[[sqlite3.Cursor, tuple], object] | None = None

    def __init__(self, db_path: Path | str, busy_timeout_s: float = 30.0) -> None:
        self.db_path = Path(db_path)
        self.busy_timeout_s = float(busy_timeout_s)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._migrate()

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (reads run on it directly, in autocommit)."""
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():  # never reuse a connection across fork
            db = sqlite3.connect(self.db_path, timeout=self.busy_timeout_s, isolation_level=None)
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.db_path}: SQLite refused WAL mode ({mode}); use a local filesystem")
            db.execute("PRAGMA synchronous = NORMAL")  # durable at each checkpoint; safe with WAL
            db.row_factory = self.row_factory
            self._local.db, self._local.pid = db, os.getpid()
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception)."""
        db = self.connection()
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
        current = len(self.migrations)
        with self.transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > current:
                raise StoreError(
                    f"{self.db_path} has schema version {version}, newer than this backend's {current}: "
                    "upgrade the backend or point MODEL_DIR at another folder"
                )
            for step in range(version, current):
                self.migrations[step](db)
            if version != current:
                db.execute(f"PRAGMA user_version = {current}")

    @property
    def schema_version(self) -> int:
        return self.connection().execute("PRAGMA user_version").fetchone()[0]


def chunks(items: list, size: int) -> Iterator[list]:
    """items in consecutive lists of at most `size` (SQLite limits the parameters of one statement)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
