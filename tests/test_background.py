"""Background predictions of /predict (labelstudio_backend/background.py): what does not fit into
PREDICT_TIME_BUDGET is predicted by a background thread and posted to (the fake) Label Studio."""

from __future__ import annotations

import time

import numpy as np

from doubles import CONFIG, ColourPredictor, make_project, masks_by_label, settings_for
from labelstudio_backend.backend import DINOvBackend
from labelstudio_backend.server import create_app
from labelstudio_backend.store import ReferenceStore
from labelstudio_backend.sync import make_syncer


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
    assert "-refs2-" in version
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
    assert runtime.deferral.wait(timeout=60)
    for tid, masks in truth.items():
        (prediction,) = ls.of_task(tid)
        assert prediction["model_version"] == version
        found = masks_by_label(prediction)
        assert all(np.array_equal(found[label], masks[label]) for label in ("Red", "Blue"))
    runtime.shutdown()
