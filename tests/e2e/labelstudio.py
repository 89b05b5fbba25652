"""Harness for the end-to-end tests: a real Label Studio and this backend as child processes, an API client
for what the tests do in Label Studio, and region builders / decoders.

Facts about Label Studio 1.23.2 these helpers rely on (checked against a running server):
- ``label-studio start --username --password --user-token --enable-legacy-api-token`` creates the user, its
  legacy token and the organization on the first start (migrations first; no prompt with all three given).
- Uploads: ``POST /api/projects/<id>/import`` multipart, one field name per file; task data then holds
  ``/data/upload/<project>/<8 hex>-<file name>``.
- ``POST /api/ml`` calls the backend's /health and /setup and creates a project webhook to <url>/webhook for
  all events; ``POST /api/dm/actions?id=retrieve_tasks_predictions&project=<id>`` with
  ``{"selectedItems": {"all": false, "included": [task ids]}}`` calls /predict synchronously with every
  selected task that has no prediction of the current model_version; ``POST /api/ml/<id>/interactive-annotating``
  with ``{"task": id, "context": {...}}`` answers ``{"data": results[0]}`` or ``{"errors": [...]}``.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import requests

# Label Studio's environment for tests: legacy tokens (read when the organization is created), the backend
# on 127.0.0.1 reachable (ML_BLOCK_LOCAL_IP, SSRF protection), and nothing sent outside.
LABEL_STUDIO_ENV = {
    "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
    "ML_BLOCK_LOCAL_IP": "false",
    "SSRF_PROTECTION_ENABLED": "false",
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",
    "LATEST_VERSION_CHECK": "false",
    "COLLECT_ANALYTICS": "false",
}
# Variables of the parent environment that Label Studio would read as its own settings.
_LS_SHADOWING = ("PORT", "HOST", "USERNAME", "PASSWORD", "USER_TOKEN", "DJANGO_DB", "DATABASE_NAME",
                 "DJANGO_SETTINGS_MODULE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A child server in its own process group, logging to a file; stop() ends the whole group."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], cwd: Path, log_path: Path):
        self.name, self.argv, self.env, self.cwd, self.log_path = name, argv, dict(env), Path(cwd), Path(log_path)
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} before {what}:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name}: no {what} after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def start_label_studio(data_dir: Path, username: str, password: str, token: str, port: int | None = None,
                       timeout: float = 600.0) -> ServerProcess:
    """Start Label Studio on 127.0.0.1 with a fresh data dir; returns when /health answers (url set)."""
    executable = Path(sys.executable).parent / "label-studio"
    if not executable.exists():
        raise RuntimeError(f"{executable} not found: pip install label-studio==1.23.2 (or run pytest -m 'not e2e')")
    port = port or free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in _LS_SHADOWING and not k.startswith(("LABEL_STUDIO_", "HEARTEX_"))}
    env.update(LABEL_STUDIO_ENV)
    argv = [str(executable), "start", "--no-browser", "--data-dir", str(data_dir), "--internal-host", "127.0.0.1",
            "--port", str(port), "--username", username, "--password", password, "--user-token", token,
            "--enable-legacy-api-token"]
    server = ServerProcess("Label Studio", argv, env, data_dir.parent, data_dir.parent / "label-studio.log").start()

    def announced() -> bool:  # it moves to the next port when ours was taken meanwhile
        found = re.search(r"Starting development server at (http://\S+?)/?\s", server.log_tail(200) + "\n")
        if found:
            server.url = found.group(1).rstrip("/")
        return bool(found)

    server.wait_until(announced, timeout, "server start")
    server.wait_until(lambda: requests.get(f"{server.url}/health", timeout=5).status_code == 200, 60, "/health")
    return server


def start_backend(repo_root: Path, model_dir: Path, label_studio_url: str, api_key: str,
                  extra_env: Mapping[str, str] | None = None, port: int | None = None,
                  timeout: float = 180.0) -> ServerProcess:
    """Start this backend with `gunicorn _wsgi:app` from the repository root; returns when /health answers."""
    port = port or free_port()
    env = dict(os.environ)
    env.update({"MODEL_DIR": str(model_dir), "LABEL_STUDIO_URL": label_studio_url, "LABEL_STUDIO_API_KEY": api_key,
                "PORT": str(port), "DINOV_CHECKPOINT": "demo", "DEVICE": "cpu", "LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra_env or {})
    argv = [sys.executable, "-m", "gunicorn", "_wsgi:app", "--bind", f"127.0.0.1:{port}", "--workers",
            env.get("WORKERS", "1"), "--threads", env.get("THREADS", "4"), "--timeout", "0"]
    server = ServerProcess("backend", argv, env, repo_root, model_dir.parent / f"backend-{port}.log").start()
    server.url = f"http://127.0.0.1:{port}"
    server.wait_until(lambda: requests.get(f"{server.url}/health", timeout=5).status_code == 200, timeout, "/health")
    return server


# ------------------------------------------------------------------------------------------- API client


class LabelStudio:
    """What the tests do in Label Studio, through its HTTP API with the legacy token."""

    def __init__(self, url: str, token: str, timeout: float = 300.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"

    def call(self, method: str, path: str, expect: int | tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
        response = self.session.request(method, f"{self.url}{path}", timeout=self.timeout, **kwargs)
        expected = (expect,) if isinstance(expect, int) else expect
        if response.status_code not in expected:
            raise AssertionError(f"{method} {path} -> {response.status_code} (expected {expected}): {response.text[:1000]}")
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def create_project(self, label_config: str, title: str | None = None) -> dict:
        return self.call("POST", "/api/projects", json={"title": title or f"e2e {uuid.uuid4().hex[:8]}",
                                                       "label_config": label_config})

    def delete_project(self, project_id: int) -> None:
        self.call("DELETE", f"/api/projects/{project_id}/", expect=204)

    def upload_images(self, project_id: int, images: Mapping[str, Any]) -> dict[str, dict]:
        """Upload {file name: PNG bytes | uint8 array | PIL image}; returns {file name: task}."""
        files = {}
        for i, (name, image) in enumerate(images.items()):
            files[f"file{i}"] = (name, _png_bytes(image), "image/png")  # one field name per file
        answer = self.call("POST", f"/api/projects/{project_id}/import", files=files)
        if answer["task_count"] != len(images):
            raise AssertionError(f"uploaded {len(images)} images, Label Studio made {answer['task_count']} tasks")
        by_name = {}
        for task in self.tasks(project_id):
            stored = str(task["data"].get("image", ""))
            for name in images:
                if stored.endswith(f"-{name}"):
                    by_name[name] = task
        if set(by_name) != set(images):
            raise AssertionError(f"tasks for {sorted(set(images) - set(by_name))} not found after upload")
        return by_name

    def import_tasks(self, project_id: int, tasks: list[dict]) -> None:
        self.call("POST", f"/api/projects/{project_id}/import", json=tasks)

    def tasks(self, project_id: int) -> list[dict]:
        """Every task with its annotations (the project task list: newest updated first, 404 past the end)."""
        found, page = [], 1
        while True:
            response = self.session.get(f"{self.url}/api/projects/{project_id}/tasks/",
                                        params={"page": page, "page_size": 100}, timeout=self.timeout)
            if response.status_code == 404:
                return found
            response.raise_for_status()
            found += response.json()
            page += 1

    def delete_task(self, task_id: int) -> None:
        self.call("DELETE", f"/api/tasks/{task_id}/", expect=204)

    def create_annotation(self, task_id: int, result: list[dict], **fields: Any) -> dict:
        return self.call("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result, **fields})

    def update_annotation(self, annotation_id: int, **fields: Any) -> dict:
        return self.call("PATCH", f"/api/annotations/{annotation_id}/", json=fields)

    def delete_annotation(self, annotation_id: int) -> None:
        self.call("DELETE", f"/api/annotations/{annotation_id}/", expect=204)

    def connect_ml_backend(self, project_id: int, url: str, is_interactive: bool = True,
                           extra_params: dict | None = None, title: str = "DINOv") -> dict:
        """Add the backend to the project (Label Studio calls /health and /setup, and creates the webhook)."""
        body: dict[str, Any] = {"url": url, "project": project_id, "is_interactive": is_interactive, "title": title}
        if extra_params is not None:
            body["extra_params"] = extra_params
        return self.call("POST", "/api/ml", json=body)

    def ml_backend(self, ml_backend_id: int) -> dict:
        return self.call("GET", f"/api/ml/{ml_backend_id}")

    def webhooks(self, project_id: int) -> list[dict]:
        return self.call("GET", "/api/webhooks/", params={"project": project_id})

    def set_webhook_active(self, webhook_id: int, active: bool) -> dict:
        return self.call("PATCH", f"/api/webhooks/{webhook_id}/", json={"is_active": active})

    def start_training(self, ml_backend_id: int) -> None:
        """The Train button: sends START_TRAINING to the backend's /webhook."""
        self.call("POST", f"/api/ml/{ml_backend_id}/train", expect=200)

    def retrieve_predictions(self, project_id: int, task_ids: list[int]) -> dict:
        """The data manager's "Retrieve predictions" on these tasks (runs /predict before it answers)."""
        return self.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project_id},
                         json={"selectedItems": {"all": False, "included": list(task_ids)}})

    def interactive(self, ml_backend_id: int, task_id: int, context: dict | None) -> dict:
        """What the editor sends for a smart tool: {"data": {"result": [...], ...}} or {"errors": [...]}."""
        return self.call("POST", f"/api/ml/{ml_backend_id}/interactive-annotating",
                         json={"task": task_id, "context": context})

    def predictions(self, task_id: int) -> list[dict]:
        return self.call("GET", "/api/predictions/", params={"task": task_id})

    def create_access_token(self) -> str:
        """A personal access token (JWT refresh token) for the test user."""
        return self.call("POST", "/api/token/")["token"]


