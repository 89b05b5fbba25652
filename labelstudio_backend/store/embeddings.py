"""The prompt-embedding cache of the reference store: vectors by key (Example.embedding_key), bounded in rows and
bytes, least recently used evicted first. Rows carry their project and annotation so that deleting either drops
its vectors.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np

from labelstudio_backend.store.examples import as_id
from labelstudio_backend.store.schema import Database, StoreError


class EmbeddingCache(Database):
    """The embeddings table of a Database.

    max_embedding_rows / max_embedding_bytes: the cache keeps at most this many rows / bytes of vectors.
    """

    max_embedding_rows: int = 100_000
    max_embedding_bytes: int = 512 * 1024 * 1024

    def get_embedding(self, key: str) -> np.ndarray | None:
        """The cached vector for this key (and mark it used), or None."""
        with self.transaction() as db:
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
        project = None if project_id is None else as_id(project_id, "project_id")
        annotation = None if annotation_id is None else as_id(annotation_id, "annotation_id")
        with self.transaction() as db:
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
        count, total = self.connection().execute(
            "SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM embeddings"
        ).fetchone()
        return {"rows": int(count), "bytes": int(total), "max_rows": self.max_embedding_rows,
                "max_bytes": self.max_embedding_bytes}
