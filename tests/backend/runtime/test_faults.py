"""Fault tests: the backend under gunicorn (tests/support/fault_app.py: the colour model double, its speed set per test)
against a fake Label Studio on 127.0.0.1, killed with SIGKILL in the middle of its work and started again on the
same MODEL_DIR; Label Studio down or answering garbage during a sync; a checkpoint that cannot be loaded.

Each test starts gunicorn once or twice (5-10 s each); the whole file runs in about two minutes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from labelstudio_backend.store import ReferenceStore
from tests.support.doubles import CONFIG, TOKEN, FakeLabelStudio, brush, make_project, scene
from tests.support.fault_harness import REPO_ROOT, Backend, wait_for

PROJECT = 3


@pytest.fixture
def backends():
    started: list[Backend] = []
    yield started
    for backend in started:
        backend.stop()


def start(backends: list[Backend], tmp_path: Path, ls: FakeLabelStudio, healthy: bool = True, **env: str) -> Backend:
    backend = Backend(tmp_path / "model_dir", ls.url, TOKEN, **env)
    backends.append(backend)
    return backend.start(healthy=healthy)


def setup_project(backend: Backend) -> None:
    answer = backend.post("/setup", json={"project": f"{PROJECT}.1700000000", "schema": CONFIG})
    assert answer.status_code == 200, answer.text
    wait_for(lambda: backend.get(f"/references?project={PROJECT}").json()["stats"].get("annotations", 0) >= 2,
             30, "the first reference sync")


def stored_annotations(model_dir: Path) -> dict[int, str]:
    """annotation id -> updated_at, read from the store's SQLite file as it is on disk."""
    store = ReferenceStore(model_dir / "references.sqlite3")
    try:
        return {a: stamp for a, (_, stamp) in store.annotation_versions(PROJECT).items()}
    finally:
        store.close()


def ls_annotations(ls: FakeLabelStudio) -> dict[int, str]:
    with ls.lock:
        return {a["id"]: a["updated_at"] for t in ls.tasks.values() if t["project"] == PROJECT
                for a in t["annotations"]}


def health(backend: Backend) -> dict:
    return backend.get("/health").json()


