"""Stored annotations follow Label Studio (issue 20, item 4).

A webhook that claims `updated_at: 9999-12-31` used to win over every later genuine webhook and over a forced
sync, for good. Now a timestamp further ahead than FUTURE_SKEW_S is taken as the time it arrived, and a forced
sync (POST /references?action=sync, a full sync) replaces what the store holds with what Label Studio has.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from labelstudio_backend.http.app import create_app
from labelstudio_backend.references.sync import make_syncer
from labelstudio_backend.store import ReferenceStore
from labelstudio_backend.store.examples import clamp_future
from tests.support.doubles import _EPOCH, CONFIG, SIZE, ColourPredictor, brush, png, scene, settings_for

FORGED = "9999-12-31T00:00:00Z"


def stroke(row: int) -> np.ndarray:
    mask = np.zeros(SIZE, bool)
    mask[row:row + 3, 10:20] = True
    return mask


@pytest.fixture
def synced(ls, tmp_path):
    """Project 7 with one annotated task (annotation `aid`, a Red stroke), synced into the backend's store.
    Label Studio's clock runs at the real time (the fake's own starts in 2024)."""
    ls.clock = int((datetime.now(UTC) - _EPOCH).total_seconds()) - 60  # a minute ago
    ls.add_project(7)
    image, _ = scene(1)
    task = ls.add_task(7, 1, png(image), annotations=[[brush(stroke(10), "Red", "r1")]])
    aid = task["annotations"][0]["id"]
    settings = settings_for(ls, tmp_path)
    store = ReferenceStore(settings.db_path)
    app = create_app(lambda s: ColourPredictor(), settings, store=store, syncer=make_syncer(settings, store))
    client = app.test_client()
    runtime = app.extensions["dinov"]
    assert client.post("/setup", json={"project": "7.1700000000", "schema": CONFIG}).status_code == 200
    runtime.ensure_synced(7).result(timeout=30)
    assert labels(store) == {"Red"}
    yield client, runtime, store, aid
    runtime.shutdown()


def labels(store: ReferenceStore) -> set[str]:
    return {example.label for example in store.examples(7, labels=["Red", "Blue"])}


def forge(ls, client, runtime, aid: int) -> None:
    """An ANNOTATION_UPDATED that relabels the annotation Blue and claims to be from the year 9999."""
    _, annotation = ls.find_annotation(aid)
    forged = {**annotation, "result": [brush(stroke(30), "Blue", "b1")], "updated_at": FORGED}
    assert client.post("/webhook", json=ls.webhook("ANNOTATION_UPDATED", 1, forged)).status_code == 200
    assert runtime.queues.wait_idle(timeout=30)


def test_a_later_genuine_webhook_wins_over_a_forged_future_timestamp(ls, synced):
    client, runtime, store, aid = synced
    forge(ls, client, runtime, aid)
    assert labels(store) == {"Blue"}  # the forged version is applied: it is an annotation as any other
    _, stored_stamp = store.annotation_versions(7)[aid]
    assert stored_stamp < "2100"  # but its timestamp is the time it arrived, not 9999
    ls.clock = int((datetime.now(UTC) - _EPOCH).total_seconds()) + 1  # an edit after the forgery
    genuine = ls.update_annotation(aid, [brush(stroke(12), "Red", "r1")])
    assert client.post("/webhook", json=ls.webhook("ANNOTATION_UPDATED", 1, genuine)).status_code == 200
    assert runtime.queues.wait_idle(timeout=30)
    assert labels(store) == {"Red"}


def test_a_forced_sync_replaces_the_store_with_what_label_studio_has(ls, synced):
    client, runtime, store, aid = synced
    forge(ls, client, runtime, aid)
    assert labels(store) == {"Blue"}
    # as an older process would have kept it: the forged 9999 itself in the store
    with store.transaction() as db:
        db.execute("UPDATE examples SET updated_at = ? WHERE annotation_id = ?", ("9999-12-31T00:00:00.000000Z", aid))
    answer = client.post("/references?project=7&action=sync")
    assert answer.status_code == 202, answer.json
    assert runtime.queues.wait_idle(timeout=30)
    assert labels(store) == {"Red"}
    _, annotation = ls.find_annotation(aid)
    assert store.annotation_versions(7)[aid][1].startswith(annotation["updated_at"][:19])


def test_only_timestamps_beyond_the_skew_are_replaced():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    near = {"id": 1, "updated_at": (now + timedelta(seconds=60)).isoformat()}
    assert clamp_future(near, now=now) is near
    far = clamp_future({"id": 1, "updated_at": FORGED, "created_at": "2025-12-31T00:00:00Z"}, now=now)
    assert far["updated_at"].startswith("2026-01-01T00:00:00") and far["created_at"] == "2025-12-31T00:00:00Z"
