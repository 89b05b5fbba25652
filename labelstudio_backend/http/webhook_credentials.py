"""Give the model's Label Studio webhook the backend's credentials, so /webhook can require them.

Label Studio 1.23.2 creates a project webhook to ``<model URL>/webhook`` when a model is connected
(``ml/models.py``, ``create_ml_webhook``, a post_save signal of MLBackend) without any credentials, while
its ML client sends basic auth on /health, /setup, /predict and Start Training. Webhooks have a
``headers`` field (at most 10 headers, names of letters, digits, ``-`` and ``_``) that Label Studio sends
with every event. So when Label Studio calls /setup, the backend looks up the project's webhooks and
sets ``Authorization: Basic ...`` on those that point at itself.

"Points at itself": the webhook URL's host and port are those Label Studio used to reach this /setup
call (its Host header) and its path is this app's ``/webhook``. Credentials never go to a webhook of
another host. Behind a proxy that rewrites Host, nothing matches and the log says how to set the header by
hand.

The token in LABEL_STUDIO_API_KEY needs ``webhooks.view`` (GET /api/webhooks/) and ``webhooks.change``
(PATCH /api/webhooks/<id>/) on the project's organization; in Label Studio Community every member of the
organization has both (``core/permissions.py``).

Label Studio calls /setup twice when a model is connected: once to validate the connection (before the
model and its webhook are saved) and once right after (the webhook exists). The second call is the one
that finds the webhook, before Label Studio sends any event to it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from labelstudio_backend.http.auth import BasicAuth
from labelstudio_backend.runtime.bounded import PROJECTS_MAX, LRUCache

logger = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "https": 443}
# Once a project's webhook is known to carry the header, /setup (called by Label Studio before each
# batch of predictions) does not ask again for this long.
RECHECK_SECONDS = 600.0
# After a failed attempt (Label Studio unreachable, token without permission), wait before trying again.
RETRY_SECONDS = 60.0
# The calls run inside /setup, which Label Studio waits for only ML_TIMEOUT_SETUP (3 s by default).
API_TIMEOUT_SECONDS = 1.5


class LabelStudioAPI(Protocol):
    def request(self, method: str, path: str, **kwargs: Any) -> Any: ...


def points_here(webhook_url: str, host_header: str, webhook_path: str) -> bool:
    """Whether `webhook_url` is this backend's `webhook_path` on the host:port of `host_header` (the Host
    header of Label Studio's request; without a port it matches the webhook scheme's default port)."""
    try:
        hook = parse_url(webhook_url)
        here = parse_url("//" + host_header)
    except (LocationParseError, ValueError):
        return False
    if hook.scheme not in DEFAULT_PORTS or not hook.host or not here.host or hook.auth:
        return False
    hook_port = hook.port or DEFAULT_PORTS[hook.scheme]
    if hook.host.lower() != here.host.lower():
        return False
    if here.port is not None and here.port != hook_port:
        return False
    if here.port is None and hook_port != DEFAULT_PORTS[hook.scheme]:
        return False
    return (hook.path or "/").rstrip("/") == webhook_path.rstrip("/") and not hook.query


class WebhookGuard:
    """Sets the backend's Authorization header on its webhooks in Label Studio, once per project and while
    it holds (see the module docstring)."""

    def __init__(self, client: LabelStudioAPI, auth: BasicAuth, clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.auth = auth
        self.clock = clock
        # project -> when its webhook was last known good (or tried); bounded like every per-project record
        self._checked: LRUCache[int, float] = LRUCache(PROJECTS_MAX)
        self._lock = threading.Lock()

    def ensure(self, project_id: int, host_header: str, webhook_path: str = "/webhook") -> list[int]:
        """Make the project's webhooks to this backend carry the credentials; returns the ids it changed.

        Never raises: a failure is logged and /setup goes on (events then get 401 until it works)."""
        now = self.clock()
        with self._lock:
            due = self._checked.get(project_id)
            if due is not None and now < due:
                return []
        try:
            changed, found = self._ensure(project_id, host_header, webhook_path)
        except Exception as e:  # the API's errors say what to fix; /setup must not fail because of them
            logger.warning("project %s: cannot set the backend's credentials on its Label Studio webhook (%s). "
                           "Until this works, Label Studio's webhook events are refused with 401: give the token "
                           "in LABEL_STUDIO_API_KEY the webhooks.view and webhooks.change permissions, or set the "
                           "header 'Authorization: Basic <base64 of BASIC_AUTH_USER:BASIC_AUTH_PASS>' on the "
                           "webhook yourself", project_id, e)
            with self._lock:
                self._checked.put(project_id, now + RETRY_SECONDS)
            return []
        if found:
            with self._lock:
                self._checked.put(project_id, now + RECHECK_SECONDS)
        else:
            logger.info("project %s: no Label Studio webhook to http(s)://%s%s yet; looking again at the next "
                        "/setup", project_id, host_header, webhook_path)
        return changed

    def forget(self, project_id: int) -> None:
        with self._lock:
            self._checked.pop(project_id)

    def _ensure(self, project_id: int, host_header: str, webhook_path: str) -> tuple[list[int], bool]:
        response = self.client.request("GET", "/api/webhooks/", params={"project": project_id},
                                       timeout=API_TIMEOUT_SECONDS)
        if response.status_code != 200:
            raise RuntimeError(f"GET /api/webhooks/?project={project_id} answered {response.status_code}: "
                               f"{response.text[:300]}")
        hooks = response.json() or []
        header = self.auth.authorization_header()
        changed, found = [], False
        for hook in hooks:
            if not isinstance(hook, dict) or hook.get("project") != project_id:
                continue
            if not points_here(str(hook.get("url", "")), host_header, webhook_path):
                continue
            found = True
            headers = {k: v for k, v in (hook.get("headers") or {}).items() if k.lower() != "authorization"}
            if (hook.get("headers") or {}).get("Authorization") == header and len(headers) + 1 == len(hook["headers"]):
                continue
            headers["Authorization"] = header
            # A PATCH without "actions" would clear the webhook's action list: send it back unchanged.
            body = {"headers": headers, "actions": list(hook.get("actions") or [])}
            response = self.client.request("PATCH", f"/api/webhooks/{int(hook['id'])}/", json=body,
                                           timeout=API_TIMEOUT_SECONDS)
            if response.status_code != 200:
                raise RuntimeError(f"PATCH /api/webhooks/{hook['id']}/ answered {response.status_code}: "
                                   f"{response.text[:300]}")
            logger.info("project %s: Label Studio webhook %s (%s) now sends the backend's basic auth",
                        project_id, hook["id"], hook.get("url"))
            changed.append(int(hook["id"]))
        return changed, found
