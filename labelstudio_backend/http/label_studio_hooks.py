"""How /health answers Label Studio, which reads nothing but the status code.

Label Studio 1.23.2 (ml/models.py MLBackend.update_state, run on every listing of a project's models) marks the
connection Disconnected when /health answers anything but 2xx, and, on connecting, says "authentication
parameters were either not provided or are incorrect" only when /health itself answers 401
(ml/serializers.py _validate_healthcheck); its requests carry "User-Agent: heartex/<version>" (api_connector.py).

- While the model loads (a first download can take minutes), Label Studio gets 200 {"status": "LOADING", ...}
  and keeps the connection usable (its /setup answers; predictions wait for the model within their budget);
  everyone else (an orchestrator's probe) still gets 503, so nothing routes work to a process that cannot do it.
  A load that failed and waits for its retry, or a store that cannot be read, is 503 for everyone.
- With BASIC_AUTH_USER/BASIC_AUTH_PASS set, /health asks Label Studio and any request that carries an
  Authorization header for them (401 when wrong or missing), so Label Studio reports an authentication failure
  as one; a probe without credentials still gets /health.
"""

from __future__ import annotations

from typing import Any

LABEL_STUDIO_AGENT = "heartex/"
LOADING_STATES = ("not started", "loading")


def from_label_studio(headers: Any) -> bool:
    return str(headers.get("User-Agent") or "").startswith(LABEL_STUDIO_AGENT)


def health_needs_auth(headers: Any) -> bool:
    """Whether /health checks the basic auth credentials (when the backend has them)."""
    return bool(headers.get("Authorization")) or from_label_studio(headers)


def health_answer(answer: dict, headers: Any) -> tuple[dict, int]:
    """(body, status code) of /health: 200 when UP; 200 "LOADING" for Label Studio while the model loads."""
    if answer["status"] == "UP":
        return answer, 200
    loading = answer.get("model", {}).get("state") in LOADING_STATES
    store_ok = "webhooks" in answer  # health_report could read the store
    if loading and store_ok and from_label_studio(headers):
        return {**answer, "status": "LOADING"}, 200
    return answer, 503
