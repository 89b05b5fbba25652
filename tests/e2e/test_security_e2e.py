"""End to end with basic auth on: a real Label Studio 1.23.2 and this backend under gunicorn.

Every flow still works with credentials (connect, an annotation reaching the store through the webhook
Label Studio created, Retrieve predictions, an interactive click, Start Training); requests without them
are refused; a hostile task URL reaches nothing.
"""

from __future__ import annotations

import base64
import time

import pytest
import requests

from tests.support.listeners import RecordingListener  # tests/ is on sys.path (rootdir conftest)

from .labelstudio import brush_region, keypoint_region, wait_for
from .test_labelstudio_e2e import _require_demo_model, config, square_image

pytestmark = pytest.mark.e2e

USER, PASSWORD = "label-studio", "e2e backend pass"
AUTH = (USER, PASSWORD)
REQUEST_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def secured(backend_factory):
    """The backend with basic auth on, and a small request body limit."""
    return backend_factory(BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD, MAX_REQUEST_BYTES=str(REQUEST_LIMIT))


def connect(ls, project_id: int, url: str, user: str = USER, password: str = PASSWORD) -> dict:
    """Connect the model the way the UI does with "Authentication method: Basic Auth"."""
    return ls.call("POST", "/api/ml", json={"url": url, "project": project_id, "is_interactive": True, "title": "DINOv",
                                            "auth_method": "BASIC_AUTH", "basic_auth_user": user,
                                            "basic_auth_pass": password})


