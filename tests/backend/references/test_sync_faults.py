"""The reference sync against a fake Label Studio on 127.0.0.1 that fails the way a real one does on a bad day:
down, answering HTML or JSON of the wrong shape, a 404 for a project that exists. Deletions happen only on
confirmed answers; anything else is an error that changes nothing."""

from __future__ import annotations

import pytest

from labelstudio_backend.errors import LabelStudioError
from labelstudio_backend.fetching.labelstudio_client import LabelStudioClient
from labelstudio_backend.references.sync import sync_project
from labelstudio_backend.store import ReferenceStore
from tests.support.doubles import TOKEN, FakeLabelStudio, make_project

PROJECT = 3


@pytest.fixture
def ls():
    fake = FakeLabelStudio()
    make_project(fake, PROJECT, unlabeled=3)
    yield fake
    fake.stop()


@pytest.fixture
def store(tmp_path):
    return ReferenceStore(tmp_path / "references.sqlite3")


def sync(ls: FakeLabelStudio, store: ReferenceStore, full: bool | None = None):
    client = LabelStudioClient(ls.url, TOKEN, timeout=5)
    return sync_project(store, ls.url, TOKEN, PROJECT, full=full, client=client)


def versions(store: ReferenceStore) -> dict:
    return store.annotation_versions(PROJECT)


@pytest.mark.parametrize("fault", ["down", "html", "garbage"])
@pytest.mark.parametrize("full", [True, False])
def test_a_failing_label_studio_changes_nothing(ls, store, fault, full):
    sync(ls, store)
    before = versions(store)
    assert len(before) == 2
    ls.fault = fault
    with pytest.raises(LabelStudioError):
        sync(ls, store, full=full)
    assert versions(store) == before and store.revision(PROJECT) > 0


def test_a_single_404_for_the_project_is_not_a_deletion(ls, store):
    sync(ls, store)
    before = versions(store)
    ls.project_404 = 1  # a proxy misrouting one request
    report = sync(ls, store, full=True)
    assert not report.project_deleted and versions(store) == before


def test_a_confirmed_404_deletes_the_project(ls, store):
    sync(ls, store)
    ls.projects.pop(PROJECT)
    report = sync(ls, store, full=True)
    assert report.project_deleted and versions(store) == {}
    assert ls.count("GET", f"/api/projects/{PROJECT}/") >= 2  # asked again before deleting


def test_an_export_answer_that_is_not_a_list_is_an_error(ls, store, monkeypatch):
    sync(ls, store)
    before = versions(store)
    # Task 1 vanishes from the task list (as if it moved between pages), so the full sync asks the export about
    # it; the export answers an object instead of a list: that is no answer, and nothing is deleted.
    hidden = ls.tasks.pop(1)
    monkeypatch.setattr(LabelStudioClient, "get_json", _export_as_object(LabelStudioClient.get_json))
    with pytest.raises(LabelStudioError, match="export"):
        sync(ls, store, full=True)
    ls.tasks[1] = hidden
    assert versions(store) == before


def test_a_task_without_its_annotations_list_is_an_error(ls, store, monkeypatch):
    sync(ls, store)
    before = versions(store)
    for task in ls.tasks.values():
        task["annotations_hidden"] = task.pop("annotations")
    try:
        with pytest.raises(LabelStudioError, match="annotations"):
            sync(ls, store, full=True)
    finally:
        for task in ls.tasks.values():
            task["annotations"] = task.pop("annotations_hidden")
    assert versions(store) == before


def _export_as_object(original):
    def get_json(self, path, params=None, missing_ok=False):
        if path.endswith("/export"):
            return {"detail": "export is being prepared"}
        return original(self, path, params=params, missing_ok=missing_ok)
    return get_json
