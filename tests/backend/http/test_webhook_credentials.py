"""The backend's credentials go onto its own Label Studio webhook, and onto no other."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from labelstudio_backend.http.auth import BasicAuth
from labelstudio_backend.http.webhook_credentials import WebhookGuard, points_here


@pytest.mark.parametrize("url, host, path, expected", [
    ("http://dinov:9090/webhook", "dinov:9090", "/webhook", True),
    ("http://DINOV:9090/webhook/", "dinov:9090", "/webhook", True),
    ("http://dinov/webhook", "dinov", "/webhook", True),
    ("https://dinov/webhook", "dinov", "/webhook", True),
    ("https://dinov:443/webhook", "dinov", "/webhook", True),
    ("http://dinov:9090/prefix/webhook", "dinov:9090", "/prefix/webhook", True),
    ("http://dinov:9091/webhook", "dinov:9090", "/webhook", False),  # another port
    ("http://dinov:9090/webhook", "dinov", "/webhook", False),
    ("http://evil:9090/webhook", "dinov:9090", "/webhook", False),  # another host
    ("http://dinov:9090/other", "dinov:9090", "/webhook", False),
    ("http://dinov:9090/webhook?x=1", "dinov:9090", "/webhook", False),
    ("http://u:p@dinov:9090/webhook", "dinov:9090", "/webhook", False),
    ("ftp://dinov:9090/webhook", "dinov:9090", "/webhook", False),
    ("http://127.0.0.1:9090/webhook", "127.0.0.1:9090", "/webhook", True),
    ("http://[::1]:9090/webhook", "[::1]:9090", "/webhook", True),
])
def test_points_here(url, host, path, expected):
    assert points_here(url, host, path) is expected


class FakeLabelStudio:
    """The two webhook calls of Label Studio's API, in memory (the e2e tests use the real one)."""

    def __init__(self, hooks: list[dict], patch_status: int = 200):
        self.hooks = hooks
        self.patch_status = patch_status
        self.calls: list[tuple] = []

    def request(self, method, path, params=None, json=None, timeout=None):
        assert timeout and timeout < 3  # Label Studio waits 3 s for /setup
        if method == "GET":
            self.calls.append(("GET", path, params))
            found = [h for h in self.hooks if h["project"] == params["project"]]
            return SimpleNamespace(status_code=200, json=lambda: found, text="")
        self.calls.append((method, path, json))
        if self.patch_status == 200:
            hook = next(h for h in self.hooks if path == f"/api/webhooks/{h['id']}/")
            hook.update(json)
        return SimpleNamespace(status_code=self.patch_status, text="denied")


AUTH = BasicAuth("ls", "pw")


def hook(id_, url, project=3, headers=None, actions=()):
    return {"id": id_, "url": url, "project": project, "headers": headers or {}, "actions": list(actions)}


def test_only_this_backends_webhooks_get_the_header_keeping_other_headers_and_actions():
    ls = FakeLabelStudio([hook(1, "http://dinov:9090/webhook", headers={"X-Team": "a", "authorization": "old"}),
                          hook(2, "http://other:9090/webhook"),
                          hook(3, "http://dinov:9090/webhook", actions=["ANNOTATION_CREATED"]),
                          hook(4, "http://dinov:9090/webhook", project=4)])
    clock = [0.0]
    guard = WebhookGuard(ls, AUTH, clock=lambda: clock[0])
    assert guard.ensure(3, "dinov:9090") == [1, 3]
    assert ls.hooks[0]["headers"] == {"X-Team": "a", "Authorization": AUTH.authorization_header()}
    assert ls.hooks[1]["headers"] == {}  # another host never gets the credentials
    assert ls.hooks[2]["actions"] == ["ANNOTATION_CREATED"]
    assert ls.hooks[3]["headers"] == {}  # another project
    calls = len(ls.calls)
    assert guard.ensure(3, "dinov:9090") == []  # known good: no API call
    assert len(ls.calls) == calls
    clock[0] += 601
    assert guard.ensure(3, "dinov:9090") == []  # checked again, nothing to change
    assert [c[0] for c in ls.calls[calls:]] == ["GET"]


def test_a_webhook_that_does_not_exist_yet_is_looked_for_at_the_next_setup():
    ls = FakeLabelStudio([])
    guard = WebhookGuard(ls, AUTH)
    assert guard.ensure(3, "dinov:9090") == []
    ls.hooks.append(hook(7, "http://dinov:9090/webhook"))
    assert guard.ensure(3, "dinov:9090") == [7]


def test_a_refused_patch_is_logged_and_setup_goes_on(caplog):
    ls = FakeLabelStudio([hook(1, "http://dinov:9090/webhook")], patch_status=403)
    clock = [0.0]
    guard = WebhookGuard(ls, AUTH, clock=lambda: clock[0])
    assert guard.ensure(3, "dinov:9090") == []
    assert "webhooks.change" in caplog.text and "pw" not in caplog.text
    calls = len(ls.calls)
    guard.ensure(3, "dinov:9090")  # not again right away
    assert len(ls.calls) == calls
    clock[0] += 61
    guard.ensure(3, "dinov:9090")
    assert len(ls.calls) > calls
