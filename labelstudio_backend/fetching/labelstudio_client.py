"""The one Label Studio API client: authentication, the origin check, and the few API calls the backend makes.

Used by the reference sync, the image loader (uploads, presigned cloud files), bulk jobs and the background
predictions of /predict, so that all of them authenticate the same way and honour VERIFY_SSL.

Authentication (one rule for every caller):
- a legacy token (40 hex characters) is sent as ``Authorization: Token <key>``;
- a personal access token is a JWT refresh token: it is exchanged at ``POST /api/token/refresh/`` for a
  short-lived access token, sent as ``Authorization: Bearer <access>``, renewed shortly before it expires
  and once more when Label Studio answers 401.

Every request goes through a ``safe_http.safe_session``: the URL is parsed and decided by url_policy (Label
Studio's exact origin, ALLOWED_HOSTS, public addresses after Label Studio's redirects), the connection goes to
the checked address, and a request carrying the token is refused anywhere but Label Studio's origin.
`LabelStudioClient.is_label_studio_url` asks the same policy.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import jwt
import requests

from labelstudio_backend.errors import LabelStudioError
from labelstudio_backend.fetching.safe_http import safe_session
from labelstudio_backend.labelstudio.media import is_media_path
from labelstudio_backend.url_policy import HostPolicy, Resolver, URLRefused, check_url

TOKEN_REFRESH_PATH = "/api/token/refresh/"
ACCESS_RENEW_MARGIN_S = 30.0     # renew an access token this long before it expires
ACCESS_FALLBACK_LIFETIME_S = 240.0  # when an access token does not say when it expires
SEQUENTIAL_SAMPLING = "Sequential sampling"  # a project's `sampling` when the stream gives tasks in order


def is_personal_access_token(api_key: str) -> bool:
    """Personal access tokens are JWTs (three dot-separated parts with a readable header); legacy tokens
    are 40 hex characters."""
    key = (api_key or "").strip()
    if key.count(".") != 2:
        return False
    try:
        jwt.get_unverified_header(key)
        return True
    except jwt.PyJWTError:
        return False


class LabelStudioClient:
    """Label Studio's API at `base_url`, authenticated with `api_key` (legacy token or personal access token).

    Args:
        base_url: Label Studio's address as this process reaches it, e.g. "http://label-studio:8080"
            ("" when not configured: then only `is_label_studio_url` is usable, and it says False).
        api_key: LABEL_STUDIO_API_KEY.
        timeout: seconds per request.
        session: a requests.Session to share (tests mount fakes on it); default: a safe_session of the policy.
        verify: verify TLS certificates (VERIFY_SSL).
        allowed_hosts: ALLOWED_HOSTS, the other hosts images may come from.
        resolver: (host, port) -> addresses (default: the system's; tests inject one).
    """

    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0, session: requests.Session | None = None,
                 verify: bool = True, allowed_hosts: Iterable[str] = (), resolver: Resolver | None = None):
        self.base_url = (base_url or "").rstrip("/")
        self.api_key = (api_key or "").strip()
        self.timeout = timeout
        self.verify = verify
        try:
            self.policy = HostPolicy.from_settings(self.base_url, allowed_hosts, resolver=resolver)
        except URLRefused as e:
            raise LabelStudioError(str(e)) from None
        self.session = session or safe_session(self.policy)
        self._access: str | None = None
        self._access_expires = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any, session: requests.Session | None = None,
                      resolver: Resolver | None = None) -> LabelStudioClient:
        """The client of LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY / FETCH_TIMEOUT / VERIFY_SSL / ALLOWED_HOSTS."""
        return cls(settings.label_studio_url, settings.label_studio_api_key, timeout=settings.fetch_timeout,
                   session=session, verify=settings.verify_ssl, allowed_hosts=settings.allowed_hosts,
                   resolver=resolver)

    def check_configured(self) -> None:
        """Raise LabelStudioError unless both the URL and the token are set (API calls need both)."""
        if not self.base_url.startswith(("http://", "https://")):
            raise LabelStudioError(
                f"LABEL_STUDIO_URL must be the http(s) address of Label Studio, got {self.base_url!r}")
        if not self.api_key:
            raise LabelStudioError(
                "LABEL_STUDIO_API_KEY is not set; Label Studio's images and API need it. Copy a token from "
                "Label Studio (Account & Settings > Personal Access Token, or the legacy token) into "
                "LABEL_STUDIO_API_KEY")

    # --- where the token may go

    def is_label_studio_url(self, url: str) -> bool:
        """Whether the absolute `url` is on Label Studio's origin (same scheme, host and port): the only
        place the API key is ever sent."""
        if self.policy.label_studio is None:
            return False
        try:
            return check_url(url).origin == self.policy.label_studio
        except URLRefused:
            return False

    def is_media_url(self, url: str) -> bool:
        """Whether the absolute `url` is one of Label Studio's media paths (labelstudio.media) on its origin: the
        only URLs a task image is fetched from with the token."""
        if not self.is_label_studio_url(url):
            return False
        return is_media_path(urlsplit(url).path, urlsplit(self.base_url or "").path)

    # --- authentication

    @property
    def uses_personal_access_token(self) -> bool:
        return is_personal_access_token(self.api_key)

    def auth_headers(self) -> dict[str, str]:
        """{"Authorization": ...} for a request to Label Studio; exchanges a personal access token when needed.

        Raises LabelStudioError when the token is missing or refused, or Label Studio is unreachable.
        """
        if not self.api_key:
            self.check_configured()
        if not self.uses_personal_access_token:
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if self._access is None or time.time() > self._access_expires - ACCESS_RENEW_MARGIN_S:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def invalidate(self) -> None:
        """Forget the access token (after a 401), so that the next auth_headers() call gets a new one."""
        with self._lock:
            self._access = None

    def _refresh(self) -> None:
        url = self.base_url + TOKEN_REFRESH_PATH
        try:
            response = self.session.post(url, json={"refresh": self.api_key}, timeout=self.timeout,
                                         verify=self.verify, allow_redirects=False)
        except requests.RequestException as e:
            raise LabelStudioError(f"cannot reach Label Studio at LABEL_STUDIO_URL={self.base_url} to exchange the "
                                   f"personal access token ({e.__class__.__name__}: {e})") from None
        if response.status_code in (401, 403):
            raise LabelStudioError(
                f"Label Studio refused the personal access token in LABEL_STUDIO_API_KEY ({TOKEN_REFRESH_PATH} "
                f"answered {response.status_code}): it is expired, revoked or from another Label Studio; "
                "create a new one under Account & Settings, or use the legacy token", response.status_code)
        if response.status_code != 200:
            raise LabelStudioError(f"exchanging the personal access token at {url} failed with HTTP "
                                   f"{response.status_code}; check LABEL_STUDIO_URL", response.status_code)
        try:
            access = response.json()["access"]
        except (ValueError, KeyError, TypeError):
            raise LabelStudioError(f"{url} did not return an access token; check LABEL_STUDIO_URL") from None
        try:
            expires = float(jwt.decode(access, options={"verify_signature": False}).get("exp", 0))
        except jwt.PyJWTError:
            expires = 0.0
        self._access = access
        self._access_expires = expires or time.time() + ACCESS_FALLBACK_LIFETIME_S

    # --- requests

    def send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One authenticated request to an absolute URL on Label Studio's origin, renewing an expired access
        token once. Network errors and non-2xx answers are returned or raised as requests does; the caller
        decides what they mean (kwargs go to requests, e.g. stream=True, allow_redirects=False)."""
        if not self.is_label_studio_url(url):
            raise LabelStudioError(f"{url} is not on Label Studio's origin {self.base_url}; the token stays home")
        extra_headers = kwargs.pop("headers", {})
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("verify", self.verify)
        for attempt in range(2):
            headers = {**self.auth_headers(), **extra_headers}
            response = self.session.request(method, url, headers=headers, **kwargs)
            if response.status_code == 401 and attempt == 0 and self.uses_personal_access_token:
                response.close()
                self.invalidate()  # the access token expired or was revoked early: renew once
                continue
            return response
        return response

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send one API request to `path` (e.g. "/api/projects/3/"); raises LabelStudioError for 401/403 and
        unreachable servers, returns every other answer."""
        self.check_configured()
        try:
            response = self.send(method, self.base_url + path, **kwargs)
        except requests.RequestException as e:
            raise LabelStudioError(f"cannot reach Label Studio at LABEL_STUDIO_URL={self.base_url}: {e}") from e
        if response.status_code in (401, 403):
            raise LabelStudioError(
                f"Label Studio answered {response.status_code} to {method} {path}: the token in "
                "LABEL_STUDIO_API_KEY is wrong or lacks access to this project (with a legacy token, the "
                "organization must allow legacy tokens: LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true)",
                response.status_code)
        return response

    def get_json(self, path: str, params: Any = None, missing_ok: bool = False) -> Any:
        """GET `path` -> its JSON; None for a 404 when missing_ok; LabelStudioError for any other non-200."""
        response = self.request("GET", path, params=params)
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code != 200:
            raise LabelStudioError(f"Label Studio answered {response.status_code} to GET {path}: "
                                   f"{response.text[:300]}", response.status_code)
        try:
            return response.json()
        except ValueError:
            raise LabelStudioError(f"Label Studio sent non-JSON for {path}: {response.text[:200]}",
                                   response.status_code) from None

    # --- the API calls the backend makes

    def project(self, project_id: int) -> dict | None:
        """The project, or None when it does not exist (any more)."""
        return self.get_json(f"/api/projects/{int(project_id)}/", missing_ok=True)

    def task_page(self, project_id: int, page: int, page_size: int) -> list[dict]:
        """One page of the project's tasks with their annotations, newest updated_at first; [] past the end."""
        found = self.get_json(f"/api/projects/{int(project_id)}/tasks/", params={"page": page, "page_size": page_size},
                              missing_ok=True)
        if found is None:
            return []
        if not isinstance(found, list):
            raise LabelStudioError(f"unexpected answer to the task list of project {project_id}: {str(found)[:200]}")
        return found

    def task_pages(self, project_id: int, page_size: int) -> Iterator[list[dict]]:
        """Every page of the project's tasks (task_page 1, 2, ... until one is empty)."""
        page = 1
        while tasks := self.task_page(project_id, page, page_size):
            yield tasks
            page += 1

    def export_tasks(self, project_id: int, task_ids: list[int]) -> list[dict]:
        """The tasks among task_ids that still exist, with their annotations (no predictions triggered)."""
        params: list[tuple[str, Any]] = [("exportType", "JSON"), ("download_all_tasks", "true")]
        params += [("ids[]", int(t)) for t in task_ids]
        found = self.get_json(f"/api/projects/{int(project_id)}/export", params=params)
        if not isinstance(found, list):  # no answer about these tasks: never read as "none exists"
            raise LabelStudioError(f"unexpected answer to the export of project {project_id}: {str(found)[:200]}")
        return found

    def predictions_of_task(self, task_id: int) -> list[dict]:
        """The predictions Label Studio holds for one task."""
        found = self.get_json("/api/predictions/", params={"task": int(task_id)})
        if not isinstance(found, list):  # no answer: never read as "no prediction" (that would post a duplicate)
            raise LabelStudioError(f"unexpected answer to the predictions of task {task_id}: {str(found)[:200]}")
        return [p for p in found if isinstance(p, dict)]

    def next_tasks(self, project_id: int, after_task_id: int, count: int) -> list[dict]:
        """The first `count` tasks after `after_task_id` in the data manager's default order (task id) that nobody
        annotated or skipped: those Label Studio's Sequential sampling gives next. Each has its `id` and `data`
        as stored (storage URIs not resolved), as Label Studio sends them to /predict.

        The data manager's task list (GET /api/tasks/) with filters and ordering in `query`; `review=true` keeps
        it from retrieving predictions for the listed tasks (a project with "Retrieve predictions when loading
        a task automatically" would otherwise call this backend's /predict back with them).
        """
        query = {"filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": int(after_task_id)},
            {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
            {"filter": "filter:tasks:cancelled_annotations", "operator": "equal", "type": "Number", "value": 0},
        ]}, "ordering": ["tasks:id"]}
        found = self.get_json("/api/tasks/", params={
            "project": int(project_id), "page": 1, "page_size": max(1, int(count)), "fields": "task_only",
            "resolve_uri": "false", "review": "true", "query": json.dumps(query)}, missing_ok=True)
        if found is None:  # 404: past the last page, nothing left
            return []
        tasks = found.get("tasks") if isinstance(found, dict) else None
        if not isinstance(tasks, list):
            raise LabelStudioError(f"unexpected answer to the task list of project {project_id}: {str(found)[:200]}")
        # the filters again, here: a task annotated meanwhile, or a Label Studio that ignored a filter
        return [t for t in tasks if isinstance(t, dict) and isinstance(t.get("id"), int) and t["id"] > after_task_id
                and isinstance(t.get("data"), dict) and not t.get("is_labeled")
                and not t.get("total_annotations") and not t.get("cancelled_annotations")][:count]
