"""Label Studio ML backend for DINOv: pre-annotation from a project's own regions and interactive refinement.

    from labelstudio_backend.http.app import create_app
    app = create_app()            # what `gunicorn _wsgi:app` serves

Packages, lowest first (each imports only from those before it): labelstudio (Label Studio's formats), store
(SQLite), fetching (images, the Label Studio API), runtime (what lives as long as the process), references
(examples, webhook inbox, sync), serving (DINOvBackend), training (Start Training), bulk (batch jobs), http (the
Flask app); settings.py, errors.py and url_policy.py are below them all. README "How it works" walks a request
through them.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP (every entry point, the server and the bulk job, imports this package first):
# idle OpenMP threads sleep instead of spinning, so that request threads, gunicorn and other processes
# on the machine do not slow the model down (measured: up to 50x on 2 busy cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
