"""Label Studio ML backend for DINOv: pre-annotation from a project's own regions and interactive refinement.

    from labelstudio_backend import create_app
    app = create_app()            # what `gunicorn _wsgi:app` serves

See server.py (HTTP protocol), backend.py (DINOvBackend), settings.py (environment variables); the README's
"How it works" names every module in the order a request meets them.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP (every entry point, the server and the bulk job, imports this package first):
# idle OpenMP threads sleep instead of spinning, so that request threads, gunicorn and other processes
# on the machine do not slow the model down (measured: up to 50x on 2 busy cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from labelstudio_backend.settings import Settings, SettingsError  # noqa: E402


def create_app(*args, **kwargs):
    """labelstudio_backend.http.app.create_app, imported on first use (Flask is not needed by the rest)."""
    from labelstudio_backend.http.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["Settings", "SettingsError", "create_app"]
