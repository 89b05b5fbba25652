"""Harness of the fault tests: this backend under gunicorn as a child process group that a test can start,
kill with SIGKILL (as the kernel's OOM killer or a node failure would) and start again on the same MODEL_DIR.

    backend = Backend(tmp_path / "model_dir", ls.url, TOKEN, FAULT_ENCODE_DELAY="0.3").start()
    backend.post("/webhook", json=payload)
    backend.kill()            # SIGKILL to gunicorn's master and workers, no clean-up of any kind
    backend.start()           # same MODEL_DIR, same port
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from tests.e2e.labelstudio import ServerProcess, free_port
from tests.support.paths import REPO_ROOT


class Backend:
    def __init__(self, model_dir: Path, label_studio_url: str, token: str, app: str = "tests.support.fault_app:app",
                 workers: int = 1, threads: int = 4, **env: str):
        self.model_dir = Path(model_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.workers, self.threads = workers, threads
        self.env = {**os.environ, "MODEL_DIR": str(self.model_dir), "LABEL_STUDIO_URL": label_studio_url,
                    "LABEL_STUDIO_API_KEY": token, "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
                    "OMP_WAIT_POLICY": "PASSIVE", **env}
        self.process: ServerProcess | None = None
        self.starts = 0

    def start(self, timeout: float = 60.0, healthy: bool = True) -> Backend:
        """Start gunicorn; return once /health answers (200 unless healthy=False, then any answer)."""
        self.starts += 1
        argv = [sys.executable, "-m", "gunicorn", self.app, "--bind", f"127.0.0.1:{self.port}",
                "--workers", str(self.workers), "--threads", str(self.threads), "--timeout", "0",
                "--graceful-timeout", "5"]
        log = self.model_dir.parent / f"backend-{self.port}.log"
        self.model_dir.parent.mkdir(parents=True, exist_ok=True)
        self.process = ServerProcess("backend", argv, self.env, REPO_ROOT, log).start()
        self.process.url = self.url

        def up() -> bool:
            status = requests.get(f"{self.url}/health", timeout=5).status_code
            return status == 200 or not healthy

        self.process.wait_until(up, timeout, "/health" if healthy else "an answer to /health")
        return self

    def kill(self) -> None:
        """SIGKILL to the whole process group: no atexit, no finally, no flush."""
        assert self.process is not None and self.process.process is not None
        os.killpg(self.process.process.pid, signal.SIGKILL)
        self.process.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines) if self.process else "(not started)"

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=kwargs.pop("timeout", 30), **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(f"{self.url}{path}", timeout=kwargs.pop("timeout", 30), **kwargs)


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition", interval: float = 0.1) -> Any:
    """Poll check() until it returns something true; its last value, or AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {value!r})")
        time.sleep(interval)
