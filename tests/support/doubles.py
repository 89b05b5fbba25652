"""Test doubles shared by the test modules: a model that segments by colour, and a fake Label Studio.

ColourPredictor implements what the backend uses of dinov.predictor.DINOvPredictor: a prompt's embedding is the
mean colour under it, generic segmentation returns the connected parts of the image close to a class colour,
and an interactive query returns the part under the click (or the box's centre, or the stroke's first pixel).
So the expected masks are known exactly on images of coloured squares on grey.

FakeLabelStudio is a real HTTP server on 127.0.0.1 with the few API endpoints the backend uses and the
behaviour of Label Studio 1.23.2 that matters: the task list is ordered by updated_at (newest first, 404 past
the end), a prediction posted alone moves its task to the first page, the bulk import does not, drops results
that do not validate and refuses a list with a foreign task; the data manager's task list (/api/tasks/) applies
the id / total_annotations / cancelled_annotations filters and the id ordering of its `query`. Knobs make it fail the way a real one does on a bad
day: down (connections dropped), answering HTML or JSON of the wrong shape, a 404 for a project that exists, a
201 whose body cannot be parsed, slow answers.
"""

from __future__ import annotations

import io
import itertools
import json
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np
import requests
from PIL import Image

from labelstudio_backend.labelstudio.regions import encode_rle, region_to_mask
from labelstudio_backend.settings import Settings

_EPOCH = datetime(2024, 5, 1, 10, tzinfo=UTC)  # the fake Label Studio's clock starts here
TOKEN = "bulk0123456789abcdef0123456789abcdef0123"  # the fake Label Studio's legacy token
SIZE = (40, 56)  # (height, width) of the fake Label Studio's scenes
GREY, RED, BLUE = (128, 128, 128), (230, 20, 20), (20, 20, 230)
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Red"/><Label value="Blue"/></BrushLabels>
</View>"""


# --- the model double ---------------------------------------------------------------------------------------

class ColourPredictor:
    checkpoint_id = "fake-ckpt"
    model_name = "fake-ckpt"
    device = "cpu"
    TOLERANCE = 0.15
    default_score_threshold = 0.0  # what the predictor applies when the backend passes no threshold

    def __init__(self, encode_delay: float = 0.0, on_encode=None):
        self.encode_delay = encode_delay
        self.on_encode = on_encode or (lambda model: None)
        self.batches: list[int] = []  # the size of every encode call
        self.encoded_images = 0
        self.encoded_prompts = 0
        self.lock = threading.Lock()

    def __getstate__(self):  # Ray sends the double to its workers: without the lock
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state):
        self.__dict__.update(state, lock=threading.Lock())

    def encode_images(self, images, batch_size=8):
        self.batches.append(len(images))
        self.on_encode(self)
        return [self._encode(image) for image in images]

    def encode_image(self, image):
        return self.encode_images([image])[0]

    def _encode(self, image):
        time.sleep(self.encode_delay)
        with self.lock:
            self.encoded_images += 1
        image = np.asarray(image)
        return SimpleNamespace(image=image.astype(np.float32) / 255.0, image_size=image.shape[:2])

    def encode_prompts(self, encoded, masks):
        with self.lock:
            self.encoded_prompts += len(masks)
        return np.stack([encoded.image[m].mean(axis=0) for m in np.asarray(masks, bool)]).astype(np.float32)

    def _parts(self, encoded, colour):
        close = np.linalg.norm(encoded.image - colour, axis=2) < self.TOLERANCE
        count, labels = cv2.connectedComponents(close.astype(np.uint8))
        return [labels == i for i in range(1, count)]

    def segment_generic(self, encoded, classes, score_threshold=0.3, max_instances=100, max_examples=16):
        instances = []
        for index, examples in enumerate(classes):
            colour = np.asarray(examples)[:max_examples].mean(axis=0)
            for mask in self._parts(encoded, colour):
                ys, xs = np.nonzero(mask)
                instances.append(SimpleNamespace(mask=mask, score=0.9 - 0.01 * index, class_index=index,
                                                 box=(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)))
        threshold = self.default_score_threshold if score_threshold is None else score_threshold
        return [i for i in instances if i.score >= threshold][:max_instances]

    def segment_interactive(self, encoded, points=None, point_labels=None, boxes=None, stroke=None):
        points = [] if points is None else list(np.asarray(points).reshape(-1, 2))
        labels = [1] * len(points) if point_labels is None else list(point_labels)
        seeds = [p for p, positive in zip(points, labels) if positive]
        seeds += [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in ([] if boxes is None else boxes)]
        if stroke is not None:
            ys, xs = np.nonzero(stroke)
            seeds.append((xs[0], ys[0]))
        x, y = seeds[0]
        colour = encoded.image[int(y), int(x)]
        part = next(m for m in self._parts(encoded, colour) if m[int(y), int(x)])
        negatives = [p for p, positive in zip(points, labels) if not positive]
        if any(part[int(py), int(px)] for px, py in negatives):
            return SimpleNamespace(best=None, candidates=[])
        best = SimpleNamespace(mask=part, predicted_iou=0.93, granularity=0, query_index=0)
        return SimpleNamespace(best=best, candidates=[best])


# --- scenes of the fake Label Studio --------------------------------------------------------------------------

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


def masks_by_label(prediction: dict) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    for region in prediction["result"]:
        label = region["value"]["brushlabels"][0]
        found[label] = found.get(label, np.zeros(SIZE, bool)) | region_to_mask(region, SIZE)
    return found



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
        self._prediction_ids = iter(range(1, 10**9))
        self.requests: list[tuple[str, str]] = []
        self.task_list_queries: list[dict[str, str]] = []  # the parameters of each /api/tasks/ request
        self.fail_imports = 0  # answer this many imports with 500
        self.refuse_imports = False  # answer every import with 400 (as for a list with a foreign task)
        self.unparsable_201 = False  # answer imports 201 with a body that is not JSON (a proxy's page)
        self.fault: str | None = None  # API answers: None, "down" (connection dropped), "garbage", "html"
        self.project_404 = 0  # answer this many project requests 404 although the project exists
        self.api_delay = 0.0  # seconds before every API answer
        self.clock = 0
        self._ids = itertools.count(1000)
        handler = type("Handler", (FakeLabelStudioHandler,), {"ls": self})
        self.server = _QuietServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # --- what a test does in Label Studio

    def stamp(self) -> str:
        """Label Studio's clock: one second later at each change."""
        self.clock += 1
        return (_EPOCH + timedelta(seconds=self.clock)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def add_project(self, pid: int, config: str = CONFIG, sampling: str | None = None) -> None:
        """A project; `sampling` (Label Studio's "Sequential sampling", "Uniform sampling", ...) is left out of
        its answers when None, so that the backend encodes nothing ahead for it."""
        with self.lock:
            extra = {} if sampling is None else {"sampling": sampling}
            self.projects[pid] = {"id": pid, "label_config": config, **extra, "parsed_label_config": {
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

    def data_manager_tasks(self, query: dict[str, list[str]]) -> list[dict]:
        """One page of the data manager's task list (fields=task_only): the filters of the `query` parameter that
        the backend uses (a number compared with greater/equal), ordered by id."""
        pid = int(query["project"][0])
        prepared = json.loads(query.get("query", ["{}"])[0])
        rows = []
        for task in sorted((t for t in self.tasks.values() if t["project"] == pid), key=lambda t: t["id"]):
            done = [a for a in task["annotations"] if not a.get("was_cancelled")]
            rows.append({"id": task["id"], "project": pid, "data": task["data"], "is_labeled": bool(done),
                         "total_annotations": len(done),
                         "cancelled_annotations": len(task["annotations"]) - len(done)})
        for item in (prepared.get("filters") or {}).get("items", []):
            name = item["filter"].removeprefix("filter:tasks:")
            compare = {"greater": lambda a, b: a > b, "equal": lambda a, b: a == b}[item["operator"]]
            rows = [r for r in rows if compare(r[name], item["value"])]
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["30"])[0])
        return rows[(page - 1) * size: page * size]

    def of_task(self, tid: int) -> list[dict]:
        with self.lock:
            return [p for p in self.predictions if p["task"] == tid]

    def count(self, method: str, prefix: str) -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))

    def next_prediction_id(self) -> int:
        return next(self._prediction_ids)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no error of ours
            super().handle_error(request, client_address)


