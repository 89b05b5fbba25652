"""Outbound HTTP that connects only to what url_policy decided.

3. **Connect to what was checked.** ``PinnedAdapter`` (mounted by ``safe_session``) decides every request it
   sends with a ``HostPolicy``, then connects to the checked address itself, keeping the Host header and the
   TLS server name (SNI, certificate hostname) of the URL. A DNS answer that changes between check and
   connect is never asked for. ``fetch`` follows redirects by hand, and every hop passes the adapter again.
4. **The token stays home.** A request carrying an ``Authorization`` header is refused unless it goes to
   Label Studio's exact origin.
5. **Bounded.** ``fetch`` has one deadline for the whole download (redirects, connect, every read) and a
   byte cap checked against Content-Length and while reading.

Proxies from the environment are not used: a proxy would connect by name, after the check.
(Rules 1 and 2, parsing and deciding, are url_policy's.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError

from labelstudio_backend.url_policy import CheckedURL, HostPolicy, URLRefused, check_url, shown_url

REDIRECT_STATUSES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5


class FetchError(ValueError):
    """A fetch failed (unreachable, HTTP error, too slow); the message says what happened."""

    def __init__(self, message: str, status: int | None = None, url: str | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status, when a server answered with an error
        self.url = url  # the URL (the redirect hop) that answered it


class TooLarge(FetchError):
    """The body is larger than the byte cap."""


# --- connecting to what was checked ---------------------------------------------------------------------


class PinnedAdapter(HTTPAdapter):
    """A requests adapter that decides every request with a HostPolicy and connects to the checked address.

    A PreparedRequest may carry ``allow_public = True`` (set by ``fetch`` on the hops after a redirect
    from Label Studio) to accept any host with only public addresses.
    """

    def __init__(self, policy: HostPolicy, **kwargs: Any):
        super().__init__(max_retries=0, **kwargs)
        self.policy = policy

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: bool | str = True, cert: Any = None, proxies: Any = None) -> requests.Response:
        url = check_url(request.url or "")
        destination = self.policy.decide(url, public_ok=getattr(request, "allow_public", False))
        if "Authorization" in request.headers and not destination.label_studio:
            raise URLRefused(f"{shown_url(url.url)}: refusing to send credentials to a host that is not Label "
                             "Studio's origin (LABEL_STUDIO_URL)")
        request.url = url.url
        request.headers["Host"] = url.netloc
        *others, last = destination.addresses
        for address in others:
            setattr(request, "pinned", (destination, address))  # read by get_connection_with_tls_context
            try:
                return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=None)
            except requests.ConnectionError as e:
                if not _connect_failed(e):
                    raise
                # nothing was sent to this address: try the next one
        setattr(request, "pinned", (destination, last))
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=None)

    def get_connection_with_tls_context(self, request: requests.PreparedRequest, verify: bool | str,
                                        proxies: Any = None, cert: Any = None) -> Any:
        pinned = getattr(request, "pinned", None)
        if pinned is None:  # only send() above prepares requests for this adapter
            raise URLRefused("internal error: a request reached PinnedAdapter without a checked destination")
        destination, address = pinned
        host_params, pool_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)
        host_params["host"] = address
        if destination.url.scheme == "https":
            pool_kwargs["server_hostname"] = destination.url.host  # SNI and certificate name: the URL's host
        return self.poolmanager.connection_from_host(**host_params, pool_kwargs=pool_kwargs)


def _connect_failed(error: requests.ConnectionError) -> bool:
    """Whether the TCP connect failed (so nothing was sent and the next address may be tried)."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return isinstance(reason, NewConnectionError)


def safe_session(policy: HostPolicy) -> requests.Session:
    """A requests session whose every request goes through PinnedAdapter (no proxies from the environment)."""
    session = requests.Session()
    session.trust_env = False
    adapter = PinnedAdapter(policy)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# --- fetching with redirects, one deadline and a byte cap --------------------------------------------


