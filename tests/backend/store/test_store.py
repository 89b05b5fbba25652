"""ReferenceStore: round trips with Label Studio annotation JSON, filters, migrations, concurrency, cache bound."""

import multiprocessing
import sqlite3

import numpy as np
import pytest

from labelstudio_backend.store import MIGRATIONS, SCHEMA_VERSION, Example, ReferenceStore, StoreError

PROJECT = 7


def _brush_rle(height: int = 20, width: int = 30) -> list[int]:
    from label_studio_sdk.converter import brush  # imported here: the spawned writers below do not need it

    mask = np.zeros((height, width), dtype=np.uint8)
    mask[5:12, 8:20] = 255
    return brush.mask2rle(mask)


def brush_region(region_id: str, label: str, height: int = 20, width: int = 30) -> dict:
    return {
        "id": region_id, "type": "brushlabels", "from_name": "tag", "to_name": "image", "origin": "manual",
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"format": "rle", "rle": _brush_rle(height, width), "brushlabels": [label]},
    }


def rect_region(region_id: str, label: str) -> dict:
    return {
        "id": region_id, "type": "rectanglelabels", "from_name": "box", "to_name": "image", "origin": "manual",
        "original_width": 640, "original_height": 480, "image_rotation": 0,
        "value": {"x": 10.0, "y": 20.0, "width": 30.0, "height": 25.0, "rotation": 0, "rectanglelabels": [label]},
    }


def polygon_region(region_id: str, label: str) -> dict:
    return {
        "id": region_id, "type": "polygonlabels", "from_name": "poly", "to_name": "image",
        "original_width": 640, "original_height": 480, "image_rotation": 0,
        "value": {"points": [[10, 10], [40, 12], [30, 50]], "closed": True, "polygonlabels": [label]},
    }


def keypoint_region(region_id: str, label: str, positive: bool = True) -> dict:
    return {
        "id": region_id, "type": "keypointlabels", "from_name": "kp", "to_name": "image",
        "original_width": 640, "original_height": 480, "image_rotation": 0, "is_positive": positive,
        "value": {"x": 50.0, "y": 40.0, "width": 0.5, "keypointlabels": [label]},
    }


def task(task_id: int, url: str | None = None) -> dict:
    return {"id": task_id, "project": PROJECT, "data": {"image": url or f"/data/upload/{PROJECT}/img{task_id}.png"}}


def annotation(annotation_id: int, task_id: int, result: list, updated_at: str, **extra) -> dict:
    return {
        "id": annotation_id, "task": task_id, "project": PROJECT, "result": result, "was_cancelled": False,
        "ground_truth": False, "completed_by": 1, "created_at": updated_at, "updated_at": updated_at, **extra,
    }


@pytest.fixture
def store(tmp_path) -> ReferenceStore:
    return ReferenceStore(tmp_path / "refs.sqlite3")


def test_upsert_all_region_types_round_trip(store):
    result = [
        brush_region("b1", "Cat"), rect_region("r1", "Dog"), polygon_region("p1", "Cat"),
        keypoint_region("k1", "Dog", positive=False),
        # not a prompt: a per-image choice, and a relation between regions
        {"id": "c1", "type": "choices", "from_name": "q", "to_name": "image", "value": {"choices": ["ok"]}},
        {"type": "relation", "from_id": "b1", "to_id": "r1", "direction": "right"},
    ]
    outcome = store.upsert_annotation(PROJECT, task(1), annotation(11, 1, result, "2024-05-01T10:00:00.5Z"))
    assert outcome == "added"
    found = store.examples(PROJECT)
    by_region = {e.region_id: e for e in found}
    assert set(by_region) == {"b1", "r1", "p1", "k1"}
    assert [e.region_id for e in found if e.label == "Cat"] == ["b1", "p1"]  # drawing order within one annotation
    b1 = by_region["b1"]
    assert b1 == Example(
        annotation_id=11, task_id=1, region_id="b1", label="Cat", region=result[0],
        image_url=f"/data/upload/{PROJECT}/img1.png", original_size=(30, 20),
        updated_at="2024-05-01T10:00:00.500000Z", completed_by=1, ground_truth=False, from_name="tag",
        region_type="brush",
    )
    # the stored RLE still decodes to the drawn mask
    from label_studio_sdk.converter import brush

    decoded = brush.decode_rle(b1.region["value"]["rle"]).reshape(20, 30, 4)[:, :, 3]
    assert (decoded > 0).sum() == 7 * 12 and decoded[5:12, 8:20].all()
    assert by_region["r1"].region_type == "rectangle" and by_region["r1"].original_size == (640, 480)
    assert by_region["k1"].region["is_positive"] is False
    assert store.revision(PROJECT) == 1


