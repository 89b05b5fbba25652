"""Encode ahead (labelstudio_backend/serving/encode_ahead.py): opening a task of a project with Sequential sampling
prepares the next unlabeled tasks in the background, so that opening them is a cache hit."""

from __future__ import annotations

import logging
import threading

import numpy as np

from labelstudio_backend.http.app import create_app
from labelstudio_backend.references.sync import make_syncer
from labelstudio_backend.store import ReferenceStore
from tests.support.doubles import CONFIG, ColourPredictor, brush, make_project, masks_by_label, scene, settings_for

SEQUENTIAL = "Sequential sampling"


def ahead_app(ls, tmp_path, sampling: str | None = SEQUENTIAL, unlabeled: int = 7, gate=None, **overrides):
    """The app with project 3 (tasks 1-2 annotated, then 10, 11, ... unlabeled) synced; `loaded` lists the task
    ids of the images loaded (one load per encoding: the features are cached); `gate(task_id)` runs before each."""
    truth = make_project(ls, unlabeled=unlabeled)
    ls.projects[3].update({"sampling": sampling} if sampling else {})
    settings = settings_for(ls, tmp_path, **{"encode_ahead_tasks": 2, **overrides})
    store = ReferenceStore(settings.db_path)
    predictor = ColourPredictor()
    app = create_app(lambda s: predictor, settings, store=store, syncer=make_syncer(settings, store))
    runtime = app.extensions["dinov"]
    loaded: list[int] = []
    load = runtime.images.load

    def recording_load(url, task_id=None):
        if task_id is not None and task_id >= 10:
            loaded.append(task_id)
            if gate is not None:
                gate(task_id)
        return load(url, task_id)

    runtime.images.load = recording_load
    client = app.test_client()
    assert client.post("/setup", json={"project": "3.1700000000", "schema": CONFIG}).status_code == 200
    runtime.ensure_synced(3).result(timeout=30)
    return app, runtime, client, predictor, loaded, truth


def open_task(client, ls, task_id: int) -> dict:
    """What Label Studio sends when an annotator opens a task without a prediction: /predict of that task."""
    answer = client.post("/predict", json={"tasks": [{"id": task_id, "project": 3, "data": ls.tasks[task_id]["data"]}],
                                           "project": "3.1700000000", "label_config": CONFIG,
                                           "params": {"context": None}})
    assert answer.status_code == 200, answer.json
    (prediction,) = answer.json["results"]
    return prediction


def assert_right(prediction: dict, masks: dict) -> None:
    found = masks_by_label(prediction)
    assert all(np.array_equal(found[label], masks[label]) for label in ("Red", "Blue"))


def test_opening_a_task_prepares_the_next_ones_and_opening_them_is_a_cache_hit(ls, tmp_path):
    app, runtime, client, predictor, loaded, truth = ahead_app(ls, tmp_path)
    segmented = []
    segment = predictor.segment_generic
    predictor.segment_generic = lambda *a, **k: segmented.append(1) or segment(*a, **k)
    assert_right(open_task(client, ls, 10), truth[10])
    assert runtime.ahead.wait(30)
    assert loaded == [10, 11, 12]  # the opened task, then the next two in id order
    assert runtime.ahead.counts == {"kept": 2} and len(segmented) == 3
    query = ls.task_list_queries[-1]
    assert query["review"] == "true" and query["resolve_uri"] == "false"  # no predictions retrieved, raw URIs

    assert_right(open_task(client, ls, 11), truth[11])  # prepared: no encoding, no decoding
    assert runtime.ahead.wait(30)
    assert loaded == [10, 11, 12, 13] and len(segmented) == 4  # 12 was prepared already; 13 is new
    assert runtime.ahead.counts == {"kept": 3, "had": 1}
    for task_id in (12, 13):
        assert_right(open_task(client, ls, task_id), truth[task_id])
    runtime.ahead.wait(30)
    assert loaded == [10, 11, 12, 13, 14, 15]  # every image encoded once
    runtime.shutdown()


def test_labeled_and_skipped_tasks_are_passed_over(ls, tmp_path):
    app, runtime, client, predictor, loaded, truth = ahead_app(ls, tmp_path)
    image, masks = scene(11)
    ls.annotate(11, [brush(masks["Red"], "Red", "r11")])
    ls.annotate(12, [])["was_cancelled"] = True  # skipped
    open_task(client, ls, 10)
    assert runtime.ahead.wait(30)
    assert loaded == [10, 13, 14]
    runtime.shutdown()


