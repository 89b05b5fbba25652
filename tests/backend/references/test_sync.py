"""The Label Studio client (labelstudio_backend/fetching/labelstudio_client.py) and the reference sync (sync.py), against
the fake Label Studio of tests/support/doubles.py and a mocked session."""

from __future__ import annotations

import time

import jwt
import pytest
import requests
import requests_mock

from labelstudio_backend.errors import LabelStudioError
from labelstudio_backend.fetching.labelstudio_client import LabelStudioClient, is_personal_access_token
from labelstudio_backend.references.sync import sync_project
from labelstudio_backend.store import ReferenceStore
from tests.support.doubles import TOKEN, brush, make_project, scene

LS = "http://ls.example:8080"


def _jwt(kind: str, exp: float) -> str:
    return jwt.encode({"token_type": kind, "exp": int(exp)}, "a-test-signing-key-of-32-bytes!!", algorithm="HS256")


def mocked_client(api_key: str, **kwargs) -> tuple[LabelStudioClient, requests_mock.Adapter]:
    session = requests.Session()
    adapter = requests_mock.Adapter()
    session.mount("http://", adapter)
    return LabelStudioClient(LS, api_key, session=session, **kwargs), adapter


# --- the client -------------------------------------------------------------------------------------------

def test_one_rule_tells_a_personal_access_token_from_a_legacy_one():
    assert is_personal_access_token(_jwt("refresh", time.time() + 60))
    assert not is_personal_access_token("0123456789abcdef0123456789abcdef01234567")
    assert not is_personal_access_token("eyJ.not.ajwt")  # looks like one by its prefix, but does not parse
    assert not is_personal_access_token("")


def test_legacy_token_is_sent_as_token():
    client, adapter = mocked_client("legacy-123")
    adapter.register_uri("GET", LS + "/api/projects/1/", json={"id": 1},
                         request_headers={"Authorization": "Token legacy-123"})
    assert client.project(1) == {"id": 1}


def test_personal_access_token_is_exchanged_renewed_and_verify_ssl_honoured():
    refresh = _jwt("refresh", time.time() + 3600)
    first, second = _jwt("access", time.time() + 300), _jwt("access", time.time() + 600)
    client, adapter = mocked_client(refresh, verify=False)
    exchange = adapter.register_uri("POST", LS + "/api/token/refresh/", [{"json": {"access": first}},
                                                                         {"json": {"access": second}}])

    def answer(request, context):
        if request.headers.get("Authorization") != f"Bearer {second}":
            context.status_code = 401  # the first access token was revoked early
            return {}
        return {"id": 1}

    adapter.register_uri("GET", LS + "/api/projects/1/", json=answer)
    assert client.project(1) == {"id": 1}
    assert exchange.call_count == 2 and exchange.request_history[0].json() == {"refresh": refresh}
    assert all(request.verify is False for request in adapter.request_history)


def test_refused_token_names_the_variable():
    client, adapter = mocked_client(_jwt("refresh", time.time() + 60))
    adapter.register_uri("POST", LS + "/api/token/refresh/", status_code=401, json={"detail": "invalid"})
    with pytest.raises(LabelStudioError, match="personal access token in LABEL_STUDIO_API_KEY"):
        client.project(1)
    legacy, adapter = mocked_client("wrong")
    adapter.register_uri("GET", LS + "/api/projects/1/", status_code=401)
    with pytest.raises(LabelStudioError, match="401.*LABEL_STUDIO_API_KEY"):
        legacy.project(1)


def test_the_token_only_goes_to_label_studios_origin():
    client, _ = mocked_client("legacy-123")
    assert client.is_label_studio_url(LS + "/data/upload/1/a.png")
    assert not client.is_label_studio_url("http://ls.example:9000/a.png")
    assert not client.is_label_studio_url("https://ls.example:8080/a.png")
    assert LabelStudioClient("http://ls", "k").is_label_studio_url("http://ls:80/x")
    with pytest.raises(LabelStudioError, match="origin"):
        client.send("GET", "http://elsewhere.example/a.png")
    assert not LabelStudioClient("", "k").is_label_studio_url(LS)


# --- the sync ---------------------------------------------------------------------------------------------

def test_full_then_incremental_sync(ls, tmp_path):
    make_project(ls, unlabeled=2)
    store = ReferenceStore(tmp_path / "r.sqlite3")
    first = sync_project(store, ls.url, TOKEN, 3, page_size=2)
    assert first.full and (first.added, first.removed) == (2, 0) and first.pages >= 2
    assert store.stats(3)["examples_per_label"] == {"Blue": 1, "Red": 1}
    image, masks = scene(7)
    ls.annotate(10, [brush(masks["Red"], "Red", "r7")])  # a new annotation on a task listed before
    second = sync_project(store, ls.url, TOKEN, 3, page_size=2)
    assert not second.full and (second.added, second.unchanged) == (1, 2)
    assert store.stats(3)["examples_per_label"] == {"Blue": 1, "Red": 2}


def test_a_project_gone_from_label_studio_is_dropped(ls, tmp_path):
    make_project(ls, unlabeled=1)
    store = ReferenceStore(tmp_path / "r.sqlite3")
    sync_project(store, ls.url, TOKEN, 3)
    ls.projects.pop(3)
    report = sync_project(store, ls.url, TOKEN, 3)
    assert report.project_deleted and store.stats(3)["examples"] == 0


def test_a_wrong_token_is_an_error_that_names_the_variable(ls, tmp_path):
    make_project(ls, unlabeled=1)
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_API_KEY"):
        sync_project(ReferenceStore(tmp_path / "r.sqlite3"), ls.url, "0" * 40, 3)