def test_update_replaces_rows_and_unchanged_does_not_bump(store):
    store.upsert_annotation(PROJECT, task(1), annotation(11, 1, [brush_region("b1", "Cat")], "2024-05-01T10:00:00Z"))
    assert store.upsert_annotation(
        PROJECT, task(1), annotation(11, 1, [brush_region("b1", "Cat")], "2024-05-01T10:00:00Z")
    ) == "unchanged"
    assert store.revision(PROJECT) == 1
    updated = annotation(11, 1, [rect_region("r9", "Dog")], "2024-05-02T10:00:00+02:00")
    assert store.upsert_annotation(PROJECT, task(1), updated) == "updated"
    found = store.examples(PROJECT)
    assert [(e.region_id, e.label, e.updated_at) for e in found] == [("r9", "Dog", "2024-05-02T08:00:00.000000Z")]
    assert store.revision(PROJECT) == 2
    stale = annotation(11, 1, [rect_region("r9", "Cat")], "2024-05-02T07:59:59Z")  # read before the update
    assert store.upsert_annotation(PROJECT, task(1), stale) == "unchanged"
    assert [e.label for e in store.examples(PROJECT)] == ["Dog"]


def test_cancelled_annotations_are_skipped_and_cancelling_removes(store):
    cancelled = annotation(12, 2, [brush_region("b1", "Cat")], "2024-05-01T10:00:00Z", was_cancelled=True)
    assert store.upsert_annotation(PROJECT, task(2), cancelled) == "unchanged"
    assert store.examples(PROJECT) == [] and store.revision(PROJECT) == 0
    store.upsert_annotation(PROJECT, task(2), annotation(12, 2, [brush_region("b1", "Cat")], "2024-05-01T10:00:00Z"))
    cancelled["updated_at"] = "2024-05-01T11:00:00Z"
    assert store.upsert_annotation(PROJECT, task(2), cancelled) == "removed"
    assert store.examples(PROJECT) == []


def test_multi_label_region_and_separate_labels_item(store):
    two_labels = brush_region("b1", "Cat")
    two_labels["value"]["brushlabels"] = ["Cat", "Pet"]
    # A Brush tag with a separate Labels tag: geometry and labels on two items sharing the region id.
    plain_brush = {k: v for k, v in brush_region("b2", "x").items() if k != "value"}
    plain_brush.update(type="brush", value={"format": "rle", "rle": _brush_rle()})
    labels_item = {"id": "b2", "type": "labels", "from_name": "lbl", "to_name": "image", "value": {"labels": ["Dog"]}}
    store.upsert_annotation(PROJECT, task(1), annotation(11, 1, [two_labels, plain_brush, labels_item], "2024-05-01"))
    assert sorted((e.region_id, e.label) for e in store.examples(PROJECT)) == [("b1", "Cat"), ("b1", "Pet"), ("b2", "Dog")]
    assert {e.region_type for e in store.examples(PROJECT, labels=["Dog"])} == {"brush"}


def test_delete_annotations_tasks_and_project(store):
    store.upsert_annotation(PROJECT, task(1), annotation(11, 1, [brush_region("b1", "Cat")], "2024-05-01"))
    store.upsert_annotation(PROJECT, task(2), annotation(12, 2, [brush_region("b1", "Cat")], "2024-05-02"))
    store.upsert_annotation(PROJECT, task(3), annotation(13, 3, [brush_region("b1", "Cat")], "2024-05-03"))
    store.upsert_annotation(PROJECT + 1, task(9), annotation(19, 9, [rect_region("r", "Dog")], "2024-05-03"))
    assert store.delete_annotations(PROJECT, [12, 999]) == 1
    assert sorted(e.annotation_id for e in store.examples(PROJECT)) == [11, 13]
    revision = store.revision(PROJECT)
    assert store.delete_annotations(PROJECT, [999]) == 0 and store.revision(PROJECT) == revision
    assert store.delete_tasks(PROJECT, [3]) == 1
    assert [e.annotation_id for e in store.examples(PROJECT)] == [11]
    store.put_embedding("k11", np.ones(4, np.float32), project_id=PROJECT, annotation_id=11)
    store.put_embedding("k19", np.ones(4, np.float32), project_id=PROJECT + 1, annotation_id=19)
    store.delete_project(PROJECT)
    assert store.examples(PROJECT) == [] and store.revision(PROJECT) == 0
    assert store.stats(PROJECT)["examples"] == 0
    assert store.get_embedding("k11") is None and store.get_embedding("k19") is not None
    assert [e.annotation_id for e in store.examples(PROJECT + 1)] == [19]


