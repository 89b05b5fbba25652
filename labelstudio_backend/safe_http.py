"""Outbound HTTP that reaches only what was checked.

Task data is written by whoever can create a task, so every URL the backend fetches is hostile until
checked. The rules, in the order they are applied:

1. **One parser.** A URL is parsed once, with urllib3's ``parse_url`` (the parser requests uses to
   prepare a request). Backslashes, whitespace, control characters, user info, percent-escapes in the
   host and ports outside 1-65535 are refused outright: those are where parsers disagree about the
   host. The URL that is requested is rebuilt from the checked parts (``CheckedURL.url``).
2. **One decision.** ``HostPolicy.decide`` resolves the host once and judges the addresses it gets,
   so ``http://2130706433/``, ``http://0x7f.1/``, ``http://[::ffff:127.0.0.1]/``, ``http://0.0.0.0/``
   and ``http://localhost/`` are judged by the address they reach, not by how they are spelled.
   Allowed: Label Studio's exact origin (scheme, host, port) and hosts named in ALLOWED_HOSTS (the
   operator's word, any address); hosts matching a wildcard of ALLOWED_HOSTS (``*.example.com``, ``*``)
   and the targets of Label Studio's redirects (presigned storage URLs) only when every address is
   public; IP literals and names whose addresses all lie in a network of ALLOWED_HOSTS (CIDR).
3. **Connect to what was checked.** ``PinnedAdapter`` (mounted by ``safe_session``) makes that decision
   for every request it sends, then connects to the checked address itself, keeping the Host header
   and the TLS server name (SNI, certificate hostname) of the URL. A DNS answer that changes between
   check and connect is never asked for. Redirects are not followed by requests: ``fetch`` follows
   them by hand and every hop passes the adapter again.
4. **The token stays home.** A request carrying an ``Authorization`` header is refused unless it goes
   to Label Studio's exact origin.
5. **Bounded.** ``fetch`` has one deadline for the whole download (redirects, connect, every read) and
   a byte cap checked against Content-Length and while reading.

Proxies from the environment are not used: a proxy would connect by name, after the check.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import LocationParseError, NewConnectionError
from urllib3.util import parse_url

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
# Host names as DNS and docker-compose spell them (underscores included); everything else is refused.
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$")
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


class URLRefused(ValueError):
    """The backend will not fetch this URL; the message says why and what to change."""


class FetchError(ValueError):
    """A fetch failed (unreachable, HTTP error, too slow); the message says what happened."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status, when the server answered with an error


class TooLarge(FetchError):
    """The body is larger than the byte cap."""


# --- 1. parsing ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedURL:
    """An http(s) URL that passed the syntax rules, split into the parts a request is built from."""

    scheme: str  # "http" | "https"
    host: str  # lower-case name, or an IP literal without brackets
    port: int
    target: str  # path and query, percent-encoded, as sent in the request line

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL that is requested: rebuilt from the checked parts only."""
        return f"{self.scheme}://{self.netloc}{self.target}"

    def __str__(self) -> str:
        return self.url


def check_url(raw: str) -> CheckedURL:
    """Parse `raw` with the HTTP client's parser and refuse every form parsers disagree about."""
    if not isinstance(raw, str) or not raw:
        raise URLRefused(f"{raw!r} is not a URL")
    shown = _shown(raw)
    # A plain space in the path or query is only data (it is sent as %20); any other whitespace, control
    # character or backslash anywhere, and a space before the path, is refused.
    scheme, sep, rest = raw.partition("://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    bad = next((c for c in raw if c == "\\" or (c.isspace() and c != " ") or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F),
               None) or (" " if " " in scheme + sep + authority else None)
    if bad is not None:
        raise URLRefused(f"{shown}: the URL contains {bad!r}; backslashes, whitespace and control characters "
                         "are refused (percent-encode them in the path)")
    if not sep or scheme.lower() not in DEFAULT_PORTS:
        raise URLRefused(f"{shown}: only absolute http:// and https:// URLs are fetched")
    if "@" in authority:
        raise URLRefused(f"{shown}: URLs with user info (user@host) are refused; Label Studio is reached with "
                         "LABEL_STUDIO_API_KEY, other hosts without credentials")
    if "%" in authority:
        raise URLRefused(f"{shown}: percent-escapes in the host part are refused")
    if not authority.isascii():
        raise URLRefused(f"{shown}: the host is not ASCII; write an internationalized name in its xn-- form")
    try:
        parsed = parse_url(raw)
    except LocationParseError as e:
        raise URLRefused(f"{shown}: not a valid URL ({e})") from None
    if parsed.auth is not None:  # belt and braces: the text check above already refused it
        raise URLRefused(f"{shown}: URLs with user info are refused")
    host = (parsed.host or "").lower()
    if host.startswith("["):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise URLRefused(f"{shown}: {parsed.host!r} is not a valid IPv6 address") from None
    elif not host or not _HOST_NAME.match(host):
        raise URLRefused(f"{shown}: {parsed.host!r} is not a valid host name")
    port = parsed.port if parsed.port is not None else DEFAULT_PORTS[parsed.scheme]
    if not 1 <= port <= 65535:
        raise URLRefused(f"{shown}: port {port} is not a TCP port")
    target = parsed.path or "/"
    if not target.startswith("/"):
        target = "/" + target
    if parsed.query is not None:
        target += "?" + parsed.query
    return CheckedURL(parsed.scheme, host, port, target)


