"""Basic auth: user and password compared together in constant time; malformed headers are 401s, not 500s."""

from __future__ import annotations

import base64

import pytest

from labelstudio_backend.http.auth import AuthFailed, BasicAuth, exposed_addresses, exposure_warning
from labelstudio_backend.settings import validate_credentials
from tests.support.paths import REPO_ROOT


def basic(raw: bytes | str) -> str:
    raw = raw.encode("latin-1") if isinstance(raw, str) else raw
    return "Basic " + base64.b64encode(raw).decode()


def test_the_right_credentials_pass():
    auth = BasicAuth("label-studio", "s3cret pass!")
    auth.check(basic("label-studio:s3cret pass!"))
    auth.check("basic   " + base64.b64encode(b"label-studio:s3cret pass!").decode())  # scheme in any case
    auth.check(auth.authorization_header())
    assert "s3cret" not in repr(auth)


@pytest.mark.parametrize("header, message", [
    (None, "basic auth required"),
    ("", "basic auth required"),
    ("Bearer abc", "must be 'Basic"),
    ("Basic", "must be 'Basic"),
    ("Basic !!!!", "not base64"),
    ("Basic " + base64.b64encode(b"no-colon").decode(), "no ':'"),
    ("Basic dXNlcjpw\u00e4c3M=", "not base64"),  # non-ASCII inside the header value
    ("Basic \u043f\u0430\u0440", "not base64"),
    (basic("label-studio:wrong"), "wrong user or password"),
    (basic("wrong:s3cret"), "wrong user or password"),
    (basic("label-studio:s3cret:extra"), "wrong user or password"),
    (basic(b"label-studio:\xff\xfe"), "wrong user or password"),  # bytes that are no text at all
    (basic("label-studio:s3cr\u00e9t"), "wrong user or password"),
])
def test_refusals_say_what_is_wrong(header, message):
    auth = BasicAuth("label-studio", "s3cret")
    with pytest.raises(AuthFailed, match=message):
        auth.check(header)


@pytest.mark.parametrize("user, password, message", [
    ("", "x", "BASIC_AUTH_USER is empty"),
    ("u", "", "BASIC_AUTH_PASS is empty"),
    ("a:b", "x", "must not contain ':'"),
    ("u", "p\u00e4ss", "printable ASCII"),
    ("u", "p\nass", "printable ASCII"),
])
def test_credentials_that_label_studio_cannot_send_are_refused_at_start(user, password, message):
    with pytest.raises(ValueError, match=message):
        validate_credentials(user, password)


def test_user_and_password_are_compared_together_in_one_constant_time_comparison(monkeypatch):
    """Whatever is wrong (user, password, both), exactly one compare_digest of two equal-length digests runs:
    no early exit on the user name, no length leak."""
    import labelstudio_backend.http.auth as auth_module

    calls = []
    real = auth_module.hmac.compare_digest
    monkeypatch.setattr(auth_module.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    auth = BasicAuth("label-studio", "s3cret")
    for header in (basic("label-studio:wrong"), basic("x:s3cret"), basic("x" * 500 + ":y"), basic("label-studio:s3cret")):
        try:
            auth.check(header)
        except AuthFailed:
            pass
    assert calls == [(32, 32)] * 4


@pytest.mark.parametrize("listen, exposed", [
    (["127.0.0.1:9090"], []), (["localhost:9090"], []), (["[::1]:9090"], []), (["unix:/run/dinov.sock"], []), (["/run/dinov.sock"], []), (["\0abstract"], []),
    ([("127.0.0.1", 9090)], []),
    (["0.0.0.0:9090"], ["0.0.0.0:9090"]), (["[::]:9090"], ["[::]:9090"]), ([("10.0.0.5", 9090)], ["10.0.0.5:9090"]),
    ([":9090"], ["0.0.0.0:9090"]), (["backend.internal:9090"], ["backend.internal:9090"]),
])
def test_exposed_addresses(listen, exposed):
    assert exposed_addresses(listen) == exposed


def test_exposure_warning_only_without_credentials():
    assert "BASIC_AUTH_USER" in exposure_warning(["0.0.0.0:9090"], protected=False)
    assert exposure_warning(["0.0.0.0:9090"], protected=True) is None
    assert exposure_warning(["127.0.0.1:9090"], protected=False) is None


def test_gunicorn_warns_at_start_when_listening_beyond_loopback_without_credentials(monkeypatch):
    import importlib.util
    import socket
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("gunicorn_conf", REPO_ROOT / "gunicorn.conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        monkeypatch.delenv(name, raising=False)

    def warnings_for(host: str) -> list[str]:
        with socket.socket() as sock:
            sock.bind((host, 0))
            logged: list[str] = []
            server = SimpleNamespace(LISTENERS=[SimpleNamespace(sock=sock)],
                                     log=SimpleNamespace(warning=logged.append))
            conf.when_ready(server)
            return logged

    assert warnings_for("127.0.0.1") == []
    [warning] = warnings_for("0.0.0.0")
    assert "without credentials" in warning and "BASIC_AUTH_USER" in warning
    monkeypatch.setenv("BASIC_AUTH_USER", "ls")
    monkeypatch.setenv("BASIC_AUTH_PASS", "pw")
    assert warnings_for("0.0.0.0") == []
