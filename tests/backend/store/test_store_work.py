"""The store's durable work tables (labelstudio_backend/store/work.py): webhook events and background tasks."""

from __future__ import annotations

import time

import pytest

from labelstudio_backend.store import ReferenceStore, work
from labelstudio_backend.store.work import InboxFull


@pytest.fixture
def store(tmp_path):
    return ReferenceStore(tmp_path / "references.sqlite3")


def test_events_are_kept_in_order_until_finished_and_survive_a_reopen(tmp_path, store):
    first = store.add_event(3, "ANNOTATION_CREATED", {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}})
    second = store.add_event(3, "ANNOTATIONS_DELETED", {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}]})
    assert first < second
    reopened = ReferenceStore(tmp_path / "references.sqlite3")
    events = reopened.next_events()
    assert [(e.id, e.event, e.payload["action"]) for e in events] == [
        (first, "ANNOTATION_CREATED", "ANNOTATION_CREATED"), (second, "ANNOTATIONS_DELETED", "ANNOTATIONS_DELETED")]
    assert reopened.event_failed(first, "database is locked") == 1
    reopened.finish_event(first)
    assert [e.id for e in store.next_events()] == [second] and store.pending_event_count() == 1


def test_the_inbox_is_bounded(store):
    store.max_pending_events = 2
    store.add_event(1, "ANNOTATION_CREATED", {})
    store.add_event(1, "ANNOTATION_CREATED", {})
    with pytest.raises(InboxFull, match="2 webhook events wait"):
        store.add_event(1, "ANNOTATION_CREATED", {})


def test_deferred_tasks_are_claimed_until_posted_and_then_for_the_claim_time(store, monkeypatch):
    tasks = [{"id": i, "data": {"image": f"/data/upload/3/{i}.png"}} for i in (5, 6, 7)]
    assert store.defer_tasks(3, "v1", "<View/>", tasks) == 3
    assert store.defer_tasks(3, "v1", "<View/>", tasks[:2]) == 0  # kept once
    assert store.claimed_task_ids(3, "v1") == {5, 6, 7} and store.claimed_task_ids(3, "v2") == frozenset()
    pending = store.pending_tasks(limit=2)
    assert [(t.project_id, t.model_version, t.task_id, t.label_config) for t in pending] == [
        (3, "v1", 5, "<View/>"), (3, "v1", 6, "<View/>")]
    store.tasks_posted(3, "v1", [5, 6])
    assert [t.task_id for t in store.pending_tasks()] == [7]
    assert store.claimed_task_ids(3, "v1") == {5, 6, 7}  # posted ones stay claimed for a while
    assert store.background_counts() == {"pending": 1, "posted": 2}
    later = time.time() + work.CLAIM_TTL_S + 1
    monkeypatch.setattr(work.time, "time", lambda: later)
    assert store.claimed_task_ids(3, "v1") == {7}
    assert store.prune_posted() == 2 and store.background_counts() == {"pending": 1, "posted": 0}


def test_a_task_that_keeps_failing_is_given_up(store):
    store.defer_tasks(3, "v1", None, [{"id": 9, "data": {}}])
    for attempt in range(work.MAX_TASK_ATTEMPTS - 1):
        store.tasks_failed(3, "v1", [9])
        assert [t.attempts for t in store.pending_tasks()] == [attempt + 1]
    store.tasks_failed(3, "v1", [9])
    assert store.pending_tasks() == [] and store.claimed_task_ids(3, "v1") == frozenset()


def test_deleting_a_project_drops_its_kept_work(store):
    store.add_event(3, "ANNOTATION_CREATED", {})
    store.add_event(4, "ANNOTATION_CREATED", {})
    store.defer_tasks(3, "v1", None, [{"id": 1}])
    store.delete_project(3)
    assert [e.project_id for e in store.next_events()] == [4]
    assert store.pending_tasks() == []