def _shown(raw: Any) -> str:
    """A URL for an error message: control characters visible, long ones cut, no query (it may hold a
    presigned URL's signature)."""
    text = repr(str(raw))[1:-1]
    text = text.split("?", 1)[0]
    return text if len(text) <= 200 else text[:200] + "..."


# --- 2. the decision ---------------------------------------------------------------------------------------


def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, as the operating system's connect() would reach it (this is where
    2130706433, 0x7f.1 and 0177.0.0.1 become 127.0.0.1)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, Teredo client, NAT64), if any."""
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if int(address) >> 32 == 0:  # ::a.b.c.d, "IPv4-compatible" (also :: and ::1, judged as 0.0.0.x)
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """Whether `address` is a public unicast address, and so is every IPv4 address it embeds."""
    if address.version == 6 and address.ipv4_mapped is not None:
        return is_public(address.ipv4_mapped)  # a socket reaches the IPv4 address itself
    inner = embedded_ipv4(address)
    if inner is not None and not is_public(inner):
        return False
    if address.version == 6 and (address in _NAT64_LOCAL or address.is_site_local):
        return False
    return address.is_global and not (address.is_multicast or address.is_private or address.is_loopback
                                      or address.is_link_local or address.is_unspecified or address.is_reserved)


@dataclass(frozen=True)
class Destination:
    """A checked URL and the addresses to connect to for it (the only ones that will be)."""

    url: CheckedURL
    addresses: tuple[str, ...]
    label_studio: bool  # Label Studio's exact origin: the only one that gets its token
    reason: str  # which rule allowed it, for the log


@dataclass(frozen=True)
class HostPolicy:
    """Which hosts and addresses the backend may connect to (see the module docstring)."""

    label_studio: tuple[str, str, int] | None = None  # origin of LABEL_STUDIO_URL
    names: frozenset[str] = frozenset()  # ALLOWED_HOSTS names: any address
    suffixes: tuple[str, ...] = ()  # ALLOWED_HOSTS "*.example.com" -> ".example.com": public addresses
    any_public: bool = False  # ALLOWED_HOSTS "*": any host with public addresses
    networks: tuple[IPNetwork, ...] = ()  # ALLOWED_HOSTS CIDRs and IPs
    resolver: Resolver = field(default=system_resolver, compare=False)

    @classmethod
    def from_settings(cls, label_studio_url: str, allowed_hosts: Iterable[str],
                      resolver: Resolver | None = None) -> "HostPolicy":
        origin = None
        if label_studio_url:
            try:
                origin = check_url(label_studio_url.rstrip("/")).origin
            except URLRefused as e:
                raise URLRefused(f"LABEL_STUDIO_URL is not usable: {e}") from None
        names, suffixes, networks, any_public = set(), [], [], False
        for entry in (e.strip().lower() for e in allowed_hosts):
            if not entry:
                continue
            if entry == "*":
                any_public = True
                continue
            if entry.startswith("*."):
                suffixes.append(entry[1:])
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if not _HOST_NAME.match(entry):
                raise URLRefused(f"ALLOWED_HOSTS entry {entry!r} is neither a host name, *.domain, * nor an IP "
                                 "address or network")
            names.add(entry)
        return cls(origin, frozenset(names), tuple(suffixes), any_public, tuple(networks),
                   resolver or system_resolver)

    @property
    def label_studio_origin(self) -> str:
        if self.label_studio is None:
            return "unset"
        scheme, host, port = self.label_studio
        return CheckedURL(scheme, host, port, "/").url.rstrip("/")

    def precheck(self, url: CheckedURL, *, public_ok: bool = False) -> str:
        """The rule that may allow `url`, without asking DNS: "label_studio", "named" or "addresses" (to be
        judged by its addresses); URLRefused when no rule can."""
        if url.origin == self.label_studio:
            return "label_studio"
        if url.host in self.names:
            return "named"
        if public_ok or self.networks or self._wildcard(url):
            return "addresses"
        raise URLRefused(
            f"{_shown(url.url)}: host {url.host!r} is not Label Studio ({self.label_studio_origin}, from "
            "LABEL_STUDIO_URL) and not in ALLOWED_HOSTS; add it to ALLOWED_HOSTS if images may come from it")

    def decide(self, url: CheckedURL, *, public_ok: bool = False) -> Destination:
        """Resolve `url`'s host once and return where to connect, or raise URLRefused saying why not.

        public_ok: any host with only public addresses is fine too (the target of Label Studio's
        redirect: a presigned storage URL).
        """
        rule = self.precheck(url, public_ok=public_ok)
        if rule == "label_studio":
            return Destination(url, self._resolve(url), True, "Label Studio")
        if rule == "named":
            return Destination(url, self._resolve(url), False, "named in ALLOWED_HOSTS")
        wildcard = self._wildcard(url)
        addresses = self._resolve(url)
        parsed = [ipaddress.ip_address(a.split("%", 1)[0]) for a in addresses]
        if self.networks and all(self._in_networks(a) for a in parsed):
            return Destination(url, addresses, False, "address in ALLOWED_HOSTS networks")
        if (wildcard or public_ok) and all(is_public(a) for a in parsed):
            return Destination(url, addresses, False, "public address")
        internal = ", ".join(str(a) for a in parsed if not is_public(a)) or ", ".join(addresses)
        raise URLRefused(
            f"{_shown(url.url)}: host {url.host!r} reaches {internal}, which is not a public address and not in an "
            "ALLOWED_HOSTS network; task images may not point to internal services. If this host is trusted, "
            "add its name or network to ALLOWED_HOSTS")

    def _wildcard(self, url: CheckedURL) -> bool:
        return self.any_public or any(url.host.endswith(s) or url.host == s[1:] for s in self.suffixes)

    def _in_networks(self, address: IPAddress) -> bool:
        candidates = [address] + ([inner] if (inner := embedded_ipv4(address)) is not None else [])
        return any(a.version == n.version and a in n for a in candidates for n in self.networks)

    def _resolve(self, url: CheckedURL) -> tuple[str, ...]:
        try:
            return (str(ipaddress.ip_address(url.host)),)  # a canonical IP literal is its own answer
        except ValueError:
            pass
        try:
            addresses = tuple(str(a) for a in self.resolver(url.host, url.port))
        except (OSError, UnicodeError) as e:
            raise URLRefused(f"{_shown(url.url)}: cannot resolve host {url.host!r} ({e})") from None
        if not addresses:
            raise URLRefused(f"{_shown(url.url)}: host {url.host!r} has no address")
        for address in addresses:
            try:
                ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                raise URLRefused(f"{_shown(url.url)}: the resolver answered {address!r} for {url.host!r}, "
                                 "which is not an IP address") from None
        return addresses


# --- 3. connecting to what was checked ---------------------------------------------------------------------


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
            raise URLRefused(f"{_shown(url.url)}: refusing to send credentials to a host that is not Label "
                             "Studio's origin (LABEL_STUDIO_URL)")
        request.url = url.url
        request.headers["Host"] = url.netloc
        last_error: Exception | None = None
        for address in destination.addresses:
            request.pinned = (destination, address)  # read by get_connection_with_tls_context
            try:
                return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=None)
            except requests.ConnectionError as e:
                if not _connect_failed(e):
                    raise
                last_error = e  # nothing was sent to this address: try the next one
        assert last_error is not None
        raise last_error

    def get_connection_with_tls_context(self, request: requests.PreparedRequest, verify: bool | str,
                                        proxies: Any = None, cert: Any = None):
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


# --- 4./5. fetching with redirects, one deadline and a byte cap --------------------------------------------


def fetch(session: requests.Session, url: str | CheckedURL, *, timeout: float, max_bytes: int,
          label_studio_headers: Callable[[], dict[str, str]] | None = None, verify: bool | str = True,
          max_redirects: int = MAX_REDIRECTS, public_ok: bool = False) -> bytes:
    """GET the body of `url` through `session` (see ``safe_session``) within `timeout` seconds in all.

    Redirects are followed by hand, each hop checked by the adapter; after a redirect from Label Studio
    any public host is accepted (its presigned storage URLs), after other redirects only what the policy
    allows anyway. label_studio_headers() gives the Authorization header, sent only to Label Studio's
    origin. Raises URLRefused, TooLarge or FetchError.
    """
    deadline = time.monotonic() + timeout
    policy = _policy_of(session)
    checked = url if isinstance(url, CheckedURL) else check_url(url)
    original = checked.url
    for _ in range(max_redirects + 1):
        on_label_studio = policy is not None and checked.origin == policy.label_studio
        headers = {"Accept-Encoding": "identity"}
        if on_label_studio and label_studio_headers is not None:
            headers.update(label_studio_headers())
        request = requests.Request("GET", checked.url, headers=headers).prepare()
        request.allow_public = public_ok
        remaining = _remaining(deadline, original, timeout)
        try:
            response = session.send(request, stream=True, timeout=(remaining, remaining), verify=verify,
                                    allow_redirects=False)
        except requests.exceptions.SSLError as e:
            raise FetchError(f"{_shown(checked.url)}: TLS error ({e}); fix the certificate or set VERIFY_SSL=false") \
                from None
        except requests.Timeout:
            raise FetchError(f"{_shown(original)}: no answer within FETCH_TIMEOUT={timeout:g} s") from None
        except requests.RequestException as e:
            raise FetchError(f"{_shown(checked.url)}: cannot fetch ({e.__class__.__name__}: {e})") from None
        if response.status_code in REDIRECT_STATUSES:
            location = response.headers.get("Location")
            response.close()
            if not location:
                raise FetchError(f"{_shown(checked.url)}: a redirect without Location")
            try:
                checked = check_url(urljoin(checked.url, location))
            except URLRefused as e:
                raise URLRefused(f"{_shown(original)} redirected to a refused URL: {e}") from None
            # Label Studio hands out presigned storage URLs; nobody else widens what may be reached.
            public_ok = public_ok or on_label_studio
            continue
        return read_body(response, deadline=deadline, max_bytes=max_bytes, what=_shown(original), timeout=timeout)
    raise FetchError(f"{_shown(original)}: more than {max_redirects} redirects")


def read_body(response: requests.Response, *, deadline: float, max_bytes: int, what: str,
              timeout: float) -> bytes:
    """The body of `response` (HTTP 200 only), at most `max_bytes`, finished before `deadline`."""
    with response:
        if response.status_code != 200:
            raise FetchError(f"{what}: HTTP {response.status_code}", response.status_code)
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


def _policy_of(session: requests.Session) -> HostPolicy | None:
    adapter = session.get_adapter("http://")
    return adapter.policy if isinstance(adapter, PinnedAdapter) else None