def test_sigkill_during_webhook_processing_loses_no_annotation(tmp_path, ls, backends):
    make_project(ls, unlabeled=24)
    backend = start(backends, tmp_path, ls, FAULT_WEBHOOK_DELAY="0.25")  # each event takes a quarter second
    setup_project(backend)

    # Annotators at work: 24 annotations created, 6 of them updated, 4 deleted; a webhook for each change.
    events = []
    for tid in range(10, 34):
        image, masks = scene(tid)
        annotation = ls.annotate(tid, [brush(masks["Red"], "Red", f"r{tid}")])
        events.append(ls.webhook("ANNOTATION_CREATED", tid, annotation))
    for tid in range(10, 16):
        aid = ls.tasks[tid]["annotations"][0]["id"]
        _, masks = scene(tid)
        annotation = ls.update_annotation(aid, [brush(masks["Blue"], "Blue", f"b{tid}")])
        events.append(ls.webhook("ANNOTATION_UPDATED", tid, annotation))
    for tid in range(16, 20):
        aid = ls.tasks[tid]["annotations"][0]["id"]
        ls.delete_annotation(aid)
        events.append({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": aid}], "project": {"id": PROJECT}})
    for payload in events:
        began = time.monotonic()
        answer = backend.post("/webhook", json=payload)
        assert answer.status_code == 200, answer.text
        assert time.monotonic() - began < 1.0  # kept, not processed, before the answer

    backend.kill()  # a few events in: most are still waiting
    assert stored_annotations(backend.model_dir) != ls_annotations(ls)

    ls.fault = "down"  # no sync can help: the kept events alone must bring the store up to date
    backend.start()
    wait_for(lambda: health(backend).get("webhooks", {}).get("pending") == 0, 60, "the kept events to be applied")
    assert stored_annotations(backend.model_dir) == ls_annotations(ls)

    ls.fault = None  # and the next sync agrees
    assert backend.post(f"/references?project={PROJECT}&action=sync").status_code == 202
    wait_for(lambda: backend.get(f"/references?project={PROJECT}").json().get("last_sync_error") is None
             and health(backend)["queues"]["sync"]["pending"] == 0 and health(backend)["queues"]["sync"]["running"] == 0,
             30, "the sync")
    assert stored_annotations(backend.model_dir) == ls_annotations(ls)


def test_sigkill_during_background_predictions_leaves_each_task_one_prediction(tmp_path, ls, backends):
    truth = make_project(ls, unlabeled=14)
    backend = start(backends, tmp_path, ls, FAULT_ENCODE_DELAY="0.3", PREDICT_TIME_BUDGET="1.5")
    setup_project(backend)
    task_ids = sorted(truth)

    began = time.monotonic()
    first = ls.retrieve_predictions(backend.url, PROJECT, task_ids)
    assert time.monotonic() - began < 1.5 + 1.0  # the budget holds
    assert any(r == [] for r in first)  # some tasks went to the background

    # Kill it once the background run posted some of them, not all.
    wait_for(lambda: 0 < sum(1 for t in task_ids if ls.of_task(t)) < len(task_ids) - 2 or None, 60,
             "the background run to be under way")
    backend.kill()
    partial = sum(1 for t in task_ids if ls.of_task(t))
    assert partial < len(task_ids)

    backend.start()  # nobody asks again: the backend resumes the kept tasks by itself
    wait_for(lambda: all(ls.of_task(t) for t in task_ids), 90, "every task to have a prediction")
    wait_for(lambda: health(backend)["background"]["pending"] == 0, 30, "the background run to finish")
    counts = {t: len(ls.of_task(t)) for t in task_ids}
    assert counts == {t: 1 for t in task_ids}
    assert len({ls.of_task(t)[0]["model_version"] for t in task_ids}) == 1


def test_label_studio_failing_during_a_sync_leaves_the_references_intact(tmp_path, ls, backends):
    make_project(ls, unlabeled=2)
    backend = start(backends, tmp_path, ls)
    setup_project(backend)
    before = stored_annotations(backend.model_dir)
    assert len(before) == 2

    def sync() -> dict:
        assert backend.post(f"/references?project={PROJECT}&action=sync").status_code == 202
        wait_for(lambda: (q := health(backend)["queues"]["sync"])["pending"] == 0 and q["running"] == 0, 30,
                 "the sync to finish")
        return backend.get(f"/references?project={PROJECT}").json()

    for fault in ("down", "html", "garbage"):  # no answer; a proxy's HTML page; JSON of the wrong shape
        ls.fault = fault
        references = sync()
        assert (references["last_sync_error"] or "").startswith("LabelStudioError"), (fault, references)
        assert stored_annotations(backend.model_dir) == before, fault
        assert references["stats"]["annotations"] == 2
        assert backend.get("/health").status_code == 200  # Label Studio down is not the backend down
        ls.fault = None
        assert sync()["last_sync_error"] is None

    ls.project_404 = 1  # one 404 for a project that exists (a proxy misrouting a request): nothing is deleted
    assert sync()["last_sync_error"] is None
    assert stored_annotations(backend.model_dir) == before


def test_health_is_503_with_the_reason_for_a_checkpoint_that_cannot_be_loaded(tmp_path, ls, backends):
    broken = tmp_path / "weights.safetensors"
    broken.write_bytes(b"not a checkpoint")
    backend = start(backends, tmp_path, ls, healthy=False, DINOV_CHECKPOINT=str(broken), MODEL_LOAD_RETRY_S="1",
                    app="_wsgi:app")  # the real app and model loading

    def failed_load() -> dict | None:
        answer = backend.get("/health")
        body = answer.json()
        return body if answer.status_code == 503 and body["model"]["state"] == "waiting to retry" else None

    body = wait_for(failed_load, 60, "/health to report the failed load")
    assert body["status"] == "UNAVAILABLE"
    assert str(broken) in body["reason"] and "next attempt in" in body["reason"]
    predict = backend.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}],
                                             "project": "3.1", "label_config": CONFIG})
    assert predict.status_code == 503 and str(broken) in predict.json()["error"]

    # The file is fixed (a download finished, a volume mounted): a later attempt loads it, no restart needed.
    fixed = tmp_path / "fixed.safetensors"
    fixed.write_bytes((REPO_ROOT / "dinov" / "assets" / "demo.safetensors").read_bytes())
    fixed.replace(broken)
    wait_for(lambda: backend.get("/health").status_code == 200, 60, "/health 200 after the retry")
    assert health(backend)["model"]["loaded"] is True
