"""url_policy and safe_http: hostile URLs reach nothing, the token stays with Label Studio, downloads are bounded.

Every network rule is checked against real sockets on loopback addresses: an "internal service" is a
RecordingListener on 127.0.0.1 that records every connection it accepts, so "it received nothing" can fail.
"""

from __future__ import annotations

import ipaddress
import time

import pytest
import requests

from labelstudio_backend.fetching.safe_http import FetchError, TooLarge, fetch, safe_session
from labelstudio_backend.url_policy import HostPolicy, URLRefused, check_url, is_public
from tests.support.listeners import RecordingListener, drip, http_reply, routes, tls_server_context

TOKEN = "Token secret-label-studio-token"


def ls_headers() -> dict[str, str]:
    return {"Authorization": TOKEN}


class Resolver:
    """An injectable DNS: answers from a table (a list of answers is used in turn), counts the questions."""

    def __init__(self, table: dict[str, list[str] | list[list[str]]]):
        self.table = table
        self.asked: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        answer = self.table.get(host)
        if answer is None:
            raise OSError(f"no such host {host}")
        if answer and isinstance(answer[0], list):
            return answer.pop(0) if len(answer) > 1 else answer[0]
        return answer


@pytest.fixture
def internal():
    """The internal service a hostile URL tries to reach."""
    with RecordingListener("127.0.0.1") as listener:
        yield listener


@pytest.fixture
def label_studio():
    """Label Studio's stand-in on 127.0.0.1, as http://ls.test:<port>; /data/upload/ok.png answers 'image'."""
    with RecordingListener("127.0.0.1", reply=routes({"/data/upload/ok.png": http_reply(body=b"image")})) as server:
        yield server


def policy_for(label_studio: RecordingListener | None, allowed=(), table=None) -> tuple[HostPolicy, Resolver]:
    resolver = Resolver({"ls.test": ["127.0.0.1"], **(table or {})})
    url = f"http://ls.test:{label_studio.port}" if label_studio else ""
    return HostPolicy.from_settings(url, allowed, resolver=resolver), resolver


# --- the syntax rules --------------------------------------------------------------------------------------


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:9\\@ls.test:8080/data/upload/x.png", "backslash"),
    ("http://127.0.0.1:9\\\\@ls.test:8080/data/upload/x.png", "backslash"),
    ("http:\\\\ls.test/x.png", "backslash"),
    ("http://127.0.0.1:9%5C@ls.test:8080/x.png", "user info"),
    ("http://ls.test%5Cevil/x.png", "percent-escapes"),
    ("http://ls.test%2F@127.0.0.1/x.png", "user info"),
    ("http://user:pass@ls.test:8080/x.png", "user info"),
    ("http://ls.test:8080@127.0.0.1:9/x.png", "user info"),
    ("http://ls.te\tst/x.png", "whitespace"),
    ("http://ls.test/x.png\n", "whitespace"),
    ("http://ls.test/a\r\nHost: evil/x.png", "whitespace"),
    (" http://ls.test/x.png", "whitespace"),
    ("http://ls.test /x.png", "whitespace"),
    ("http://ls.test/x.png\x0b", "whitespace"),
    ("http://ls.test/\x00.png", "control"),
    ("http://ls.test\u3000/x.png", "whitespace"),
    ("file:///etc/passwd", "only absolute http"),
    ("ftp://ls.test/x.png", "only absolute http"),
    ("//ls.test/x.png", "only absolute http"),
    ("http:/ls.test/x.png", "only absolute http"),
    ("http://ls.test:0/x.png", "not a TCP port"),
    ("http://ls.test:99999/x.png", "not a valid URL"),
    ("http://[fe80::1%25eth0]/x.png", "percent-escapes"),
    ("http://ex\u00e4mple.com/x.png", "not ASCII"),
    ("http:///x.png", "not a valid host"),
    ("http://a..b/x.png", "not a valid host"),
])
def test_syntax_refusals(url, message):
    with pytest.raises(URLRefused, match=message):
        check_url(url)


def test_the_checked_url_is_rebuilt_from_its_parts():
    checked = check_url("HTTP://LS.Test:80/data/upload/a b%20c.png?x=1#frag")
    assert (checked.scheme, checked.host, checked.port) == ("http", "ls.test", 80)
    assert checked.url == "http://ls.test/data/upload/a%20b%20c.png?x=1"  # the fragment is never sent
    assert check_url("https://[::1]:8443").url == "https://[::1]:8443/"
    assert check_url(checked.url) == checked  # a fixed point: what is checked is what is requested