def test_other_samplings_prepare_nothing_and_say_so_once(ls, tmp_path, caplog):
    app, runtime, client, predictor, loaded, truth = ahead_app(ls, tmp_path, sampling="Uniform sampling")
    with caplog.at_level(logging.INFO, logger="labelstudio_backend.serving.encode_ahead"):
        for task_id in (10, 11):
            assert_right(open_task(client, ls, task_id), truth[task_id])
            assert runtime.ahead.wait(30)
    assert loaded == [10, 11] and runtime.ahead.counts == {"not sequential": 2}
    assert len([r for r in caplog.records if "Uniform sampling" in r.getMessage()]) == 1
    assert ls.task_list_queries == []
    runtime.shutdown()


def test_a_later_open_cancels_what_the_earlier_one_still_had_to_prepare(ls, tmp_path):
    started_11, release = threading.Event(), threading.Event()

    def gate(task_id):
        if task_id == 11:  # the encode-ahead's first image: hold it until the annotator has gone elsewhere
            started_11.set()
            assert release.wait(30)

    app, runtime, client, predictor, loaded, truth = ahead_app(ls, tmp_path, unlabeled=8, gate=gate,
                                                               encode_ahead_tasks=3)
    open_task(client, ls, 10)
    assert started_11.wait(30)
    assert_right(open_task(client, ls, 14), truth[14])  # the annotator jumps to task 14 meanwhile
    release.set()
    assert runtime.ahead.wait(30)
    assert loaded == [10, 11, 14, 15, 16, 17]  # 12 and 13 were dropped, 15-17 prepared for task 14
    assert runtime.ahead.counts == {"kept": 4, "superseded": 2}
    runtime.shutdown()


def test_nothing_is_prepared_while_a_request_is_in_flight(ls, tmp_path):
    app, runtime, client, predictor, loaded, truth = ahead_app(ls, tmp_path)
    with runtime.foreground.request():  # an annotator's request being answered
        runtime.ahead.task_opened(3, CONFIG, {"id": 10, "data": ls.tasks[10]["data"]})
        assert not runtime.ahead.wait(1.5)
        assert loaded == []
    assert runtime.ahead.wait(30)
    assert loaded == [11, 12]
    runtime.shutdown()


def test_a_new_annotation_makes_a_prepared_prediction_stale_but_keeps_the_features(ls, tmp_path):
    app, runtime, client, predictor, loaded, truth = ahead_app(ls, tmp_path)
    open_task(client, ls, 10)
    assert runtime.ahead.wait(30) and loaded == [10, 11, 12]
    image, masks = scene(10)
    ls.annotate(10, [brush(masks["Red"], "Red", "r10")])  # the annotator submits task 10
    revision = runtime.store.revision(3)
    runtime.ensure_synced(3, force=True).result(timeout=30)
    assert runtime.store.revision(3) != revision
    segmented = []
    segment = predictor.segment_generic
    predictor.segment_generic = lambda *a, **k: segmented.append(1) or segment(*a, **k)
    assert_right(open_task(client, ls, 11), truth[11])
    assert runtime.ahead.wait(30)
    # 11 decoded again (not encoded), then 12 predicted again from its cached features, and 13 prepared
    assert len(segmented) == 3 and loaded == [10, 11, 12, 13] and runtime.ahead.counts == {"kept": 4}
    runtime.shutdown()


def test_label_studio_failing_never_reaches_the_request(ls, tmp_path):
    app, runtime, client, predictor, loaded, truth = ahead_app(ls, tmp_path)
    ls.fault = "down"  # the API is down; the images (files) are still served
    assert_right(open_task(client, ls, 10), truth[10])
    assert runtime.ahead.wait(30)
    assert loaded == [10] and runtime.ahead.counts == {"failed": 1}
    runtime.shutdown()


def test_off_with_zero_and_never_more_than_the_feature_cache_holds(ls, tmp_path):
    app, runtime, client, predictor, loaded, truth = ahead_app(ls, tmp_path, encode_ahead_tasks=0)
    assert runtime.ahead is None
    runtime.shutdown()
    app, runtime, client, predictor, loaded, truth = ahead_app(ls, tmp_path / "small", encode_ahead_tasks=5,
                                                               feature_cache_size=3)
    assert runtime.ahead.tasks_ahead == 2
    open_task(client, ls, 10)
    assert runtime.ahead.wait(30) and loaded == [10, 11, 12]
    runtime.shutdown()
