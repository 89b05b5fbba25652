"""Fixtures of the end-to-end tests: one real Label Studio for the whole session, and this backend under gunicorn.

Label Studio 1.23.2 must be installed in the test environment (`pip install label-studio==1.23.2`); its first
start migrates a fresh SQLite data dir (about 40 s to a few minutes on a slow machine). Deselect these tests
with `pytest -m "not e2e"`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .labelstudio import LabelStudio, ServerProcess, start_backend, start_label_studio

REPO_ROOT = Path(__file__).resolve().parents[2]
USERNAME = "e2e@example.com"
PASSWORD = "e2e-password-123"
TOKEN = "e2e0123456789abcdef0123456789abcdef01234"  # a legacy token (40 characters, like Label Studio's)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end test against a real Label Studio and the backend under gunicorn")


@pytest.fixture(scope="session")
def label_studio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A Label Studio on 127.0.0.1 with a fresh data dir, for every e2e test of the session."""
    root = tmp_path_factory.mktemp("label-studio")
    started = time.monotonic()
    server = start_label_studio(root / "data", USERNAME, PASSWORD, TOKEN)
    server.start_seconds = time.monotonic() - started
    print(f"\nLabel Studio up at {server.url} in {server.start_seconds:.1f} s")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def label_studio_url(label_studio_server: ServerProcess) -> str:
    return label_studio_server.url


@pytest.fixture(scope="session")
def label_studio_token(label_studio_server: ServerProcess) -> str:
    """The test user's legacy API token."""
    return TOKEN


@pytest.fixture(scope="session")
def ls(label_studio_url: str, label_studio_token: str) -> LabelStudio:
    """API client of the session's Label Studio."""
    return LabelStudio(label_studio_url, label_studio_token)


# The checkpoint and device of the e2e backend: the demo model on CPU unless E2E_DINOV_CHECKPOINT / E2E_DEVICE
# name others (e.g. swinT on cuda on a GPU machine).
E2E_CHECKPOINT = os.environ.get("E2E_DINOV_CHECKPOINT", "demo")
E2E_DEVICE = os.environ.get("E2E_DEVICE", "cpu")


@pytest.fixture(scope="session")
def backend_factory(tmp_path_factory: pytest.TempPathFactory, label_studio_url: str,
                    label_studio_token: str) -> Iterator[Callable[..., ServerProcess]]:
    """start(model_dir=None, **env) -> a running backend (gunicorn _wsgi:app); all are stopped at the end."""
    started: list[ServerProcess] = []

    def start(model_dir: Path | None = None, **env: str) -> ServerProcess:
        model_dir = model_dir or tmp_path_factory.mktemp("backend") / "model_dir"
        env = {"DINOV_CHECKPOINT": E2E_CHECKPOINT, "DEVICE": E2E_DEVICE, **env}
        server = start_backend(REPO_ROOT, model_dir, label_studio_url, label_studio_token, extra_env=env)
        server.model_dir = model_dir
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def backend(backend_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """The session's backend: DINOV_CHECKPOINT=demo on CPU (see E2E_CHECKPOINT), MODEL_DIR in a tmp dir, Label
    Studio's URL and token."""
    return backend_factory()
