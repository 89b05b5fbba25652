"""Background predictions of /predict (labelstudio_backend/serving/deferred.py): what does not fit into
PREDICT_TIME_BUDGET is predicted by a background thread and posted to (the fake) Label Studio."""

from __future__ import annotations

import time

import numpy as np

from labelstudio_backend.http.app import create_app
from labelstudio_backend.references.sync import make_syncer
from labelstudio_backend.serving.backend import DINOvBackend
from labelstudio_backend.store import ReferenceStore
from tests.support.doubles import CONFIG, ColourPredictor, make_project, masks_by_label, settings_for


def test_large_retrieve_predictions_finishes_in_the_background(ls, tmp_path):
    """/predict answers one entry per task within the budget; the rest is posted by a background thread;
    a second call meanwhile answers [] for the tasks the background owns; every task ends with one prediction."""
    truth = make_project(ls, unlabeled=10)

    class SlowModel(ColourPredictor):
        def encode_images(self, images, batch_size=8):
            time.sleep(0.25 * len(images))
            return super().encode_images(images, batch_size)

    settings = settings_for(ls, tmp_path, predict_time_budget=1.0)
    store = ReferenceStore(settings.db_path)
    app = create_app(lambda s: SlowModel(), settings, store=store, syncer=make_syncer(settings, store))
    client = app.test_client()
    runtime = app.extensions["dinov"]
    assert client.post("/setup", json={"project": "3.1700000000", "schema": CONFIG}).status_code == 200
    runtime.ensure_synced(3).result(timeout=30)  # the references, from the fake Label Studio's API
    version = DINOvBackend(3, CONFIG, runtime=runtime).model_version
    assert version.startswith("base-dinov-fake-ckpt-") and runtime.store.revision(3) == 2
    tasks = [{"id": t["id"], "project": 3, "data": t["data"]} for t in ls.tasks.values() if t["id"] >= 10]

    def retrieve(batch):
        """What Label Studio does with the answer: store each dict entry, nothing for []."""
        answer = client.post("/predict", json={"tasks": batch, "project": "3.1700000000", "label_config": CONFIG,
                                               "params": {"context": None}})
        assert answer.status_code == 200, answer.json
        results = answer.json["results"]
        assert len(results) == len(batch)
        for task, entry in zip(batch, results):
            if isinstance(entry, dict):
                ls.predictions.append({"task": task["id"], **entry})
        return results

    started = time.perf_counter()
    first = retrieve(tasks)
    assert time.perf_counter() - started < 5
    answered = [t["id"] for t, r in zip(tasks, first) if isinstance(r, dict)]
    assert 1 <= len(answered) < len(tasks) and all(r == [] for r in first[len(answered):])
    second = retrieve([t for t in tasks if t["id"] not in answered])  # "Retrieve predictions" again
    assert all(r == [] for r in second)  # all owned by the background run
    assert runtime.deferred.wait(timeout=60)
    for tid, masks in truth.items():
        (prediction,) = ls.of_task(tid)
        assert prediction["model_version"] == version
        found = masks_by_label(prediction)
        assert all(np.array_equal(found[label], masks[label]) for label in ("Red", "Blue"))
    runtime.shutdown()


def background_app(ls, tmp_path, **overrides):
    settings = settings_for(ls, tmp_path, **overrides)
    store = ReferenceStore(settings.db_path)
    app = create_app(lambda s: ColourPredictor(), settings, store=store, syncer=make_syncer(settings, store))
    runtime = app.extensions["dinov"]
    assert app.test_client().post("/setup", json={"project": "3.1700000000", "schema": CONFIG}).status_code == 200
    runtime.ensure_synced(3).result(timeout=30)
    return app, runtime, store


def test_kept_tasks_are_resumed_and_what_label_studio_has_is_not_posted_again(ls, tmp_path):
    """A previous process kept tasks 10-13 and posted task 10's prediction just before it died (not yet marked):
    the next process posts 11-13 and leaves 10 alone."""
    make_project(ls, unlabeled=4)
    settings = settings_for(ls, tmp_path)
    store = ReferenceStore(settings.db_path)
    version = "dinov-fake-ckpt-refs2-kept"
    store.defer_tasks(3, version, CONFIG, [{"id": t, "data": ls.tasks[t]["data"]} for t in (10, 11, 12, 13)])
    ls.predictions.append({"task": 10, "result": [], "score": 0.0, "model_version": version})
    app = create_app(lambda s: ColourPredictor(), settings, store=store, syncer=make_syncer(settings, store))
    runtime = app.extensions["dinov"]  # creating the app resumes the kept tasks
    assert runtime.deferred.wait(timeout=60)
    assert {t: len(ls.of_task(t)) for t in (10, 11, 12, 13)} == {10: 1, 11: 1, 12: 1, 13: 1}
    assert store.background_counts() == {"pending": 0, "posted": 4}
    assert store.claimed_task_ids(3, version) == {10, 11, 12, 13}  # a "Retrieve predictions" now answers []
    runtime.shutdown()


def test_tasks_that_cannot_be_predicted_are_given_up_not_kept_forever(ls, tmp_path):
    make_project(ls, unlabeled=2, broken=(11,))
    app, runtime, store = background_app(ls, tmp_path)
    runtime.deferred.defer(3, "<View><Image name=", [{"id": 10, "data": ls.tasks[10]["data"]}], "v-bad-config")
    runtime.deferred.defer(3, CONFIG, [{"id": 11, "data": ls.tasks[11]["data"]}], "v-broken-image")
    deadline = time.monotonic() + 30
    while store.background_counts()["pending"] and time.monotonic() < deadline:
        runtime.deferred.schedule()  # (the retry pause is 30 s; ask again at once)
        runtime.queues["deferred"].wait_idle(10)
    assert store.background_counts()["pending"] == 0
    assert store.claimed_task_ids(3, "v-bad-config") == frozenset() == store.claimed_task_ids(3, "v-broken-image")
    assert ls.of_task(10) == [] and ls.of_task(11) == []
    runtime.shutdown()