def examples(backend, project_id: int) -> dict:
    response = requests.get(f"{backend.url}/references", params={"project": project_id}, auth=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["examples_per_label"]


def metric(backend, name: str) -> float:
    """A sample of the backend's /metrics (0 when absent)."""
    text = requests.get(f"{backend.url}/metrics", auth=AUTH, timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_every_endpoint_but_health_needs_the_credentials(secured):
    assert requests.get(f"{secured.url}/health", timeout=10).status_code == 200
    wrong = "Basic " + base64.b64encode(f"{USER}:nope".encode()).decode()
    non_ascii = "Basic " + base64.b64encode("l\u00e4bel:p\u00e4ss".encode()).decode()
    for method, path in [("GET", "/"), ("POST", "/setup"), ("POST", "/predict"), ("POST", "/webhook"),
                         ("POST", "/train"), ("GET", "/metrics"), ("GET", "/references?project=1"),
                         ("POST", "/references?project=1&action=sync")]:
        for headers in ({}, {"Authorization": wrong}, {"Authorization": non_ascii},
                        {"Authorization": "Basic \u00e4\u00e4\u00e4"}, {"Authorization": "Bearer x"}):
            response = requests.request(method, secured.url + path, json={}, headers=headers, timeout=10)
            assert response.status_code == 401, (method, path, headers, response.status_code, response.text)
            assert response.json()["status"] == 401 and response.json()["error"]
            assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(f"{secured.url}/metrics", auth=AUTH, timeout=10).status_code == 200


def test_a_body_over_the_limit_is_a_413(secured):
    response = requests.post(f"{secured.url}/predict", data=b"x" * (REQUEST_LIMIT + 1), auth=AUTH, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert "MAX_REQUEST_BYTES" in response.json()["error"]


def test_label_studio_without_the_credentials_cannot_connect(ls, secured):
    project = ls.create_project(config(["Cat"]))
    response = ls.session.post(f"{ls.url}/api/ml", json={"url": secured.url, "project": project["id"]}, timeout=60)
    # /health asks Label Studio for the credentials: a 401 there is what Label Studio reports as an authentication
    # failure (ml/serializers.py _validate_healthcheck), not as "doesn't look like a valid ML backend"
    assert response.status_code == 400, response.text
    assert "authentication parameters were either not provided or are incorrect" in response.text, response.text
    assert ls.webhooks(project["id"]) == []


def test_every_flow_works_with_basic_auth(ls, secured):
    project = ls.create_project(config(["Cat", "Dog"]))
    pid = project["id"]
    (image_a, mask_a), (image_b, _), (image_c, mask_c) = square_image(0), square_image(10), square_image(20)
    tasks = ls.upload_images(pid, {"a.png": image_a, "b.png": image_b, "c.png": image_c})

    ml = connect(ls, pid, secured.url)
    assert ml["state"] == "CO", ml
    # The backend put its credentials on the webhook Label Studio created for it.
    [hook] = ls.webhooks(pid)
    assert hook["url"] == f"{secured.url}/webhook"
    assert hook["headers"] == {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}

    # An annotation reaches the store through that webhook (its event passed basic auth: no sync brought it).
    events = 'dinov_webhooks_total{event="ANNOTATION_CREATED"}'
    refused = 'dinov_requests_total{endpoint="/webhook",method="POST",status="401"}'
    before = metric(secured, events), metric(secured, refused)
    ls.create_annotation(tasks["a.png"]["id"], [brush_region(mask_a, "Cat")])
    wait_for(lambda: examples(secured, pid) == {"Cat": 1}, timeout=60, what="the annotation through the webhook")
    assert (metric(secured, events), metric(secured, refused)) == (before[0] + 1, before[1])

    # Retrieve predictions: /predict with basic auth, one stored prediction per task.
    _require_demo_model()
    answer = ls.retrieve_predictions(pid, [tasks["b.png"]["id"]])
    assert answer["processed_items"] == 1
    wait_for(lambda: ls.predictions(tasks["b.png"]["id"]), timeout=300, what="a prediction for b.png")

    # An interactive click.
    click = keypoint_region(15, 20, (48, 64), "Cat")
    answer = ls.interactive(ml["id"], tasks["b.png"]["id"], {"result": [click]})
    assert "errors" not in answer, answer
    assert isinstance(answer["data"]["result"], list)

    # Start Training: START_TRAINING reaches /webhook with Label Studio's basic auth and syncs what the webhook
    # did not deliver (it was off meanwhile).
    ls.set_webhook_active(hook["id"], False)
    ls.create_annotation(tasks["c.png"]["id"], [brush_region(mask_c, "Dog")])
    ls.set_webhook_active(hook["id"], True)
    assert examples(secured, pid) == {"Cat": 1}
    ls.start_training(ml["id"])
    wait_for(lambda: examples(secured, pid) == {"Cat": 1, "Dog": 1}, timeout=60, what="the sync of Start Training")


def test_a_hostile_task_url_reaches_nothing(ls, secured, label_studio_url):
    with RecordingListener("127.0.0.1") as internal:
        project = ls.create_project(config(["Cat"]))
        pid = project["id"]
        ls_netloc = label_studio_url.split("://", 1)[1]
        hostile = [f"http://127.0.0.1:{internal.port}\\@{ls_netloc}/data/upload/x.png",
                   f"http://127.0.0.1:{internal.port}\\\\@{ls_netloc}/data/upload/x.png",
                   f"http://{ls_netloc}@127.0.0.1:{internal.port}/data/upload/x.png",
                   f"http://2130706433:{internal.port}/x.png", f"http://localhost:{internal.port}/x.png",
                   f"http://[::ffff:127.0.0.1]:{internal.port}/x.png", "file:///etc/passwd"]
        ls.import_tasks(pid, [{"image": url} for url in hostile])
        task_ids = [t["id"] for t in ls.tasks(pid)]
        connect(ls, pid, secured.url)
        ls.retrieve_predictions(pid, task_ids)
        answer = requests.post(f"{secured.url}/predict", auth=AUTH, timeout=120, json={
            "tasks": [{"id": 10_000 + i, "data": {"image": url}} for i, url in enumerate(hostile)],
            "project": f"{pid}.0", "label_config": config(["Cat"])})
        assert answer.status_code in (200, 422), answer.text
        if answer.status_code == 200:
            assert all(r["result"] == [] for r in answer.json()["results"]), answer.text
        time.sleep(0.5)
        assert internal.connections == []