# --- the address rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize("address, public", [
    ("93.184.216.34", True), ("2606:2800:220:1::1", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("169.254.169.254", False), ("0.0.0.0", False),
    ("100.64.0.1", False), ("224.0.0.1", False), ("255.255.255.255", False),
    ("::1", False), ("::", False), ("fe80::1", False), ("fc00::1", False), ("ff02::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:93.184.216.34", True), ("::127.0.0.1", False),
    ("2002:7f00:1::", False), ("64:ff9b::a00:1", False), ("64:ff9b:1::1", False), ("fec0::1", False),
])
def test_public_addresses(address, public):
    assert is_public(ipaddress.ip_address(address)) is public


# Spellings of loopback and "this host" that must be judged by the address they reach. The wildcard "*"
# allows any host with public addresses, so only the address check can refuse them.
LOOPBACK_SPELLINGS = ["127.0.0.1", "2130706433", "0x7f000001", "0x7f.1", "0177.0.0.1", "127.1", "0.0.0.0",
                      "localhost", "[::ffff:127.0.0.1]", "[::127.0.0.1]", "[::1]", "[::ffff:7f00:1]"]


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
def test_internal_addresses_reach_nothing_and_never_get_the_token(internal, label_studio, spelling):
    policy = HostPolicy.from_settings(f"http://127.0.0.1:{label_studio.port}", ["*"])  # the system resolver
    session = safe_session(policy)
    url = f"http://{spelling}:{internal.port}/data/upload/x.png"
    with pytest.raises(URLRefused, match="not a public address|not a valid host"):
        fetch(session, url, policy=policy, timeout=5, max_bytes=1 << 20, label_studio_headers=ls_headers, public_ok=True)
    with pytest.raises(URLRefused):
        session.get(url, headers={"Authorization": TOKEN}, timeout=5)
    time.sleep(0.1)
    assert internal.connections == []


@pytest.mark.parametrize("template", [
    "http://127.0.0.1:{port}\\@ls.test:{ls}/data/upload/x.png",
    "http://127.0.0.1:{port}\\\\@ls.test:{ls}/data/upload/x.png",
    "http://127.0.0.1:{port}%5C@ls.test:{ls}/data/upload/x.png",
    "http://127.0.0.1:{port}%5c%5c@ls.test:{ls}/data/upload/x.png",
    "http://ls.test:{ls}@127.0.0.1:{port}/data/upload/x.png",
    "http://127.0.0.1:{port}#@ls.test:{ls}/data/upload/x.png",
    "http://127.0.0.1:{port}?@ls.test:{ls}/data/upload/x.png",
    "http://127.0.0.1\t:{port}/data/upload/x.png",
    "http://127.0.0.1:{port}/data/upload/x.png\r\nX: y",
    "http://127.0.0.1:{port}/data/upload/x.png",  # plainly another host than Label Studio
    "https://ls.test:{ls}/data/upload/x.png",  # Label Studio's host, another scheme: another origin
])
def test_hostile_forms_reach_nothing(internal, label_studio, template):
    policy, _ = policy_for(label_studio)
    session = safe_session(policy)
    url = template.format(port=internal.port, ls=label_studio.port)
    with pytest.raises((URLRefused, FetchError)):
        fetch(session, url, policy=policy, timeout=5, max_bytes=1 << 20, label_studio_headers=ls_headers)
    # The adapter alone (plain requests use, requests' own URL preparation) refuses as well.
    with pytest.raises((URLRefused, requests.exceptions.InvalidURL)):
        session.get(url, headers={"Authorization": TOKEN}, timeout=5)
    time.sleep(0.1)
    assert internal.connections == []
    assert all("authorization" not in r.headers for r in label_studio.connections)


def test_label_studio_gets_the_token_on_its_exact_origin(label_studio):
    policy, resolver = policy_for(label_studio)
    body = fetch(safe_session(policy), f"http://LS.test:{label_studio.port}/data/upload/ok.png", policy=policy, timeout=5,
                 max_bytes=100, label_studio_headers=ls_headers)
    assert body == b"image"
    [received] = label_studio.connections
    assert received.headers["authorization"] == TOKEN
    assert received.headers["host"] == f"ls.test:{label_studio.port}"
    assert resolver.asked == ["ls.test"]


def test_credentials_are_refused_for_other_origins(internal, label_studio):
    policy, _ = policy_for(label_studio, allowed=["cdn.test"], table={"cdn.test": ["127.0.0.1"]})
    session = safe_session(policy)
    with pytest.raises(URLRefused, match="credentials"):
        session.get(f"http://cdn.test:{internal.port}/a.png", headers={"Authorization": TOKEN}, timeout=5)
    assert internal.connections == []
    # the same host without credentials is allowed by name
    assert session.get(f"http://cdn.test:{internal.port}/a.png", timeout=5).status_code == 200
    assert len(internal.connections) == 1 and "authorization" not in internal.connections[0].headers


