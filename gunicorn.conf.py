"""gunicorn reads ./gunicorn.conf.py by default: the worker class that protects the threads from slow clients, and
the backend's start-up check of where it listens.

Command-line options (scripts/start.sh, the Docker image, the tests) still set bind, workers and threads.
"""

from __future__ import annotations

# gthread whose event loop reads each request completely (head within REQUEST_HEAD_TIMEOUT_S, the whole within
# REQUEST_BODY_TIMEOUT_S) before a thread gets it: slow clients hold no thread, /health keeps answering
# (labelstudio_backend/http/serve.py; README: Deploy safely).
worker_class = "labelstudio_backend.http.serve.BufferingThreadWorker"


def when_ready(server) -> None:
    """Warn when the backend listens beyond loopback without basic auth (README: Deploy safely)."""
    from labelstudio_backend.http.auth import exposure_warning
    from labelstudio_backend.settings import Settings, SettingsError

    try:
        protected = Settings.from_env().basic_auth is not None
    except SettingsError:
        return  # the worker reports the invalid setting and stops
    warning = exposure_warning([listener.sock.getsockname() for listener in server.LISTENERS], protected)
    if warning:
        server.log.warning(warning)