def wait_for(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.25, what: str = "condition") -> Any:
    """Poll until check() returns something truthy; returns it."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}")


# -------------------------------------------------------------------------------------------- regions


def brush_region(mask: np.ndarray, label: str, from_name: str = "tag", to_name: str = "image",
                 region_id: str | None = None) -> dict:
    """A BrushLabels result item drawing `mask` (bool [H, W]) as Label Studio stores it (RLE of RGBA)."""
    from label_studio_sdk.converter import brush

    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    return {"id": region_id or uuid.uuid4().hex[:10], "type": "brushlabels", "from_name": from_name,
            "to_name": to_name, "original_width": width, "original_height": height, "image_rotation": 0,
            "origin": "manual",
            "value": {"format": "rle", "rle": brush.mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]}}


def rectangle_region(box: tuple[float, float, float, float], size: tuple[int, int], label: str,
                     from_name: str = "box", to_name: str = "image", region_id: str | None = None) -> dict:
    """A RectangleLabels item for box (x0, y0, x1, y1) in pixels on an image of size (H, W)."""
    height, width = size
    x0, y0, x1, y1 = (float(v) for v in box)  # numpy scalars are not JSON
    return {"id": region_id or uuid.uuid4().hex[:10], "type": "rectanglelabels", "from_name": from_name,
            "to_name": to_name, "original_width": width, "original_height": height, "image_rotation": 0,
            "origin": "manual",
            "value": {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
                      "height": 100 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": [label]}}


def keypoint_region(x: float, y: float, size: tuple[int, int], label: str, positive: bool = True,
                    from_name: str = "kp", to_name: str = "image", region_id: str | None = None) -> dict:
    """A KeyPointLabels item (a smart-tool click) at pixel (x, y); positive=False is a negative point."""
    height, width = size
    x, y = float(x), float(y)
    return {"id": region_id or uuid.uuid4().hex[:10], "type": "keypointlabels", "from_name": from_name,
            "to_name": to_name, "original_width": width, "original_height": height, "image_rotation": 0,
            "origin": "manual", "is_positive": positive,
            "value": {"x": 100 * x / width, "y": 100 * y / height, "width": 0.5, "keypointlabels": [label]}}


def region_label(item: dict) -> str | None:
    value = item.get("value") or {}
    for key, labels in value.items():
        if key.endswith("labels") and labels:
            return labels[0]
    return None


def region_mask(item: dict, size: tuple[int, int]) -> np.ndarray:
    """Bool [H, W] of a result item: brush (RLE), polygon or rectangle, at image size (H, W)."""
    from label_studio_sdk.converter import brush
    from PIL import Image, ImageDraw

    height, width = size
    value = item["value"]
    kind = item["type"].removesuffix("labels")
    if kind == "brush":
        rgba = brush.decode_rle(value["rle"]).reshape(item["original_height"], item["original_width"], 4)
        return rgba[:, :, 3] > 127
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "polygon":
        draw.polygon([(x * width / 100, y * height / 100) for x, y in value["points"]], fill=1)
    elif kind == "rectangle":
        x0, y0 = value["x"] * width / 100, value["y"] * height / 100
        draw.rectangle([x0, y0, x0 + value["width"] * width / 100 - 1, y0 + value["height"] * height / 100 - 1], fill=1)
    else:
        raise ValueError(f"no mask for a {item['type']} region")
    return np.array(canvas, dtype=bool)


def _png_bytes(image: Any) -> bytes:
    if isinstance(image, bytes):
        return image
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
