"""Test doubles shared by the bulk, fault and load tests: a fake Label Studio and a colour-segmenting model.

The fake Label Studio is a real HTTP server on 127.0.0.1 implementing the few API endpoints the backend uses,
with the behaviour of Label Studio 1.23.2 that matters here: the task list is ordered by updated_at (newest
first, 404 past the end), a prediction posted alone moves its task to the first page, the bulk import does
not, drops results that do not validate and refuses a list with a foreign task. Knobs make it fail the way
a real one does on a bad day: down (connections dropped), answering garbage, a 404 for a project that
exists, a 201 whose body cannot be parsed, slow answers.

The model double segments by colour (a prompt's embedding is the mean colour under it; generic segmentation
returns the parts of the image close to a class colour), so the expected masks are known exactly: images are
grey with red and blue squares. `delay` seconds per encoded image make it as slow as a real model on a CPU.
"""

from __future__ import annotations

import io
import itertools
import json
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np
import requests
from PIL import Image

from labelstudio_backend.regions import encode_rle

_EPOCH = datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
TOKEN = "fake0123456789abcdef0123456789abcdef0123"
SIZE = (40, 56)  # (height, width)
GREY, RED, BLUE = (128, 128, 128), (230, 20, 20), (20, 20, 230)
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Red"/><Label value="Blue"/></BrushLabels>
</View>"""


def scene(seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A grey image with one red and one blue square at positions that depend on seed."""
    rng = np.random.default_rng(seed)
    image = np.zeros((*SIZE, 3), np.uint8)
    image[:] = GREY
    masks = {}
    for colour, name, col in ((RED, "Red", 2), (BLUE, "Blue", 30)):
        r, c = int(rng.integers(2, 24)), col + int(rng.integers(0, 10))
        mask = np.zeros(SIZE, bool)
        mask[r:r + 12, c:c + 12] = True
        image[mask] = colour
        masks[name] = mask
    return image, masks


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def brush(mask: np.ndarray, label: str, rid: str) -> dict:
    return {"id": rid, "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": SIZE[1],
            "original_height": SIZE[0], "value": {"format": "rle", "rle": encode_rle(mask), "brushlabels": [label]}}


# --- the model double ---------------------------------------------------------------------------------------

class ColourModel:
    checkpoint_id = "colour"
    device = "cpu"

    def __init__(self, on_encode=None, delay: float = 0.0):
        self.batches: list[int] = []
        self.on_encode = on_encode or (lambda model: None)
        self.delay = delay

    def encode_images(self, images, batch_size=8):
        self.batches.append(len(images))
        self.on_encode(self)
        if self.delay:
            time.sleep(self.delay * len(images))
        return [SimpleNamespace(image=np.asarray(i, np.float32) / 255.0, image_size=np.asarray(i).shape[:2])
                for i in images]

    def encode_image(self, image):
        return self.encode_images([image])[0]

    def encode_prompts(self, encoded, masks):
        return np.stack([encoded.image[m].mean(axis=0) for m in np.asarray(masks, bool)]).astype(np.float32)

    def segment_generic(self, encoded, classes, score_threshold=0.3, max_instances=100, max_examples=16):
        found = []
        for index, examples in enumerate(classes):
            colour = np.asarray(examples)[:max_examples].mean(axis=0)
            close = np.linalg.norm(encoded.image - colour, axis=2) < 0.15
            count, parts = cv2.connectedComponents(close.astype(np.uint8))
            for i in range(1, count):
                mask = parts == i
                ys, xs = np.nonzero(mask)
                found.append(SimpleNamespace(mask=mask, score=0.9 - 0.01 * index, class_index=index,
                                             box=(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)))
        return found[:max_instances]

    def segment_interactive(self, encoded, points=None, point_labels=None, boxes=None, stroke=None):
        """The same-coloured part under the first click or box centre (enough for load tests)."""
        if points is not None and len(points):
            x, y = points[0]
        elif boxes is not None and len(boxes):
            x0, y0, x1, y1 = boxes[0]
            x, y = (x0 + x1) / 2, (y0 + y1) / 2
        else:
            return SimpleNamespace(best=None, candidates=[])
        h, w = encoded.image.shape[:2]
        colour = encoded.image[min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)]
        close = np.linalg.norm(encoded.image - colour, axis=2) < 0.15
        best = SimpleNamespace(mask=close, predicted_iou=0.9)
        return SimpleNamespace(best=best, candidates=[best])


# --- the fake Label Studio ----------------------------------------------------------------------------------