# --- redirects ---------------------------------------------------------------------------------------------


REDIRECT_TARGETS = ["http://127.0.0.1:{port}/steal", "http://localhost:{port}/steal", "http://2130706433:{port}/",
                    "http://[::ffff:127.0.0.1]:{port}/", "http://0.0.0.0:{port}/", "http://127.0.0.1:{port}\\@x/",
                    "//127.0.0.1:{port}/steal", "http://u:p@127.0.0.1:{port}/", "file:///etc/passwd"]


@pytest.mark.parametrize("target", REDIRECT_TARGETS)
def test_redirects_to_internal_addresses_reach_nothing(internal, target):
    location = target.format(port=internal.port)
    with RecordingListener("127.0.0.1", reply=lambda r: http_reply(302, b"", {"Location": location})) as ls:
        policy = HostPolicy.from_settings(f"http://127.0.0.1:{ls.port}", [])
        session = safe_session(policy)
        with pytest.raises(URLRefused):
            fetch(session, f"http://127.0.0.1:{ls.port}/data/upload/x.png", policy=policy, timeout=5, max_bytes=1 << 20,
                  label_studio_headers=ls_headers)
        with pytest.raises((URLRefused, requests.exceptions.InvalidSchema)):  # requests' own redirects
            session.get(f"http://127.0.0.1:{ls.port}/data/upload/x.png", timeout=5)
        assert len(ls.connections) == 2
    time.sleep(0.1)
    assert internal.connections == []


def test_a_redirect_from_label_studio_may_go_to_a_public_host_only():
    policy, resolver = policy_for(None, table={"bucket.test": ["52.216.1.1"], "evil.test": ["10.0.0.1"]})
    target = check_url("http://bucket.test/a.png?X-Amz-Signature=abc")
    with pytest.raises(URLRefused, match="not in ALLOWED_HOSTS"):
        policy.decide(target)  # in a task: refused without even asking DNS
    assert resolver.asked == []
    assert policy.decide(target, public_ok=True).addresses == ("52.216.1.1",)
    with pytest.raises(URLRefused, match="10.0.0.1"):
        policy.decide(check_url("http://evil.test/a.png"), public_ok=True)


def test_the_token_does_not_follow_a_redirect(label_studio):
    with RecordingListener("127.0.0.2", reply=routes({"/a.png": http_reply(body=b"cdn")})) as cdn:
        location = f"http://cdn.test:{cdn.port}/a.png"
        with RecordingListener("127.0.0.1", reply=lambda r: http_reply(302, b"", {"Location": location})) as ls:
            policy = HostPolicy.from_settings(f"http://ls.test:{ls.port}", ["cdn.test"],
                                              resolver=Resolver({"ls.test": ["127.0.0.1"], "cdn.test": ["127.0.0.2"]}))
            assert fetch(safe_session(policy), f"http://ls.test:{ls.port}/data/upload/a.png", policy=policy, timeout=5,
                         max_bytes=100, label_studio_headers=ls_headers) == b"cdn"
            assert ls.connections[0].headers["authorization"] == TOKEN
    [received] = cdn.connections
    assert "authorization" not in received.headers
    assert received.headers["host"] == f"cdn.test:{cdn.port}"


# --- connecting to the checked address --------------------------------------------------------------------


def test_a_dns_answer_that_changes_between_check_and_connect_is_never_used(internal):
    # The allowed service on 127.0.0.2 and the internal one on 127.0.0.1 share a port; the name answers the
    # allowed address first and the internal one afterwards (a rebinding DNS server).
    with RecordingListener("127.0.0.2", port=internal.port, reply=routes({"/a.png": http_reply(body=b"ok")})) as good:
        resolver = Resolver({"rebind.test": [["127.0.0.2"], ["127.0.0.1"]]})
        policy = HostPolicy.from_settings("", ["127.0.0.2/32"], resolver=resolver)
        session = safe_session(policy)
        assert fetch(session, f"http://rebind.test:{internal.port}/a.png", policy=policy, timeout=5, max_bytes=100) == b"ok"
        assert resolver.asked == ["rebind.test"]  # resolved once, connected to that answer
        assert good.connections[0].headers["host"] == f"rebind.test:{internal.port}"
        with pytest.raises(URLRefused, match="127.0.0.1"):  # the next request sees the new answer, and refuses it
            fetch(session, f"http://rebind.test:{internal.port}/a.png", policy=policy, timeout=5, max_bytes=100)
    time.sleep(0.1)
    assert internal.connections == []