def fetch(session: requests.Session, url: str | CheckedURL, *, policy: HostPolicy, timeout: float, max_bytes: int,
          label_studio_headers: Callable[[], dict[str, str]] | None = None, verify: bool | str = True,
          max_redirects: int = MAX_REDIRECTS, public_ok: bool = False,
          token_for: Callable[[str], bool] | None = None) -> bytes:
    """GET the body of `url` through `session` (a ``safe_session(policy)``) within `timeout` seconds in all.

    Redirects are followed by hand and every hop is decided again; after a redirect from Label Studio any
    host with only public addresses is accepted too (its presigned storage URLs), other redirects widen
    nothing. label_studio_headers() gives the Authorization header, added only on Label Studio's origin, and
    with token_for only to the URLs it accepts (every hop decided again: Label Studio's media paths for images).
    Raises URLRefused, TooLarge or FetchError.
    """
    deadline = time.monotonic() + timeout
    checked = url if isinstance(url, CheckedURL) else check_url(url)
    original = shown_url(checked.url)
    for hop in range(max_redirects + 1):
        try:
            policy.precheck(checked, public_ok=public_ok)  # a clear refusal before any DNS question
        except URLRefused as e:
            raise URLRefused(f"{original} redirected to a refused URL: {e}" if hop else str(e)) from None
        on_label_studio = checked.origin == policy.label_studio
        headers = {"Accept-Encoding": "identity"}
        if on_label_studio and label_studio_headers is not None and (token_for is None or token_for(checked.url)):
            headers.update(label_studio_headers())
        request = requests.Request("GET", checked.url, headers=headers).prepare()
        setattr(request, "allow_public", public_ok)  # read by PinnedAdapter, which makes the decision that connects
        remaining = _remaining(deadline, original, timeout)
        try:
            response = session.send(request, stream=True, timeout=(remaining, remaining), verify=verify,
                                    allow_redirects=False)
        except URLRefused as e:
            raise URLRefused(f"{original} redirected to a refused URL: {e}" if hop else str(e)) from None
        except requests.exceptions.SSLError as e:
            raise FetchError(f"{shown_url(checked.url)}: TLS error ({e}); fix the certificate or set "
                             "VERIFY_SSL=false") from None
        except requests.Timeout:
            raise FetchError(f"{original}: no answer within FETCH_TIMEOUT={timeout:g} s") from None
        except requests.RequestException as e:
            raise FetchError(f"{shown_url(checked.url)}: cannot fetch ({e.__class__.__name__}: {e})") from None
        if response.status_code in REDIRECT_STATUSES:
            location = response.headers.get("Location")
            response.close()
            if not location:
                raise FetchError(f"{shown_url(checked.url)}: a redirect without Location")
            try:
                checked = check_url(urljoin(checked.url, location))
            except URLRefused as e:
                raise URLRefused(f"{original} redirected to a refused URL: {e}") from None
            # Label Studio hands out presigned storage URLs; nobody else widens what may be reached.
            public_ok = public_ok or on_label_studio
            continue
        return read_body(response, deadline=deadline, max_bytes=max_bytes, what=original, timeout=timeout)
    raise FetchError(f"{original}: more than {max_redirects} redirects")


def read_body(response: requests.Response, *, deadline: float, max_bytes: int, what: str,
              timeout: float) -> bytes:
    """The body of `response` (HTTP 200 only), at most `max_bytes`, finished before `deadline`."""
    with response:
        if response.status_code != 200:
            hop = shown_url(response.url)
            status = "not found (HTTP 404)" if response.status_code == 404 else f"HTTP {response.status_code}"
            raise FetchError(f"{what}: {status}" + ("" if hop == what else f" from {hop}"), response.status_code,
                             response.url)
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise TooLarge(f"{what}: {int(length)} bytes, above the limit of {max_bytes} bytes")
        chunks, total = [], 0
        raw = response.raw
        while True:
            # One deadline for the whole body: each read may wait only for what is left of it.
            _set_read_timeout(response, _remaining(deadline, what, timeout))
            try:
                chunk = raw.read1(1 << 16)  # what has arrived, at most one socket read
            except Exception as e:  # urllib3 read errors and socket timeouts alike
                if time.monotonic() >= deadline or "timed out" in str(e):
                    raise FetchError(f"{what}: not finished within FETCH_TIMEOUT={timeout:g} s") from None
                raise FetchError(f"{what}: the download broke off ({e.__class__.__name__}: {e})") from None
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise TooLarge(f"{what}: more than the limit of {max_bytes} bytes")
            chunks.append(chunk)
        _remaining(deadline, what, timeout)
        return b"".join(chunks)


def _remaining(deadline: float, what: str, timeout: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(f"{what}: not finished within FETCH_TIMEOUT={timeout:g} s")
    return left


def _set_read_timeout(response: requests.Response, seconds: float) -> None:
    connection = getattr(response.raw, "connection", None) or getattr(response.raw, "_connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        sock.settimeout(seconds)