def test_per_label_limit_order_and_filters(store):
    # annotation i updated on day i; annotator = i % 2; ground truth for i == 3
    for i in range(1, 7):
        result = [brush_region(f"b{i}", "Cat")] + ([rect_region(f"r{i}", "Dog")] if i <= 2 else [])
        ann = annotation(100 + i, i, result, f"2024-05-0{i}T00:00:00Z", completed_by={"id": i % 2, "email": "u@x"},
                         ground_truth=i == 3)
        store.upsert_annotation(PROJECT, task(i), ann)
    cats = store.examples(PROJECT, labels=["Cat"], per_label=4)
    assert [e.annotation_id for e in cats] == [106, 105, 104, 103]  # most recent first, at most 4
    assert [e.task_id for e in store.examples(PROJECT, labels=["Cat"], per_label=3, exclude_task_id=5)] == [6, 4, 3]
    both = store.examples(PROJECT, labels=["Dog", "Cat"], per_label=2)
    assert [(e.label, e.annotation_id) for e in both] == [("Dog", 102), ("Dog", 101), ("Cat", 106), ("Cat", 105)]
    assert [e.annotation_id for e in store.examples(PROJECT, ground_truth_only=True)] == [103]
    assert [e.annotation_id for e in store.examples(PROJECT, labels=["Cat"], annotators=[1])] == [105, 103, 101]
    assert store.examples(PROJECT, labels=["Bird"]) == []
    stats = store.stats(PROJECT)
    assert stats["examples_per_label"] == {"Cat": 6, "Dog": 2} and stats["annotations"] == 6
    with pytest.raises(ValueError, match="per_label"):
        store.examples(PROJECT, per_label=0)


def test_image_url_lookup(store):
    multi = {"id": 1, "data": {"caption": "a cat", "photo": "s3://bucket/a.jpg", "thumb": "https://x/t.jpg"}}
    region = brush_region("b1", "Cat")
    region["to_name"] = "photo"
    store.upsert_annotation(PROJECT, multi, annotation(11, 1, [region], "2024-05-01"))
    assert store.examples(PROJECT)[0].image_url == "s3://bucket/a.jpg"
    region["to_name"] = "img"  # no such key and two URLs: ambiguous
    with pytest.raises(StoreError, match="which task.data key"):
        store.upsert_annotation(PROJECT, multi, annotation(12, 1, [region], "2024-05-01"))
    store.upsert_annotation(PROJECT, multi, annotation(12, 1, [region], "2024-05-01"), image_key="thumb")
    assert store.examples(PROJECT, exclude_task_id=None)[0].image_url in {"s3://bucket/a.jpg", "https://x/t.jpg"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"id": 1, "result": "nope", "updated_at": "2024-05-01"}, "must be a list"),
        ({"id": 1, "result": [], "updated_at": "yesterday"}, "ISO 8601"),
        ({"id": "abc", "result": []}, "integer id"),
        ({"result": []}, "with an 'id'"),
    ],
)
def test_bad_annotation_json(store, bad, message):
    with pytest.raises(StoreError, match=message):
        store.upsert_annotation(PROJECT, task(1), bad)
    with pytest.raises(StoreError, match="data"):
        store.upsert_annotation(PROJECT, {"id": 1}, annotation(1, 1, [], "2024-05-01"))