def test_the_next_address_is_tried_when_one_refuses_the_connection():
    with RecordingListener("127.0.0.3", reply=routes({"/a.png": http_reply(body=b"ok")})) as server:
        resolver = Resolver({"two.test": ["127.0.0.4", "127.0.0.3"]})  # nothing listens on 127.0.0.4
        policy = HostPolicy.from_settings("", ["127.0.0.0/29"], resolver=resolver)
        assert fetch(safe_session(policy), f"http://two.test:{server.port}/a.png", policy=policy, timeout=5, max_bytes=10) == b"ok"


def test_ipv6_literals_connect_when_their_network_is_allowed(internal):
    with RecordingListener("::1", reply=routes({"/a.png": http_reply(body=b"v6")})) as server:
        session_policy = HostPolicy.from_settings("", ["::1/128"])
        assert fetch(safe_session(session_policy), f"http://[::1]:{server.port}/a.png", policy=session_policy,
                     timeout=5, max_bytes=10) == b"v6"
        assert server.connections[0].headers["host"] == f"[::1]:{server.port}"
        with pytest.raises(URLRefused):  # the IPv4-mapped spelling of 127.0.0.1 is not in ::1/128
            fetch(safe_session(session_policy), f"http://[::ffff:127.0.0.1]:{internal.port}/a.png",
                  policy=session_policy, timeout=5, max_bytes=10)
    assert internal.connections == []


def test_tls_keeps_the_server_name_and_checks_the_certificate_for_it(tmp_path):
    context, ca_file = tls_server_context("images.test", tmp_path)
    with RecordingListener("127.0.0.1", tls=context, reply=routes({"/a.png": http_reply(body=b"tls")})) as server:
        resolver = Resolver({"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
        policy = HostPolicy.from_settings("", ["images.test", "other.test"], resolver=resolver)
        session = safe_session(policy)
        assert fetch(session, f"https://images.test:{server.port}/a.png", policy=policy, timeout=5, max_bytes=10,
                     verify=ca_file) == b"tls"
        assert server.connections[0].server_name == "images.test"
        assert server.connections[0].headers["host"] == f"images.test:{server.port}"
        with pytest.raises(FetchError, match="TLS"):  # the certificate is for images.test, not other.test
            fetch(session, f"https://other.test:{server.port}/a.png", policy=policy, timeout=5, max_bytes=10, verify=ca_file)


# --- bounds ------------------------------------------------------------------------------------------------


def test_one_deadline_for_the_whole_download():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n"
    with RecordingListener("127.0.0.1", reply=lambda r: drip(head, interval=0.2)) as slow:
        policy = HostPolicy.from_settings(f"http://127.0.0.1:{slow.port}", [])
        started = time.monotonic()
        with pytest.raises(FetchError, match="FETCH_TIMEOUT=1"):
            fetch(safe_session(policy), f"http://127.0.0.1:{slow.port}/a.png", policy=policy, timeout=1, max_bytes=1000)
        assert time.monotonic() - started < 1.6  # each read was quick; the whole was not


def test_the_byte_cap_holds_with_and_without_content_length():
    big = b"x" * 5000
    chunked_head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    table = {"/declared.png": http_reply(body=big), "/undeclared.png": lambda r: [chunked_head, big]}
    with RecordingListener("127.0.0.1", reply=routes(table)) as server:
        policy = HostPolicy.from_settings(f"http://127.0.0.1:{server.port}", [])
        session = safe_session(policy)
        for path in ("declared", "undeclared"):
            with pytest.raises(TooLarge, match="4096 bytes"):
                fetch(session, f"http://127.0.0.1:{server.port}/{path}.png", policy=policy, timeout=5, max_bytes=4096)
        assert fetch(session, f"http://127.0.0.1:{server.port}/declared.png", policy=policy, timeout=5, max_bytes=5000) == big


def test_http_errors_say_what_happened(label_studio):
    policy, _ = policy_for(label_studio)
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(safe_session(policy), f"http://ls.test:{label_studio.port}/missing.png", policy=policy, timeout=5, max_bytes=10)


def test_allowed_hosts_entries_are_validated():
    with pytest.raises(URLRefused, match="ALLOWED_HOSTS entry"):
        HostPolicy.from_settings("", ["images.test/path"])
    with pytest.raises(URLRefused, match="LABEL_STUDIO_URL"):
        HostPolicy.from_settings("http://user@ls.test", [])
