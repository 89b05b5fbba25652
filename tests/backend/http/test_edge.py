"""The HTTP edge (issue 20, items 3, 6 and 7): what an anonymous /health shows, ids and numbers validated before
they reach the store, chunked bodies counted against MAX_REQUEST_BYTES, refused credentials logged."""

from __future__ import annotations

import base64
import io
import json
import logging
import time

import pytest
import requests
import requests_mock

from labelstudio_backend.errors import LabelStudioError
from labelstudio_backend.fetching.images import ImageLoader
from labelstudio_backend.http.app import create_app
from labelstudio_backend.settings import Settings
from labelstudio_backend.store import ReferenceStore
from tests.backend.http.test_app import CONFIG, LS, PROJECT, Backend
from tests.support.doubles import ColourPredictor

USER, PASSWORD = "ml", "s3cret-Pass"
GOOD = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
SECRET = '{"image": "/data/upload/6/patient-JOHN-DOE.png", "notes": "CONFIDENTIAL diagnosis"}'


@pytest.fixture
def guarded(tmp_path):
    """An app with basic auth on, LOCAL_FILES_DOCUMENT_ROOT set, and a sync that fails with Label Studio's answer."""
    root = tmp_path / "local-files"
    root.mkdir()
    settings = Settings(label_studio_url=LS, label_studio_api_key="token-1", model_dir=tmp_path / "model",
                        basic_auth_user=USER, basic_auth_pass=PASSWORD, local_files_root=root)

    def failing_sync(project_id, full=None):
        raise LabelStudioError(f"Label Studio answered 500 for project {project_id}: {SECRET}")

    session = requests.Session()
    session.mount("http://", requests_mock.Adapter())
    app = create_app(lambda s: ColourPredictor(), settings, store=ReferenceStore(tmp_path / "refs.sqlite3"),
                     images=ImageLoader(settings, session=session), syncer=failing_sync)
    runtime = app.extensions["dinov"]
    yield app.test_client(), runtime, settings
    runtime.shutdown()


def test_anonymous_health_after_a_failed_sync_shows_state_only(guarded):
    client, runtime, settings = guarded
    runtime.load_model()
    started = client.post("/references?project=7&action=sync", headers={"Authorization": GOOD})
    assert started.status_code == 202, started.json
    assert runtime.queues.wait_idle(timeout=30)
    full = client.get("/health", headers={"Authorization": GOOD})
    assert "CONFIDENTIAL" in json.dumps(full.json)  # the operator, with the credentials, sees the error
    anonymous = client.get("/health")
    assert anonymous.status_code == 200 and anonymous.json["status"] == "UP"
    text = json.dumps(anonymous.json)
    assert "CONFIDENTIAL" not in text and "JOHN-DOE" not in text and "last_error" not in text
    assert str(settings.model_dir) not in text and str(settings.local_files_root) not in text
    assert anonymous.json["model"]["state"] and "pending" in anonymous.json["queues"]["sync"]


def test_anonymous_health_while_the_model_fails_gives_no_error_text(tmp_path):
    secret = str(tmp_path / "secret-dir" / "nowhere.pth")

    def broken(settings):
        raise FileNotFoundError(f"no such checkpoint: {secret}")

    settings = Settings(model_dir=tmp_path, basic_auth_user=USER, basic_auth_pass=PASSWORD, checkpoint=secret)
    app = create_app(broken, settings, store=ReferenceStore(tmp_path / "refs.sqlite3"))
    client = app.test_client()
    try:
        anonymous = client.get("/health")
        for _ in range(300):  # until the failed load is reported
            if anonymous.status_code == 503 and anonymous.json["model"]["state"] == "waiting to retry":
                break
            time.sleep(0.1)
            anonymous = client.get("/health")
        assert anonymous.status_code == 503 and anonymous.json["status"] == "UNAVAILABLE"
        assert "secret-dir" not in json.dumps(anonymous.json) and "log" in anonymous.json["reason"]
        full = client.get("/health", headers={"Authorization": GOOD})
        assert "no such checkpoint" in full.json["reason"]
    finally:
        app.extensions["dinov"].shutdown()


def test_local_files_errors_do_not_show_the_document_root(guarded):
    client, runtime, settings = guarded
    client.post("/setup", json={"project": PROJECT, "schema": CONFIG}, headers={"Authorization": GOOD})
    region = {"id": "k", "type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": 96,
              "original_height": 64, "value": {"x": 10, "y": 10, "width": 1, "keypointlabels": ["Red"]}}
    for path in ("nothing-here.png", "../../etc/passwd"):
        task = {"id": 1, "data": {"image": f"/data/local-files/?d={path}"}}
        answer = client.post("/predict", headers={"Authorization": GOOD}, json={
            "tasks": [task], "project": PROJECT, "label_config": CONFIG, "params": {"context": {"result": [region]}}})
        assert 400 <= answer.status_code < 500, answer.json
        assert str(settings.local_files_root) not in answer.json["error"], answer.json["error"]
        assert "LOCAL_FILES_DOCUMENT_ROOT" in answer.json["error"]