class FakeLabelStudio:
    """Label Studio's API on 127.0.0.1 (see the module's docstring); all state is public for the tests."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.lock = threading.RLock()
        self.projects: dict[int, dict] = {}
        self.tasks: dict[int, dict] = {}
        self.files: dict[str, bytes] = {}
        self.predictions: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.fail_imports = 0  # answer this many imports with 500
        self.refuse_imports = False  # answer every import with 400 (as for a list with a foreign task)
        self.unparsable_201 = False  # answer imports 201 with a body that is not JSON (a proxy's page)
        self.fault: str | None = None  # API answers: None, "down" (connection dropped), "garbage", "html"
        self.project_404 = 0  # answer this many project requests 404 although the project exists
        self.api_delay = 0.0  # seconds before every API answer
        self.clock = 0
        self._ids = itertools.count(1000)
        handler = type("Handler", (_Handler,), {"ls": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # --- what a test does in Label Studio

    def stamp(self) -> str:
        """Label Studio's clock: one second later at each change."""
        self.clock += 1
        return (_EPOCH + timedelta(seconds=self.clock)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def add_project(self, pid: int, config: str = CONFIG) -> None:
        with self.lock:
            self.projects[pid] = {"id": pid, "label_config": config, "parsed_label_config": {
                "tag": {"type": "BrushLabels", "to_name": ["image"], "inputs": [{"type": "Image", "value": "image"}],
                        "labels": ["Red", "Blue"]}}}

    def add_task(self, pid: int, tid: int, image: bytes, annotations: list[list[dict]] | None = None) -> dict:
        with self.lock:
            self.files[f"/data/upload/{pid}/{tid}.png"] = image
            task = {"id": tid, "project": pid, "data": {"image": f"/data/upload/{pid}/{tid}.png"},
                    "annotations": [], "updated_at": self.stamp()}
            self.tasks[tid] = task
            for result in annotations or []:
                self.annotate(tid, result)
            return task

    def annotate(self, tid: int, result: list[dict]) -> dict:
        with self.lock:
            task = self.tasks[tid]
            stamp = self.stamp()
            annotation = {"id": next(self._ids), "task": tid, "project": task["project"], "result": result,
                          "was_cancelled": False, "ground_truth": False, "completed_by": 1,
                          "created_at": stamp, "updated_at": stamp}
            task["annotations"].append(annotation)
            task["updated_at"] = stamp
            return annotation

    def update_annotation(self, aid: int, result: list[dict]) -> dict:
        with self.lock:
            task, annotation = self.find_annotation(aid)
            annotation["result"] = result
            annotation["updated_at"] = task["updated_at"] = self.stamp()
            return annotation

    def delete_annotation(self, aid: int) -> None:
        with self.lock:
            task, annotation = self.find_annotation(aid)
            task["annotations"].remove(annotation)
            task["updated_at"] = self.stamp()

    def find_annotation(self, aid: int) -> tuple[dict, dict]:
        for task in self.tasks.values():
            for annotation in task["annotations"]:
                if annotation["id"] == aid:
                    return task, annotation
        raise KeyError(f"no annotation {aid}")

    def annotation_ids(self, pid: int) -> set[int]:
        with self.lock:
            return {a["id"] for t in self.tasks.values() if t["project"] == pid for a in t["annotations"]
                    if not a.get("was_cancelled")}

    def webhook(self, event: str, tid: int, annotation: dict) -> dict:
        """The body Label Studio posts to the backend's /webhook for an annotation event."""
        task = {k: v for k, v in self.tasks[tid].items() if k != "annotations"}
        project = self.projects[task["project"]]
        return {"action": event, "annotation": annotation, "task": task,
                "project": {"id": project["id"], "label_config": project["label_config"]}}

    def retrieve_predictions(self, backend_url: str, pid: int, task_ids: list[int], timeout: float = 100.0) -> list:
        """What Label Studio's "Retrieve predictions" does: POST /predict (100 s timeout), store each dict entry."""
        tasks = [{"id": t, "project": pid, "data": self.tasks[t]["data"]} for t in task_ids]
        answer = requests.post(f"{backend_url}/predict", timeout=timeout, json={
            "tasks": tasks, "project": f"{pid}.1700000000", "label_config": self.projects[pid]["label_config"],
            "params": {"context": None}})
        answer.raise_for_status()
        results = answer.json()["results"]
        with self.lock:
            for task_id, entry in zip(task_ids, results):
                if isinstance(entry, dict) and "result" in entry:
                    self.predictions.append({"task": task_id, **entry})
        return results

    def of_task(self, tid: int) -> list[dict]:
        with self.lock:
            return [p for p in self.predictions if p["task"] == tid]

    def count(self, method: str, prefix: str) -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    ls: FakeLabelStudio
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: Any, content_type: str | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type or ("application/json" if not isinstance(body, bytes)
                                                          else "image/png"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _faulty(self) -> bool:
        """Answer as a Label Studio on a bad day, if the test asked for it; True when answered."""
        ls = self.ls
        if ls.api_delay:
            time.sleep(ls.api_delay)
        if ls.fault == "down":
            self.close_connection = True  # no answer at all: the client sees the connection dropped
            return True
        if ls.fault == "html":
            self._send(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
            return True
        if ls.fault == "garbage":
            self._send(200, {"detail": "everything is fine", "results": None})
            return True
        return False

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") != f"Token {self.ls.token}":
            self._send(401, {"detail": "Authentication credentials were not provided."})
            return False
        return True

    def do_GET(self):
        ls, url = self.ls, urlparse(self.path)
        query = parse_qs(url.query)
        with ls.lock:
            ls.requests.append(("GET", url.path))
        if url.path in ls.files:
            return self._send(200, ls.files[url.path])
        if self._faulty() or not self._authorised():
            return
        parts = url.path.strip("/").split("/")
        with ls.lock:
            if parts[:2] == ["api", "projects"] and len(parts) == 3:
                project = ls.projects.get(int(parts[2]))
                if ls.project_404:
                    ls.project_404 -= 1
                    project = None
                if project is None:
                    return self._send(404, {"detail": "Not found."})
                tasks = [t for t in ls.tasks.values() if t["project"] == project["id"]]
                return self._send(200, {**project, "task_number": len(tasks)})
            if parts[:2] == ["api", "projects"] and parts[3:] == ["tasks"]:
                pid = int(parts[2])
                page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["50"])[0])
                tasks = sorted((t for t in ls.tasks.values() if t["project"] == pid),
                               key=lambda t: (t["updated_at"], t["id"]), reverse=True)
                chunk = tasks[(page - 1) * size: page * size]
                if not chunk:
                    return self._send(404, {"detail": "Invalid page."})
                return self._send(200, [{**t, "predictions": ls.of_task(t["id"])} for t in chunk])
            if parts[:2] == ["api", "projects"] and parts[3:] == ["export"]:
                pid = int(parts[2])
                wanted = {int(i) for i in query.get("ids[]", [])}
                return self._send(200, [t for t in ls.tasks.values()
                                        if t["project"] == pid and (not wanted or t["id"] in wanted)])
            if url.path.rstrip("/") == "/api/predictions":
                return self._send(200, ls.of_task(int(query["task"][0])))
        self._send(404, {"detail": "Not found."})

    def do_POST(self):
        ls, url = self.ls, urlparse(self.path)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
        with ls.lock:
            ls.requests.append(("POST", url.path))
        if self._faulty() or not self._authorised():
            return
        parts = url.path.strip("/").split("/")
        with ls.lock:
            if parts[:2] == ["api", "projects"] and parts[3:] == ["import", "predictions"]:
                if ls.fail_imports:
                    ls.fail_imports -= 1
                    return self._send(500, {"detail": "database is locked"})
                pid = int(parts[2])
                if ls.refuse_imports or any(ls.tasks.get(item["task"], {}).get("project") != pid for item in body):
                    return self._send(400, {"detail": "Validation error", "validation_errors": "task not found"})
                created = 0
                for item in body:  # bulk_create: the tasks' updated_at stays
                    if all(isinstance(r, dict) and "type" in r for r in item["result"]):
                        ls.predictions.append(dict(item))
                        created += 1
                if ls.unparsable_201:
                    return self._send(201, b"<html>created</html>", "text/html")
                return self._send(201, {"created": created})
            if url.path.rstrip("/") == "/api/predictions":
                task = ls.tasks.get(body.get("task"))
                if task is None:
                    return self._send(400, {"task": ["Invalid pk - object does not exist."]})
                ls.predictions.append(dict(body))
                task["updated_at"] = ls.stamp()  # Prediction.save() touches its task
                return self._send(201, body)
        self._send(404, {"detail": "Not found."})


def make_project(ls: FakeLabelStudio, pid: int = 3, unlabeled: int = 7, broken: tuple[int, ...] = ()) -> dict:
    """Tasks 1 and 2 are annotated (task 1: red square, task 2: blue square); then `unlabeled` tasks from id 10.

    Returns {task id: {label: mask}} of the unlabeled tasks."""
    ls.add_project(pid)
    truth = {}
    image, masks = scene(1)
    ls.add_task(pid, 1, png(image), [[brush(masks["Red"], "Red", "r1")]])
    image, masks = scene(2)
    ls.add_task(pid, 2, png(image), [[brush(masks["Blue"], "Blue", "b1")]])
    for tid in range(10, 10 + unlabeled):
        image, masks = scene(tid)
        ls.add_task(pid, tid, b"this is not an image" if tid in broken else png(image))
        truth[tid] = masks
    return truth
