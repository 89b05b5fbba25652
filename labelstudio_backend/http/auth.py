"""HTTP basic auth for the backend's endpoints, as Label Studio sends it.

Label Studio 1.23.2 sends the user and password of the model connection ("Authentication method: Basic
Auth") on every call of its ML client (``ml/api_connector.py``, ``MLApi``): /health, /setup, /predict,
interactive requests and Start Training (``START_TRAINING`` posted to /webhook). The project webhook it
creates for the model (``ml/models.py``, ``create_ml_webhook``) carries no credentials, but webhooks have a
``headers`` field that Label Studio sends with every event (``webhooks/utils.py``, ``run_webhook_sync``):
the backend fills it with ``authorization_header()`` when a project connects.

Checks: the user and password are compared together, as one digest, in constant time (a wrong user name
takes as long as a wrong password). A missing, malformed or non-ASCII header is a 401 with a message that
says what is wrong, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable

from labelstudio_backend.settings import validate_credentials

REALM = "dinov"


class AuthFailed(Exception):
    """The request's credentials are missing, malformed or wrong; the message is safe to return."""


class BasicAuth:
    """The configured user and password, and the check of a request's Authorization header."""

    def __init__(self, user: str, password: str):
        validate_credentials(user, password)
        self.user = user
        self._password = password
        self._digest = hashlib.sha256(f"{user}:{password}".encode("ascii")).digest()

    def __repr__(self) -> str:
        return f"BasicAuth(user={self.user!r}, password=***)"

    def authorization_header(self) -> str:
        """The header value that passes check(): for Label Studio's webhook headers."""
        token = base64.b64encode(f"{self.user}:{self._password}".encode("ascii")).decode("ascii")
        return f"Basic {token}"

    def check(self, header: str | None) -> None:
        """Return if `header` (the Authorization header) carries the right user and password; otherwise raise
        AuthFailed with a message for the 401 answer."""
        given = decode_basic(header)
        # One comparison of fixed-length digests: no early exit on the user name, no length leak.
        if not hmac.compare_digest(hashlib.sha256(given).digest(), self._digest):
            raise AuthFailed("wrong user or password: use BASIC_AUTH_USER and BASIC_AUTH_PASS of the backend in "
                             "the model connection (Basic Auth)")


def decode_basic(header: str | None) -> bytes:
    """The raw ``user:password`` bytes of a basic auth header, or AuthFailed saying what is wrong with it."""
    if not header:
        raise AuthFailed("basic auth required: set the backend's BASIC_AUTH_USER and BASIC_AUTH_PASS as the user "
                         "and password of the model connection in Label Studio (Authentication method: Basic Auth)")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        raise AuthFailed(f"the Authorization header must be 'Basic <base64 of user:password>', got a "
                         f"{scheme[:20]!r} header")
    try:
        raw = base64.b64decode(value.strip().encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise AuthFailed("the Authorization header is malformed: not base64 of user:password") from None
    if b":" not in raw:
        raise AuthFailed("the Authorization header is malformed: the decoded value has no ':' between user and "
                         "password")
    return raw


# --- which address the backend listens on ------------------------------------------------------------------


def exposed_addresses(listen: Iterable[str | tuple]) -> list[str]:
    """The listening addresses beyond loopback: "0.0.0.0:9090", "[::]:9090", "10.0.0.5:9090"; unix sockets and
    127.0.0.0/8, ::1 and "localhost" are private to the machine."""
    exposed = []
    for address in listen:
        if isinstance(address, tuple):
            host, port = str(address[0]), address[1]
        elif isinstance(address, (str, bytes)) and (not address or str(address).startswith(("unix:", "/", "\0", "b'"))):
            continue  # a unix socket (a path, or an abstract name)
        else:
            host, _, port = str(address).rpartition(":")
            host = host or "0.0.0.0"
        host = host.strip("[]")
        if host == "localhost":
            continue
        try:
            if ipaddress.ip_address(host).is_loopback:
                continue
        except ValueError:
            pass  # a host name: may be anything
        exposed.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return exposed


def exposure_warning(listen: Iterable[str | tuple], protected: bool) -> str | None:
    """The start-up warning when the backend listens beyond loopback without credentials (None otherwise).

    protected: basic auth is on (BASIC_AUTH_USER and BASIC_AUTH_PASS are set)."""
    if protected:
        return None
    exposed = exposed_addresses(listen)
    if not exposed:
        return None
    return (f"listening on {', '.join(exposed)} without credentials: anyone who reaches this port can run "
            "predictions, inject references through /webhook, change per-project settings through /setup and "
            "start syncs. Set BASIC_AUTH_USER and BASIC_AUTH_PASS (and the same in Label Studio's model "
            "connection), or listen on 127.0.0.1 only (README: Deploy safely)")