# --- 401 and 403 in the log -----------------------------------------------------------------------------------

def test_refused_credentials_are_logged_with_path_and_client_but_no_credentials(guarded, caplog):
    client, _, _ = guarded
    wrong = "Basic " + base64.b64encode(f"{USER}:guess-Pass".encode()).decode()
    with caplog.at_level(logging.WARNING):
        assert client.post("/setup", json={}, headers={"Authorization": wrong},
                           environ_base={"REMOTE_ADDR": "203.0.113.7"}).status_code == 401
        assert client.get("/metrics", environ_base={"REMOTE_ADDR": "198.51.100.2"}).status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("/setup" in line and "401" in line and "203.0.113.7" in line for line in lines), lines
    assert any("/metrics" in line and "401" in line and "198.51.100.2" in line for line in lines), lines
    assert "guess-Pass" not in caplog.text and wrong.split()[1] not in caplog.text


# --- edge values ------------------------------------------------------------------------------------------

@pytest.fixture
def backend(tmp_path):
    b = Backend(tmp_path, max_request_bytes=4096)
    yield b
    b.runtime.shutdown()


@pytest.mark.parametrize("project", [str(2**63), "9" * 30, "\u0663", "\u0663.1700000000", "-3", "3e2", True])
def test_project_ids_out_of_range_or_not_ascii_are_a_400(backend, project):
    for path, payload in (("/setup", {"project": project, "schema": CONFIG}),
                          ("/predict", {"project": project, "label_config": CONFIG,
                                        "tasks": [{"id": 1, "data": {"image": "/data/upload/7/a.png"}}]}),
                          ("/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": project},
                                        "annotation": {"id": 1, "task": 1, "result": []}, "task": {"id": 1}})):
        answer = backend.post(path, payload)
        assert answer.status_code == 400, (path, answer.json)
    assert backend.client.get(f"/references?project={project}").status_code == 400
    assert backend.client.get(f"/training?project={project}").status_code == 400


def test_largest_project_id_is_accepted(backend):
    answer = backend.post("/setup", {"project": f"{2**63 - 1}.1700000000", "schema": CONFIG})
    assert answer.status_code == 200, answer.json


@pytest.mark.parametrize("params", [{"max_examples_per_label": 1e21}, {"max_examples_per_label": 10**6},
                                    {"predict_time_budget": "Infinity"}, {"predict_time_budget": float("inf")},
                                    {"score_threshold": "NaN"}, {"max_examples_per_label": "\u0663"},
                                    {"min_area": 1.5}, {"polygon_tolerance": 1e300}])
def test_extra_params_out_of_range_are_refused_and_predict_still_works(backend, params):
    answer = backend.post("/setup", {"project": PROJECT, "schema": CONFIG, "extra_params": params})
    assert answer.status_code == 400 and "not valid" in answer.json["error"], answer.json
    # nothing was kept: the project's predictions still work
    assert backend.post("/setup", {"project": PROJECT, "schema": CONFIG}).status_code == 200
    predict = backend.predict([{"id": 1, "data": {"image": "/data/upload/7/a.png"}}])
    assert predict.status_code == 200, predict.json


def test_huge_task_and_annotation_ids_are_not_a_500(backend):
    backend.setup()
    predict = backend.predict([{"id": 2**70, "data": {"image": "/data/upload/7/a.png"}}])
    assert predict.status_code == 200, predict.json
    webhook = backend.post("/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 7},
                                        "annotation": {"id": 2**64, "task": 2**64, "result": []},
                                        "task": {"id": 2**64, "data": {}}})
    assert webhook.status_code < 500, webhook.json


def test_a_chunked_body_over_max_request_bytes_is_a_413(backend):
    body = json.dumps({"tasks": [{"id": 1, "data": {"image": "x" * 8000}}]}).encode()
    answer = backend.client.post("/predict", input_stream=io.BytesIO(body), content_type="application/json",
                                 headers={"Transfer-Encoding": "chunked"},
                                 environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": ""})
    assert answer.status_code == 413, answer.json
    small = json.dumps({"project": PROJECT, "schema": CONFIG}).encode()
    answer = backend.client.post("/setup", input_stream=io.BytesIO(small), content_type="application/json",
                                 headers={"Transfer-Encoding": "chunked"},
                                 environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": ""})
    assert answer.status_code == 200, answer.json
