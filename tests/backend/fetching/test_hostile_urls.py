"""The hostile-URL matrix through the image loader and the HTTP API, on real sockets.

An internal service (a RecordingListener on 127.0.0.1) records every connection; Label Studio's stand-in
serves uploads, a redirect to the internal service and a decompression bomb. Whatever a task's image URL
says, the internal service receives nothing, the token goes nowhere but Label Studio, and the answer is a
clear 4xx (interactive) or `[]` with a logged reason (pre-annotation: Label Studio stores nothing).
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pytest
from PIL import Image

from labelstudio_backend.fetching.images import ImageError, ImageHostError, ImageLoader, ImageTooLargeError
from labelstudio_backend.http.app import create_app
from labelstudio_backend.settings import Settings
from labelstudio_backend.store import ReferenceStore
from tests.backend.fetching.test_image_limits import bomb_png
from tests.support.doubles import SIZE, ColourPredictor, brush
from tests.support.listeners import RecordingListener, http_reply, routes

TOKEN = "hostile0123456789abcdef0123456789abcdef0"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Red"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Red"/></KeyPointLabels>
</View>"""


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE[1], SIZE[0]), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()


# Task image URLs as an attacker writes them; {port} is the internal service's, {ls} Label Studio's host:port.
HOSTILE = [
    "http://127.0.0.1:{port}\\@{ls}/data/upload/7/a.png",
    "http://127.0.0.1:{port}\\\\@{ls}/data/upload/7/a.png",
    "http://127.0.0.1:{port}%5C@{ls}/data/upload/7/a.png",
    "http://127.0.0.1:{port}%5c%5C@{ls}/data/upload/7/a.png",
    "http://{ls}@127.0.0.1:{port}/data/upload/7/a.png",
    "http://user:pass@127.0.0.1:{port}/a.png",
    "http://127.0.0.1:{port}/a.png\t",
    "http://127.0.0.1:{port}\n/a.png",
    "http://127.0.0.1\r\n:{port}/a.png",
    "http://2130706433:{port}/a.png",
    "http://0x7f000001:{port}/a.png",
    "http://0x7f.1:{port}/a.png",
    "http://0177.0.0.1:{port}/a.png",
    "http://127.1:{port}/a.png",
    "http://[::ffff:127.0.0.1]:{port}/a.png",
    "http://[::127.0.0.1]:{port}/a.png",
    "http://[::ffff:7f00:1]:{port}/a.png",
    "http://0.0.0.0:{port}/a.png",
    "http://localhost:{port}/a.png",
    "http://127.0.0.1:{port}/a.png",
    "file:///etc/passwd",
    "file://127.0.0.1:{port}/a.png",
    "/data/upload/7/to-internal.png",  # Label Studio's path, redirected to the internal service
    "/data/upload/7/to-localhost.png",
    "/data/upload/7/to-decimal.png",
    "/data/local-files/?d=../secret.png",  # leaves LOCAL_FILES_DOCUMENT_ROOT
    "/data/local-files/?d=link.png",  # a symlink out of it
]


@pytest.fixture
def internal():
    with RecordingListener("127.0.0.1") as listener:
        yield listener


@pytest.fixture
def label_studio(internal):
    table = {"/data/upload/7/a.png": http_reply(body=png(), headers={"Content-Type": "image/png"}),
             "/data/upload/7/bomb.png": http_reply(body=bomb_png()),
             "/data/upload/7/to-internal.png": http_reply(302, b"", {"Location": f"http://127.0.0.1:{internal.port}/a"}),
             "/data/upload/7/to-localhost.png": http_reply(302, b"", {"Location": f"http://localhost:{internal.port}/"}),
             "/data/upload/7/to-decimal.png": http_reply(302, b"", {"Location": f"http://2130706433:{internal.port}/"})}
    with RecordingListener("127.0.0.1", reply=routes(table)) as server:
        yield server


def settings_for(label_studio, tmp_path, **overrides) -> Settings:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    (tmp_path / "secret.png").write_bytes(png())
    if not (root / "link.png").exists():
        (root / "link.png").symlink_to(tmp_path / "secret.png")
    values = dict(label_studio_url=f"http://127.0.0.1:{label_studio.port}", label_studio_api_key=TOKEN,
                  model_dir=tmp_path / "model_dir", local_files_root=root)
    return Settings(**{**values, **overrides})


def expand(template: str, internal, label_studio) -> str:
    return template.format(port=internal.port, ls=f"127.0.0.1:{label_studio.port}")


def assert_nothing_reached(internal, label_studio) -> None:
    time.sleep(0.1)
    assert internal.connections == []
    for received in label_studio.connections:  # Label Studio itself may be asked, with its own token only
        assert received.headers.get("authorization") in (None, f"Token {TOKEN}")


