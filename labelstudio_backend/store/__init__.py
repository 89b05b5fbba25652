"""The reference store: a project's annotated regions (the in-context examples) and a prompt-embedding cache, in one
SQLite file.

    schema.py      the file: schema version, migrations, connections, transactions
    examples.py    annotations <-> rows <-> Examples (one row per region and label)
    embeddings.py  the bounded prompt-embedding cache
    work.py        work kept across restarts: webhook events until applied, deferred tasks until posted
    references.py  ReferenceStore: upserts, deletions, per-label queries, revisions, sync bookkeeping
"""

from __future__ import annotations

from labelstudio_backend.store.examples import Example, annotation_rows, find_image_url, normalize_timestamp
from labelstudio_backend.store.references import ReferenceStore, UpsertOutcome
from labelstudio_backend.store.schema import MIGRATIONS, SCHEMA_VERSION, StoreError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Example", "ReferenceStore", "StoreError", "UpsertOutcome",
           "annotation_rows", "find_image_url", "normalize_timestamp"]
