"""The token goes to Label Studio's media paths only (issue 20, item 7), on real sockets.

Label Studio's stand-in is a RecordingListener that keeps every request it receives. A task image that names
Label Studio's API ("/api/projects/") was fetched with the token, and the error ("not an image (23 bytes)")
told the API's answer's size; now a relative non-media path is refused before any connection, and an absolute
URL or a redirect to a non-media path of Label Studio is requested without the token.
"""

from __future__ import annotations

import time

import pytest

from labelstudio_backend.fetching.images import ImageError, ImageHostError, ImageLoader
from labelstudio_backend.labelstudio.media import is_media_path
from labelstudio_backend.settings import Settings
from tests.backend.fetching.test_hostile_urls import TOKEN, png
from tests.support.listeners import RecordingListener, http_reply, routes

API_ANSWER = b'[{"id": 1, "title": "patients"}]'


@pytest.fixture
def label_studio():
    table = {"/data/upload/7/a.png": http_reply(body=png(), headers={"Content-Type": "image/png"}),
             "/data/upload/7/to-api.png": http_reply(302, b"", {"Location": "/api/projects/"}),
             "/tasks/9/resolve/": http_reply(body=png(), headers={"Content-Type": "image/png"}),
             "/api/projects/": http_reply(body=API_ANSWER, headers={"Content-Type": "application/json"})}
    with RecordingListener("127.0.0.1", reply=routes(table)) as server:
        yield server


def loader_for(label_studio, tmp_path) -> ImageLoader:
    return ImageLoader(Settings(label_studio_url=f"http://127.0.0.1:{label_studio.port}",
                                label_studio_api_key=TOKEN, model_dir=tmp_path))


def requests_seen(label_studio) -> list[tuple[str, str | None]]:
    time.sleep(0.1)  # the listener records the request head a moment after the answer
    return [(r.request_line.split(" ")[1], r.headers.get("authorization")) for r in label_studio.connections]


@pytest.mark.parametrize("path", ["/api/projects/", "/api/projects/?page=1", "/data/upload/7/../../api/projects/",
                                  "/data/upload/%2e%2e/%2e%2e/api/projects/", "/data/upload/", "/user/login/",
                                  "upload/../api/projects/"])
def test_a_non_media_path_of_label_studio_is_refused_before_any_request(label_studio, tmp_path, path):
    with pytest.raises(ImageHostError, match="media paths"):
        loader_for(label_studio, tmp_path).load(path, task_id=1)
    assert requests_seen(label_studio) == []


def test_an_absolute_url_to_the_api_goes_without_the_token(label_studio, tmp_path):
    with pytest.raises(ImageError):
        loader_for(label_studio, tmp_path).load(f"http://127.0.0.1:{label_studio.port}/api/projects/", task_id=1)
    assert requests_seen(label_studio) == [("/api/projects/", None)]


def test_a_redirect_from_a_media_path_to_the_api_drops_the_token(label_studio, tmp_path):
    with pytest.raises(ImageError):
        loader_for(label_studio, tmp_path).load("/data/upload/7/to-api.png", task_id=1)
    assert requests_seen(label_studio) == [("/data/upload/7/to-api.png", f"Token {TOKEN}"), ("/api/projects/", None)]


def test_media_paths_get_the_token(label_studio, tmp_path):
    loader = loader_for(label_studio, tmp_path)
    loader.load("/data/upload/7/a.png", task_id=1)
    loader.load(f"http://127.0.0.1:{label_studio.port}/tasks/9/resolve/?fileuri=czM6Ly9iL2EucG5n", task_id=9)
    assert requests_seen(label_studio) == [("/data/upload/7/a.png", f"Token {TOKEN}"),
                                           ("/tasks/9/resolve/?fileuri=czM6Ly9iL2EucG5n", f"Token {TOKEN}")]


def test_media_paths_of_label_studio_1_23_2():
    for path in ("/data/upload/7/a.png", "/data/local-files/", "/storage-data/uploaded/", "/tasks/3/resolve/",
                 "/tasks/3/presign/", "/projects/3/resolve/", "/projects/3/presign/"):
        assert is_media_path(path), path
        assert is_media_path("/ls" + path, "/ls/"), path
        assert not is_media_path(path, "/ls"), path
    for path in ("/api/projects/", "/api/tasks/3/", "/data/upload/", "/tasks/x/resolve/", "//evil/data/upload/1/a",
                 "/data/upload/1/../../../api/projects/", "/projects/3/", "/data/upload/1/a.png\\..\\x"):
        assert not is_media_path(path), path