class FakeLabelStudioHandler(BaseHTTPRequestHandler):
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
            if url.path.rstrip("/") == "/api/tasks":
                ls.task_list_queries.append({k: v[0] for k, v in query.items()})
                return self._send(200, {"tasks": ls.data_manager_tasks(query)})
        self._send(404, {"detail": "Not found."})

    def do_DELETE(self):
        ls, url = self.ls, urlparse(self.path)
        with ls.lock:
            ls.requests.append(("DELETE", url.path))
        if self._faulty() or not self._authorised():
            return
        parts = url.path.strip("/").split("/")
        if parts[:2] == ["api", "predictions"] and len(parts) == 3:
            with ls.lock:
                before = len(ls.predictions)
                ls.predictions[:] = [p for p in ls.predictions if p.get("id") != int(parts[2])]
                if len(ls.predictions) < before:
                    return self._send(204, b"", "text/plain")
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
                        ls.predictions.append({**item, "id": ls.next_prediction_id()})
                        created += 1
                if ls.unparsable_201:
                    return self._send(201, b"<html>created</html>", "text/html")
                return self._send(201, {"created": created})
            if url.path.rstrip("/") == "/api/predictions":
                task = ls.tasks.get(body.get("task"))
                if task is None:
                    return self._send(400, {"task": ["Invalid pk - object does not exist."]})
                ls.predictions.append({**body, "id": ls.next_prediction_id()})
                task["updated_at"] = ls.stamp()  # Prediction.save() touches its task
                return self._send(201, body)
        self._send(404, {"detail": "Not found."})


def make_project(ls: FakeLabelStudio, pid: int = 3, unlabeled: int = 7, broken: tuple[int, ...] = ()) -> dict:
    """Tasks 1 and 2 are annotated (task 1: red square, task 2: blue square); then `unlabeled` tasks."""
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


def settings_for(ls: FakeLabelStudio, tmp_path: Path, **overrides) -> Settings:
    values = dict(label_studio_url=ls.url, label_studio_api_key=TOKEN, model_dir=tmp_path / "model_dir",
                  min_area=4)
    values.update(overrides)
    return Settings(**values)
