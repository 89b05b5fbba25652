"""Which URLs the backend may fetch: one parser, one decision (safe_http connects to what is decided here).

Task data is written by whoever can create a task, so every URL the backend fetches is hostile until checked.

1. **One parser.** ``check_url`` parses a URL once, with urllib3's ``parse_url`` (the parser requests uses
   to prepare a request). Backslashes, whitespace and control characters, user info, percent-escapes in the
   host and ports outside 1-65535 are refused outright: those are where parsers disagree about the host.
   The URL that is requested is rebuilt from the checked parts (``CheckedURL.url``). A plain space in the
   path or query is only data (sent as %20).
2. **One decision.** ``HostPolicy.decide`` resolves the host once and judges the addresses it gets, so
   ``http://2130706433/``, ``http://0x7f.1/``, ``http://[::ffff:127.0.0.1]/``, ``http://0.0.0.0/`` and
   ``http://localhost/`` are judged by the address they reach, not by how they are spelled. Allowed:
   Label Studio's exact origin (scheme, host, port) and hosts named in ALLOWED_HOSTS (the operator's word,
   any address); hosts matching a wildcard of ALLOWED_HOSTS (``*.example.com``, ``*``) and the targets of
   Label Studio's redirects (presigned storage URLs) only when every address is public; IP literals and
   names whose addresses all lie in a network of ALLOWED_HOSTS (CIDR).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]

DEFAULT_PORTS = {"http": 80, "https": 443}
# Host names as DNS and docker-compose spell them (underscores included); everything else is refused.
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$")
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


class URLRefused(ValueError):
    """The backend will not fetch this URL; the message says why and what to change."""


# --- parsing ---------------------------------------------------------------------------------------------


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
    shown = shown_url(raw)
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
    scheme = parsed.scheme or ""
    port = parsed.port if parsed.port is not None else DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise URLRefused(f"{shown}: port {port} is not a TCP port")
    target = parsed.path or "/"
    if not target.startswith("/"):
        target = "/" + target
    if parsed.query is not None:
        target += "?" + parsed.query
    return CheckedURL(scheme, host, port, target)


def shown_url(raw: Any) -> str:
    """A URL for an error message: control characters visible, long ones cut, no query (it may hold a
    presigned URL's signature)."""
    text = repr(str(raw))[1:-1]
    text = text.split("?", 1)[0]
    return text if len(text) <= 200 else text[:200] + "..."


# --- the decision ---------------------------------------------------------------------------------------


def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, as the operating system's connect() would reach it (this is where
    2130706433, 0x7f.1 and 0177.0.0.1 become 127.0.0.1)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


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
                      resolver: Resolver | None = None) -> HostPolicy:
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
            f"{shown_url(url.url)}: host {url.host!r} is not Label Studio ({self.label_studio_origin}, from "
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
            f"{shown_url(url.url)}: host {url.host!r} reaches {internal}, which is not a public address and not in an "
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
            raise URLRefused(f"{shown_url(url.url)}: cannot resolve host {url.host!r} ({e})") from None
        if not addresses:
            raise URLRefused(f"{shown_url(url.url)}: host {url.host!r} has no address")
        for address in addresses:
            try:
                ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                raise URLRefused(f"{shown_url(url.url)}: the resolver answered {address!r} for {url.host!r}, "
                                 "which is not an IP address") from None
        return addresses