@pytest.mark.parametrize("allowed_hosts", [(), ("*",)], ids=["no ALLOWED_HOSTS", "ALLOWED_HOSTS=*"])
@pytest.mark.parametrize("template", HOSTILE)
def test_the_loader_refuses_and_reaches_nothing(tmp_path, internal, label_studio, template, allowed_hosts):
    loader = ImageLoader(settings_for(label_studio, tmp_path, allowed_hosts=allowed_hosts))
    with pytest.raises(ImageError) as refused:
        loader.load(expand(template, internal, label_studio), task_id=1)
    assert str(refused.value)  # the reason, for the log
    assert_nothing_reached(internal, label_studio)


def test_the_token_goes_to_label_studio_only(tmp_path, internal, label_studio):
    loader = ImageLoader(settings_for(label_studio, tmp_path))
    assert loader.load("/data/upload/7/a.png").shape == (*SIZE, 3)
    [received] = label_studio.connections
    assert received.headers["authorization"] == f"Token {TOKEN}"
    assert_nothing_reached(internal, label_studio)


def test_a_rebinding_name_is_connected_to_the_address_that_was_checked(tmp_path, internal, label_studio):
    with RecordingListener("127.0.0.2", port=internal.port, reply=routes({"/a.png": http_reply(body=png())})) as good:
        answers = [["127.0.0.2"], ["127.0.0.1"]]
        asked = []

        def resolver(host: str, port: int) -> list[str]:
            asked.append(host)
            return answers.pop(0) if host == "images.rebind.test" else ["127.0.0.1"]

        loader = ImageLoader(settings_for(label_studio, tmp_path, allowed_hosts=("127.0.0.2/32",)), resolver=resolver)
        url = f"http://images.rebind.test:{internal.port}/a.png"
        assert loader.load(url).shape == (*SIZE, 3)
        assert asked == ["images.rebind.test"] and len(good.connections) == 1
        loader = ImageLoader(settings_for(label_studio, tmp_path, allowed_hosts=("127.0.0.2/32",),
                                          model_dir=tmp_path / "other"), resolver=resolver)  # no cache
        with pytest.raises(ImageHostError, match="127.0.0.1"):
            loader.load(url)
    assert_nothing_reached(internal, label_studio)


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path, internal, label_studio):
    loader = ImageLoader(settings_for(label_studio, tmp_path))
    with pytest.raises(ImageTooLargeError, match="refused before decoding"):
        loader.load("/data/upload/7/bomb.png")


# --- the same through the HTTP API --------------------------------------------------------------------------


@pytest.fixture
def app(tmp_path, label_studio):
    settings = settings_for(label_studio, tmp_path)
    store = ReferenceStore(tmp_path / "references.sqlite3")
    predictor = ColourPredictor()
    app = create_app(lambda s: predictor, settings, store=store, images=ImageLoader(settings))
    app.extensions["dinov"].load_model()
    yield app
    app.extensions["dinov"].shutdown()


def test_predict_answers_empty_results_with_a_logged_reason(app, internal, label_studio, caplog):
    client = app.test_client()
    # An example first, so that pre-annotation fetches every task's image.
    example = {"id": 1, "task": 1, "project": 7, "result": [brush(np.ones(SIZE, bool), "Red", "r1")],
               "was_cancelled": False, "ground_truth": False, "completed_by": 1,
               "created_at": "2024-05-01T10:00:00Z", "updated_at": "2024-05-01T10:00:00Z"}
    answer = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": example,
                                           "task": {"id": 1, "data": {"image": "/data/upload/7/a.png"}},
                                           "project": {"id": 7, "label_config": CONFIG}})
    assert answer.status_code == 200, answer.json
    assert app.extensions["dinov"].queues.wait_idle(timeout=30)  # the event applied, its example embedded
    urls = [expand(t, internal, label_studio) for t in HOSTILE] + ["/data/upload/7/bomb.png"]
    tasks = [{"id": 100 + i, "data": {"image": url}} for i, url in enumerate(urls)]
    with caplog.at_level(logging.INFO):
        response = client.post("/predict", json={"tasks": tasks, "project": "7.1700000000", "label_config": CONFIG})
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert len(results) == len(tasks) and all(r == [] for r in results)
    assert caplog.text.count("no prediction") >= len(tasks)  # a reason per task
    assert "refused before decoding" in caplog.text and "backslashes" in caplog.text
    assert_nothing_reached(internal, label_studio)


@pytest.mark.parametrize("template", [HOSTILE[0], HOSTILE[9], HOSTILE[22], "/data/upload/7/bomb.png"])
def test_an_interactive_request_is_a_clear_4xx(app, internal, label_studio, template):
    client = app.test_client()
    click = {"id": "c1", "type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": SIZE[1],
             "original_height": SIZE[0], "is_positive": True, "value": {"x": 50, "y": 50, "width": 1, "keypointlabels": ["Red"]}}
    task = {"id": 1, "data": {"image": expand(template, internal, label_studio)}}
    response = client.post("/predict", json={"tasks": [task], "project": "7.1700000000", "label_config": CONFIG,
                                             "params": {"context": {"result": [click]}}})
    assert 400 <= response.status_code < 500, response.json
    assert response.json["error"]
    assert_nothing_reached(internal, label_studio)