def test_survives_reopen(tmp_path):
    path = tmp_path / "sub" / "refs.sqlite3"
    first = ReferenceStore(path)
    first.upsert_annotation(PROJECT, task(1), annotation(11, 1, [rect_region("r1", "Dog")], "2024-05-01"))
    first.put_embedding("e", np.arange(6, dtype=np.float32).reshape(2, 3), project_id=PROJECT, annotation_id=11)
    first.set_last_sync(PROJECT, "2024-06-01T00:00:00Z", watermark="2024-05-31T23:00:00Z")
    first.close()
    again = ReferenceStore(path)
    assert [(e.annotation_id, e.label) for e in again.examples(PROJECT)] == [(11, "Dog")]
    np.testing.assert_array_equal(again.get_embedding("e"), np.arange(6, dtype=np.float32).reshape(2, 3))
    assert again.stats(PROJECT)["last_sync"] == "2024-06-01T00:00:00.000000Z"
    assert again.sync_watermark(PROJECT) == "2024-05-31T23:00:00.000000Z"
    assert again.revision(PROJECT) == 1
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migration_from_version_1_keeps_data(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    MIGRATIONS[0](db)  # a file as the first release left it
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO projects (project_id, revision, last_sync) VALUES (?, 5, '2024-01-01T00:00:00.000000Z')",
               (PROJECT,))
    db.execute(
        "INSERT INTO examples VALUES (?, 11, 0, 'b1', 'Cat', 'tag', 'brush', ?, '/data/upload/7/a.png', 30, 20, "
        "1, 1, 0, '2024-01-01T00:00:00.000000Z')",
        (PROJECT, '{"id": "b1"}'),
    )
    db.close()
    store = ReferenceStore(path)
    assert store.schema_version == SCHEMA_VERSION == 3
    assert store.revision(PROJECT) == 5
    assert [(e.annotation_id, e.region, e.original_size) for e in store.examples(PROJECT)] == [
        (11, {"id": "b1"}, (30, 20))
    ]
    store.put_embedding("x", np.zeros(3, np.float32))  # the table version 2 added
    assert store.sync_watermark(PROJECT) is None
    assert store.pending_event_count() == 0 and store.background_counts() == {"pending": 0, "posted": 0}  # version 3


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "future.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this backend"):
        ReferenceStore(path)


def _writer(path: str, worker: int, count: int) -> None:
    store = ReferenceStore(path, busy_timeout_s=60)
    for i in range(count):
        annotation_id = worker * 1000 + i
        store.upsert_annotation(
            PROJECT, task(annotation_id), annotation(annotation_id, annotation_id, [rect_region("r", f"L{worker}")],
                                                     f"2024-05-01T00:00:{i % 60:02d}Z")
        )
        store.put_embedding(f"w{worker}-{i}", np.full(8, i, np.float32), project_id=PROJECT)


def test_concurrent_writers_from_two_processes_lose_nothing(tmp_path):
    path = str(tmp_path / "shared.sqlite3")
    ReferenceStore(path)  # created before the workers, as gunicorn's master would not
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(path, w, 40)) for w in (1, 2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    store = ReferenceStore(path)
    stats = store.stats(PROJECT)
    assert stats["examples_per_label"] == {"L1": 40, "L2": 40}
    assert stats["revision"] == 80  # every upsert bumped exactly once
    assert store.embedding_stats()["rows"] == 80


def test_embedding_cache_is_bounded_lru(tmp_path):
    store = ReferenceStore(tmp_path / "c.sqlite3", max_embedding_rows=3, max_embedding_bytes=10_000)
    for name in "abc":
        store.put_embedding(name, np.full(4, ord(name), np.float32))
    assert store.get_embedding("a") is not None  # a is now the most recently used
    store.put_embedding("d", np.zeros(4, np.float32))
    assert store.get_embedding("b") is None  # least recently used went first
    assert {k for k in "acd" if store.get_embedding(k) is not None} == set("acd")
    np.testing.assert_array_equal(store.get_embedding("a"), np.full(4, ord("a"), np.float32))
    # byte bound: 3 vectors of 4000 bytes do not fit in 10000 bytes
    small = ReferenceStore(tmp_path / "b.sqlite3", max_embedding_rows=100, max_embedding_bytes=10_000)
    for i in range(3):
        small.put_embedding(f"v{i}", np.zeros(1000, np.float32))
    assert small.embedding_stats()["rows"] == 2 and small.get_embedding("v0") is None
    with pytest.raises(StoreError, match="exceeds the cache bound"):
        small.put_embedding("huge", np.zeros(5000, np.float32))


def test_updating_an_annotation_drops_its_stale_embeddings(store):
    store.upsert_annotation(PROJECT, task(1), annotation(11, 1, [brush_region("b1", "Cat")], "2024-05-01"))
    old = store.examples(PROJECT)[0]
    store.put_embedding(old.embedding_key("ckptA"), np.ones(4, np.float32), project_id=PROJECT, annotation_id=11)
    store.upsert_annotation(PROJECT, task(1), annotation(11, 1, [brush_region("b1", "Dog")], "2024-05-02"))
    new = store.examples(PROJECT)[0]
    assert new.embedding_key("ckptA") != old.embedding_key("ckptA")
    assert store.get_embedding(old.embedding_key("ckptA")) is None
