"""What annotators feel: the backend under gunicorn, driven with the requests Label Studio 1.23.2 sends.

    python benchmarks/bench_serving.py --checkpoint demo --annotators 1,2,4,8 --images 4 --json serving.json
    python benchmarks/bench_serving.py --checkpoint swinT --annotators 1 --images 2      # Swin-T, random weights
    python benchmarks/bench_serving.py --checkpoint demo --annotators 4 --hostile 200    # with hostile requests
    python benchmarks/bench_serving.py --checkpoint demo --in-order --tasks 8 --seconds-per-task 20  # in order

The backend runs as in production (`gunicorn _wsgi:app`, one worker, `--threads` threads, MODEL_DIR in a
temporary folder, no Label Studio API: references arrive by webhook). Task images are generated scenes
(`dinov.data.scenes`) served from LOCAL_FILES_DOCUMENT_ROOT as `/data/local-files/?d=...`, the URL form of
Label Studio's local storage. Before measuring, one ANNOTATION_CREATED webhook per label gives the project a
brush reference (on images that are not benchmark tasks) and a warm-up task loads the model and embeds them.

For each number of concurrent annotators, every annotator (a thread with its own HTTP session) works through
its own `--images` new images, each one:

- task open: `/predict` with the task and no context (the pre-annotation Label Studio asks for when a task
  without a prediction opens);
- first click after open: `/predict` with `context.result` = one positive KeyPointLabels click (percent
  coordinates, original_width/height), on the image just opened: it should reuse the features the pre-annotation
  computed and cost the decoder only;
- next clicks: a second click, then a RectangleLabels box around the object, on the same image;

then clicks once on yet another image it has not opened (first click on a new image: encoding + decoder), and
finally sends "Retrieve predictions" for `--images` more new tasks in one `/predict` call (Label Studio's data
manager action), timed as images per second over all annotators together.

`--hostile N` adds a client that sends N hostile requests while the annotators work (bad JSON, a JSON array,
huge and odd URLs, paths out of the local-files root, unknown labels, a text file and a truncated PNG as
images, empty or malformed task lists, unknown routes) and counts answers by class (2xx/4xx/5xx/no answer)
and by kind; the RSS of the gunicorn worker is reported after the warm-up and at the end. Exit status 1 when
any request got a 5xx or no answer.

`--in-order` measures labeling in order instead: one annotator opens `--tasks` new tasks one after the other,
as Label Studio's Sequential sampling gives them (task ids 1, 2, ...), clicks once on an object of each, spends
`--seconds-per-task` seconds on it in all and submits it (the annotation in Label Studio, then the
ANNOTATION_CREATED webhook Label Studio sends). The backend runs once per value of `--ahead` (ENCODE_AHEAD_TASKS,
default "0,2": without and with encoding ahead) against a small stand-in for Label Studio's API on 127.0.0.1
(`MiniLabelStudio`: the project with its sampling, the task list the reference sync reads, the data manager's
task list the encode-ahead reads), with FEATURE_CACHE_SIZE at its default of 8; the references (one brush region
per label) are annotations the backend's sync reads at /setup. Reported: the first task's open, task open p50 /
p95 over the tasks after the first, and the click after open.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

import numpy as np
import requests
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from dinov.data.scenes import class_names, generate_scene  # noqa: E402

PROJECT = "1.1700000000"  # Label Studio names a project "<id>.<created>"
# Classes of the generated scenes used as labels: a few, so that every scene has several instances of them.
CLASSES = [0, 1, 5, 6]


def label_config(labels: list[str]) -> str:
    options = "".join(f'<Label value="{label}"/>' for label in labels)
    return (f'<View><Image name="image" value="$image"/>'
            f'<BrushLabels name="tag" toName="image">{options}</BrushLabels>'
            f'<KeyPointLabels name="kp" toName="image" smart="true">{options}</KeyPointLabels>'
            f'<RectangleLabels name="rect" toName="image" smart="true">{options}</RectangleLabels></View>')


# --------------------------------------------------------------------------------------------- the backend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_swin_t_checkpoint(path: Path) -> Path:
    """Swin-T with random weights in a file the backend loads like any checkpoint (the config is stored in it)."""
    import torch

    from dinov.build import save_model
    from dinov.config import swin_t
    from dinov.modeling.dinov import build_dinov

    if not path.exists():
        torch.manual_seed(0)
        config = swin_t()
        save_model(build_dinov(config), config, path)
    return path


@dataclass
class Backend:
    process: subprocess.Popen
    url: str
    log_path: Path

    def worker_pid(self) -> int | None:
        """The gunicorn worker (the master's child) that holds the model."""
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def worker_rss_mb(self) -> float | None:
        pid = self.worker_pid()
        if pid is None:
            return None
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_backend(model_dir: Path, images_root: Path, checkpoint: str, device: str, threads: int,
                  torch_threads: int | None, log_path: Path, timeout: float = 600.0,
                  extra_env: dict[str, str] | None = None) -> Backend:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DINOV_"))}
    env.update({"MODEL_DIR": str(model_dir), "DINOV_CHECKPOINT": checkpoint, "DEVICE": device,
                "LOCAL_FILES_DOCUMENT_ROOT": str(images_root), "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
                "OMP_WAIT_POLICY": "PASSIVE", "FEATURE_CACHE_SIZE": "32", **(extra_env or {})})
    if torch_threads:
        env["OMP_NUM_THREADS"] = str(torch_threads)
    argv = [sys.executable, "-m", "gunicorn", "_wsgi:app", "--bind", f"127.0.0.1:{port}", "--workers", "1",
            "--threads", str(threads), "--timeout", "0"]
    log = open(log_path, "ab")
    process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    log.close()
    backend = Backend(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the backend exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            health = requests.get(f"{backend.url}/health", timeout=5).json()
            if health["model"]["error"]:
                raise RuntimeError(f"the model did not load: {health['model']['error']}")
            if health["model"]["loaded"]:
                return backend
        except requests.RequestException:
            pass
        time.sleep(0.5)
    backend.stop()
    raise RuntimeError(f"the backend did not load its model within {timeout:.0f} s")


# --------------------------------------------------------------------------------------------- the requests


class Scenes:
    """Generated scene images written under the local-files root; each call gives a new, never-seen image."""

    def __init__(self, root: Path, size: tuple[int, int]):
        self.root, self.size = root, size
        self.count = 0
        self.lock = threading.Lock()
        self.scenes: dict[str, Any] = {}

    def new(self, prefix: str = "task") -> tuple[str, Any]:
        with self.lock:
            self.count += 1
            index = self.count
        scene = generate_scene(1000 + index, size=self.size, num_objects=(4, 8), classes=CLASSES)
        name = f"{prefix}-{index:05d}.png"
        Image.fromarray(scene.image).save(self.root / name)
        return f"/data/local-files/?d={name}", scene


def task(task_id: int, url: str) -> dict:
    return {"id": task_id, "project": 1, "data": {"image": url}, "annotations": [], "predictions": []}


def predict_body(tasks: list[dict], config: str, context: dict | None = None) -> dict:
    """The /predict body of Label Studio 1.23.2 (ml/api_connector.py: tasks, model_version, project,
    label_config, params with login/password/context)."""
    return {"tasks": tasks, "model_version": None, "project": PROJECT, "label_config": config,
            "params": {"login": None, "password": None, "context": context}}


def keypoint(x: float, y: float, size: tuple[int, int], label: str, positive: bool = True) -> dict:
    height, width = size
    return {"id": os.urandom(5).hex(), "type": "keypointlabels", "from_name": "kp", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0, "origin": "manual",
            "is_positive": positive, "value": {"x": 100 * x / width, "y": 100 * y / height, "width": 0.5,
                                               "keypointlabels": [label]}}


def rectangle(box: tuple[float, float, float, float], size: tuple[int, int], label: str) -> dict:
    height, width = size
    x0, y0, x1, y1 = (float(v) for v in box)
    return {"id": os.urandom(5).hex(), "type": "rectanglelabels", "from_name": "rect", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0, "origin": "manual",
            "value": {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
                      "height": 100 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": [label]}}


def brush(mask: np.ndarray, label: str) -> dict:
    from label_studio_sdk.converter import brush as ls_brush

    height, width = mask.shape
    return {"id": os.urandom(5).hex(), "type": "brushlabels", "from_name": "tag", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0, "origin": "manual",
            "value": {"format": "rle", "rle": ls_brush.mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]}}


def inner_point(mask: np.ndarray) -> tuple[float, float]:
    """A pixel well inside the mask (its centre of mass when inside, else its first pixel)."""
    ys, xs = np.nonzero(mask)
    y, x = int(round(ys.mean())), int(round(xs.mean()))
    if not mask[y, x]:
        y, x = int(ys[len(ys) // 2]), int(xs[len(xs) // 2])
    return x + 0.5, y + 0.5


def reference_scene(scenes: Scenes, class_index: int, label: str) -> tuple[str, np.ndarray]:
    """A new generated scene that holds the class: its image URL and the mask of one object of the class."""
    for _ in range(20):
        url, scene = scenes.new("reference")
        hits = [i for i, c in enumerate(scene.classes) if c == class_index]
        if hits:
            return url, scene.masks[hits[0]]
    raise RuntimeError(f"no generated scene holds class {label}")


def send_references(session: requests.Session, url: str, scenes: Scenes, config: str, labels: list[str]) -> int:
    """One ANNOTATION_CREATED webhook per label: a brush region of that class on a reference image."""
    sent, task_id = 0, 900_000
    for class_index, label in zip(CLASSES, labels):
        image_url, mask = reference_scene(scenes, class_index, label)
        task_id += 1
        annotation = {"id": task_id, "task": task_id, "project": 1, "result": [brush(mask, label)],
                      "was_cancelled": False, "ground_truth": False, "completed_by": 1,
                      "created_at": "2026-11-30T10:00:00Z", "updated_at": "2026-11-30T10:00:00Z"}
        response = session.post(f"{url}/webhook", timeout=60, json={
            "action": "ANNOTATION_CREATED", "annotation": annotation, "task": task(task_id, image_url),
            "project": {"id": 1, "label_config": config}})
        response.raise_for_status()
        sent += 1
    return sent


# --------------------------------------------------------------------------------------------- measuring


@dataclass
class Results:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    regions: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, kind: str, session: requests.Session, url: str, body: dict) -> dict | None:
        start = time.perf_counter()
        try:
            response = session.post(url, json=body, timeout=600)
        except requests.RequestException as e:
            with self.lock:
                self.statuses["no answer"] += 1
                self.failures.append(f"{kind}: {e}")
            return None
        elapsed = time.perf_counter() - start
        with self.lock:
            self.statuses[f"{response.status_code // 100}xx"] += 1
            if response.status_code != 200:
                self.failures.append(f"{kind}: {response.status_code} {response.text[:200]}")
                return None
            self.latencies[kind].append(elapsed)
        answer = response.json()
        with self.lock:
            for result in answer.get("results", []):
                if isinstance(result, dict):
                    self.regions[kind].append(len(result.get("result", [])))
        return answer


def annotator(backend_url: str, scenes: Scenes, config: str, labels: list[str], images: int, results: Results,
              start: threading.Barrier, retrieve_times: list[float], ids: Callable[[], int]) -> None:
    session = requests.Session()
    predict = f"{backend_url}/predict"
    label_of = dict(zip(CLASSES, labels))
    start.wait()
    for _ in range(images):
        url, scene = scenes.new()
        size = scene.image.shape[:2]
        one = task(ids(), url)
        results.timed("task_open", session, predict, predict_body([one], config))
        target = next((i for i, c in enumerate(scene.classes) if int(c) in label_of), 0)
        label = label_of.get(int(scene.classes[target]), labels[0])
        mask = scene.masks[target]
        x, y = inner_point(mask)
        first = keypoint(x, y, size, label)
        results.timed("first_click_after_open", session, predict, predict_body([one], config, {"result": [first]}))
        ys, xs = np.nonzero(mask)
        second = keypoint(float(xs[len(xs) // 3]) + 0.5, float(ys[len(ys) // 3]) + 0.5, size, label)
        results.timed("next_click", session, predict, predict_body([one], config, {"result": [first, second]}))
        box = (xs.min() - 2, ys.min() - 2, xs.max() + 3, ys.max() + 3)
        results.timed("next_click", session, predict, predict_body([one], config, {"result": [rectangle(box, size, label)]}))
    # a click on an image nobody opened: encoding + decoder
    url, scene = scenes.new()
    x, y = inner_point(scene.masks[0])
    label = label_of.get(int(scene.classes[0]), labels[0])
    results.timed("first_click_new_image", session, predict,
                  predict_body([task(ids(), url)], config, {"result": [keypoint(x, y, scene.image.shape[:2], label)]}))
    # "Retrieve predictions" on new tasks: one /predict with all of them
    batch = [task(ids(), scenes.new()[0]) for _ in range(images)]
    started = time.perf_counter()
    answer = results.timed("retrieve_predictions", session, predict, predict_body(batch, config))
    if answer is not None:
        with results.lock:
            retrieve_times.append(time.perf_counter() - started)


def hostile_requests(backend_url: str, images_root: Path, config: str, labels: list[str]) -> list[tuple[str, Callable]]:
    """(kind, send(session) -> response) of requests a hostile or broken client sends."""
    (images_root / "not-an-image.png").write_text("this is text, not a PNG\n" * 100)
    good = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    good.save(images_root / "whole.png")
    (images_root / "truncated.png").write_bytes((images_root / "whole.png").read_bytes()[:60])
    predict = f"{backend_url}/predict"

    def post_json(body: Any) -> Callable:
        return lambda s: s.post(predict, json=body, timeout=120)

    def predict_url(url: str, context: dict | None = None) -> Callable:
        return post_json(predict_body([task(1, url)], config, context))

    size = (64, 64)
    click = keypoint(10, 10, size, labels[0])
    return [
        ("bad JSON", lambda s: s.post(predict, data=b'{"tasks": [', headers={"Content-Type": "application/json"},
                                      timeout=120)),
        ("JSON array", post_json([1, 2, 3])),
        ("empty tasks", post_json(predict_body([], config))),
        ("tasks not a list", post_json({"tasks": "all", "label_config": config, "project": PROJECT})),
        ("no label config", post_json({"tasks": [task(1, "/data/local-files/?d=whole.png")], "project": "77.1"})),
        ("bad label config", post_json(predict_body([task(1, "/data/local-files/?d=whole.png")], "<View><oops"))),
        ("huge URL", predict_url("http://example.com/" + "a" * 200_000 + ".png")),
        ("internal host", predict_url("http://169.254.169.254/latest/meta-data/")),
        ("file URL", predict_url("file:///etc/passwd")),
        ("path out of root", predict_url("/data/local-files/?d=../../../../etc/passwd")),
        ("odd scheme", predict_url("javascript:alert(1)")),
        ("unicode URL", predict_url("/data/local-files/?d=%F0%9F%92%A5\u202e.png")),
        ("missing file", predict_url("/data/local-files/?d=nope/absent.png")),
        ("text as image", predict_url("/data/local-files/?d=not-an-image.png")),
        ("truncated PNG", predict_url("/data/local-files/?d=truncated.png")),
        ("text as image, click", predict_url("/data/local-files/?d=not-an-image.png", {"result": [click]})),
        ("unknown label click", predict_url("/data/local-files/?d=whole.png",
                                            {"result": [keypoint(10, 10, size, "NoSuchLabel")]})),
        ("click outside image", predict_url("/data/local-files/?d=whole.png",
                                            {"result": [keypoint(10_000, -50, size, labels[0])]})),
        ("context not a list", predict_url("/data/local-files/?d=whole.png", {"result": "click"})),
        ("two tasks, one click", post_json(predict_body([task(1, "/data/local-files/?d=whole.png")] * 2, config,
                                                        {"result": [click]}))),
        ("many bad tasks", post_json(predict_body([task(i, f"/data/local-files/?d=missing-{i}.png")
                                                   for i in range(500)], config))),
        ("webhook garbage", lambda s: s.post(f"{backend_url}/webhook", json={"action": "ANNOTATION_CREATED",
                                                                              "project": {"id": 1}}, timeout=120)),
        ("setup garbage", lambda s: s.post(f"{backend_url}/setup", json={"project": "x.y", "schema": 5},
                                           timeout=120)),
        ("unknown route", lambda s: s.get(f"{backend_url}/admin/../../etc/passwd", timeout=120)),
        ("wrong method", lambda s: s.get(predict, timeout=120)),
    ]


def hostile_client(requests_list: list[tuple[str, Callable]], count: int, stop: threading.Event,
                   outcome: dict[str, Counter]) -> None:
    session = requests.Session()
    for i in range(count):
        if stop.is_set():
            break
        kind, send = requests_list[i % len(requests_list)]
        try:
            status = f"{send(session).status_code // 100}xx"
        except requests.RequestException:
            status = "no answer"
            session = requests.Session()
        outcome["by_class"][status] += 1
        outcome["by_kind"][f"{kind}: {status}"] += 1


def percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(np.ceil(0.95 * len(ordered))) - 1)]
    return {"n": len(values), "p50_ms": round(1000 * statistics.median(ordered), 1), "p95_ms": round(1000 * p95, 1),
            "max_ms": round(1000 * ordered[-1], 1)}


def run_level(backend: Backend, scenes: Scenes, config: str, labels: list[str], annotators: int, images: int,
              hostile: int, images_root: Path) -> dict:
    results = Results()
    retrieve_times: list[float] = []
    counter = iter(range(10_000_000 * annotators, 10_000_000 * (annotators + 1)))
    id_lock = threading.Lock()

    def next_id() -> int:
        with id_lock:
            return next(counter)

    barrier = threading.Barrier(annotators + 1)
    threads = [threading.Thread(target=annotator, args=(backend.url, scenes, config, labels, images, results, barrier,
                                                         retrieve_times, next_id)) for _ in range(annotators)]
    for t in threads:
        t.start()
    hostile_outcome: dict[str, Counter] = {"by_class": Counter(), "by_kind": Counter()}
    stop = threading.Event()
    hostile_thread = None
    if hostile:
        hostile_thread = threading.Thread(target=hostile_client, args=(
            hostile_requests(backend.url, images_root, config, labels), hostile, stop, hostile_outcome))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    barrier.wait()
    if hostile_thread:
        hostile_thread.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if hostile_thread:
        hostile_thread.join()  # the hostile client sends all its requests, even after the annotators finished
    retrieved = annotators * images if len(retrieve_times) == annotators else None
    level = {
        "annotators": annotators,
        "images_per_annotator": images,
        "wall_s": round(wall, 2),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        **{kind: percentiles(results.latencies[kind]) for kind in
           ("task_open", "first_click_after_open", "next_click", "first_click_new_image")},
        # the retrieves run concurrently: throughput = all their images over the time until the last one finished
        "retrieve_predictions": {"images": retrieved, "images_per_s": round(retrieved / max(retrieve_times), 2)
                                 if retrieved else None, "p50_ms": percentiles(results.latencies["retrieve_predictions"]).get("p50_ms")},
        "regions_per_task_open": round(float(np.mean(results.regions["task_open"])), 1) if results.regions["task_open"] else 0,
        "statuses": dict(results.statuses),
        "failures": results.failures[:10],
    }
    if hostile:
        level["hostile"] = {"by_class": dict(hostile_outcome["by_class"]), "by_kind": dict(sorted(hostile_outcome["by_kind"].items()))}
    return level


def print_table(report: dict) -> None:
    print(f"\ncheckpoint={report['settings']['checkpoint']} device={report['settings']['device']} "
          f"image={report['settings']['image_size']} threads={report['settings']['gunicorn_threads']} "
          f"torch_threads={report['settings']['torch_threads']}")
    print("| annotators | task open p50 / p95 | first click after open p50 / p95 | next click p50 / p95 | "
          "first click, new image p50 / p95 | retrieve predictions | load |")
    print("|---|---|---|---|---|---|---|")
    for level in report["levels"]:
        def cell(kind: str, level: dict = level) -> str:
            stats = level[kind]
            return f"{stats['p50_ms']:.0f} / {stats['p95_ms']:.0f} ms" if stats.get("n") else "-"
        retrieve = level["retrieve_predictions"]["images_per_s"]
        print(f"| {level['annotators']} | {cell('task_open')} | {cell('first_click_after_open')} | "
              f"{cell('next_click')} | {cell('first_click_new_image')} | "
              f"{retrieve if retrieve is not None else '-'} images/s | {level['load_average_1min'][1]} |")
    print(f"worker RSS: {report['rss_mb']}")


# --------------------------------------------------------------------------------------------- labeling in order

MINI_TOKEN = "0123456789abcdef0123456789abcdef01234567"  # a legacy token of the stand-in Label Studio


class MiniLabelStudio:
    """The few API endpoints of Label Studio 1.23.2 the backend reads while one annotator labels in order, on
    127.0.0.1: the project (with its sampling), the project's task list (newest updated_at first, 404 past the
    end: the reference sync), the export by ids and the data manager's task list (/api/tasks/ with the id /
    total_annotations / cancelled_annotations filters and id ordering of its query: the encode-ahead)."""

    def __init__(self, config: str, sampling: str = "Sequential sampling"):
        self.lock = threading.Lock()
        self.tasks: dict[int, dict] = {}
        self.clock = 0
        self.project = {"id": 1, "title": "bench", "sampling": sampling, "label_config": config,
                        "parsed_label_config": {"tag": {"type": "BrushLabels", "to_name": ["image"],
                                                        "inputs": [{"type": "Image", "value": "image"}]}}}
        self.requests: Counter = Counter()
        handler = type("Handler", (_MiniHandler,), {"ls": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stamp(self) -> str:
        self.clock += 1
        return f"2026-12-01T10:{self.clock // 60:02d}:{self.clock % 60:02d}.000000Z"

    def add_task(self, task_id: int, url: str) -> None:
        with self.lock:
            self.tasks[task_id] = {"id": task_id, "project": 1, "data": {"image": url}, "annotations": [],
                                   "updated_at": self.stamp()}

    def annotate(self, task_id: int, result: list[dict]) -> dict:
        """A submitted annotation: kept on its task; returns it as the webhook carries it."""
        with self.lock:
            stamp = self.stamp()
            annotation = {"id": 500_000 + self.clock, "task": task_id, "project": 1, "result": result,
                          "was_cancelled": False, "ground_truth": False, "completed_by": 1, "created_at": stamp,
                          "updated_at": stamp}
            self.tasks[task_id]["annotations"].append(annotation)
            self.tasks[task_id]["updated_at"] = stamp
            return annotation

    def answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        with self.lock:
            self.requests[path] += 1
            if path.rstrip("/") == "/api/projects/1":
                return 200, {**self.project, "task_number": len(self.tasks)}
            if path.rstrip("/") == "/api/projects/1/tasks":
                page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
                ordered = sorted(self.tasks.values(), key=lambda t: (t["updated_at"], t["id"]), reverse=True)
                chunk = ordered[(page - 1) * size: page * size]
                return (200, chunk) if chunk else (404, {"detail": "Invalid page."})
            if path.rstrip("/") == "/api/projects/1/export":
                wanted = {int(i) for i in query.get("ids[]", [])}
                return 200, [t for t in self.tasks.values() if t["id"] in wanted]
            if path.rstrip("/") == "/api/tasks":
                prepared = json.loads(query.get("query", ["{}"])[0])
                rows = [{"id": t["id"], "project": 1, "data": t["data"], "is_labeled": bool(t["annotations"]),
                         "total_annotations": len(t["annotations"]), "cancelled_annotations": 0}
                        for t in sorted(self.tasks.values(), key=lambda t: t["id"])]
                for item in (prepared.get("filters") or {}).get("items", []):
                    name = item["filter"].removeprefix("filter:tasks:")
                    if item["operator"] == "greater":
                        rows = [r for r in rows if r[name] > item["value"]]
                    elif item["operator"] == "equal":
                        rows = [r for r in rows if r[name] == item["value"]]
                return 200, {"tasks": rows[: int(query.get("page_size", ["30"])[0])], "total": len(rows)}
        return 404, {"detail": "Not found."}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _MiniHandler(BaseHTTPRequestHandler):
    ls: MiniLabelStudio
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if self.headers.get("Authorization") != f"Token {MINI_TOKEN}":
            status, body = 401, {"detail": "Authentication credentials were not provided."}
        else:
            status, body = self.ls.answer(url.path, parse_qs(url.query))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def object_of(scene: Any, labels: list[str]) -> tuple[np.ndarray, str]:
    """The mask and label of the scene's first object of a labeled class (the one the annotator works on)."""
    label_of = dict(zip(CLASSES, labels))
    target = next((i for i, c in enumerate(scene.classes) if int(c) in label_of), 0)
    return scene.masks[target], label_of.get(int(scene.classes[target]), labels[0])


def label_in_order(backend_url: str, ls: MiniLabelStudio, tasks: list[tuple[int, str, Any]], config: str,
                   labels: list[str], seconds_per_task: float, results: Results) -> None:
    """One annotator through `tasks` in order: open, one click, the rest of the time on the task, submit."""
    session = requests.Session()
    predict = f"{backend_url}/predict"
    for position, (task_id, url, scene) in enumerate(tasks):
        started = time.perf_counter()
        one = task(task_id, url)
        results.timed("first_open" if position == 0 else "task_open", session, predict, predict_body([one], config))
        mask, label = object_of(scene, labels)
        x, y = inner_point(mask)
        results.timed("click", session, predict,
                      predict_body([one], config, {"result": [keypoint(x, y, scene.image.shape[:2], label)]}))
        time.sleep(max(0.0, seconds_per_task - (time.perf_counter() - started)))
        annotation = ls.annotate(task_id, [brush(mask, label)])  # submitted: Label Studio sends the webhook
        session.post(f"{backend_url}/webhook", timeout=60, json={
            "action": "ANNOTATION_CREATED", "annotation": annotation, "task": one,
            "project": {"id": 1, "label_config": config}}).raise_for_status()


def run_in_order(args: argparse.Namespace, work: Path, checkpoint: str, config: str, labels: list[str],
                 size: tuple[int, int], ahead: int) -> dict:
    """Labeling in order with ENCODE_AHEAD_TASKS=ahead: a fresh backend, stand-in Label Studio and images."""
    images_root, model_dir = work / f"images-{ahead}", work / f"model_dir-{ahead}"
    images_root.mkdir()
    scenes = Scenes(images_root, size)
    ls = MiniLabelStudio(config)
    for number, (class_index, label) in enumerate(zip(CLASSES, labels)):  # one reference per label
        url, mask = reference_scene(scenes, class_index, label)
        ls.add_task(900_001 + number, url)
        ls.annotate(900_001 + number, [brush(mask, label)])
    tasks = []
    for task_id in range(1, args.tasks + 1):
        url, scene = scenes.new()
        ls.add_task(task_id, url)
        tasks.append((task_id, url, scene))
    backend = None
    try:
        backend = start_backend(model_dir, images_root, checkpoint, args.device, args.threads, args.torch_threads,
                                work / f"backend-{ahead}.log", extra_env={
                                    "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": MINI_TOKEN,
                                    "ENCODE_AHEAD_TASKS": str(ahead), "FEATURE_CACHE_SIZE": "8", "LOG_LEVEL": "INFO"})
        session = requests.Session()
        session.post(f"{backend.url}/setup", json={"project": PROJECT, "schema": config, "extra_params": None,
                                                   "hostname": ls.url, "access_token": MINI_TOKEN},
                     timeout=60).raise_for_status()
        # warm-up on an image that is no task of the stream (its id is past them all: nothing follows it)
        warm = Results()
        url, scene = scenes.new("warmup")
        mask, label = object_of(scene, labels)
        for _ in range(2):
            warm.timed("warmup", session, f"{backend.url}/predict", predict_body([task(990_000, url)], config))
            x, y = inner_point(mask)
            warm.timed("warmup", session, f"{backend.url}/predict", predict_body(
                [task(990_000, url)], config, {"result": [keypoint(x, y, size, label)]}))
        if warm.failures:
            raise RuntimeError(f"warm-up failed: {warm.failures}")
        results = Results()
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        label_in_order(backend.url, ls, tasks, config, labels, args.seconds_per_task, results)
        wall = time.perf_counter() - started
        log = backend.log_path.read_text(errors="replace")
        return {
            "encode_ahead_tasks": ahead,
            "first_open_ms": round(1000 * results.latencies["first_open"][0], 1) if results.latencies["first_open"]
            else None,
            "task_open": percentiles(results.latencies["task_open"]),
            "click": percentiles(results.latencies["click"]),
            "regions_per_task_open": round(float(np.mean(results.regions["task_open"])), 1)
            if results.regions["task_open"] else 0,
            "encode_ahead_runs": log.count("next tasks in"),  # the encode-ahead's log line, one per open
            "data_manager_requests": ls.requests["/api/tasks/"],
            "wall_s": round(wall, 1),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "statuses": dict(results.statuses),
            "failures": results.failures[:10],
            "backend_alive": backend.process.poll() is None,
        }
    finally:
        if backend is not None:
            backend.stop()
        ls.stop()


def print_in_order(report: dict) -> None:
    s = report["settings"]
    print(f"\nlabeling in order: checkpoint={s['checkpoint']} device={s['device']} image={s['image_size']} "
          f"tasks={s['tasks']} seconds_per_task={s['seconds_per_task']} torch_threads={s['torch_threads']}")
    print("| ENCODE_AHEAD_TASKS | first task open | task open p50 / p95 (after the first) | click p50 / p95 | "
          "load |")
    print("|---|---|---|---|---|")
    for mode in report["modes"]:
        def cell(stats: dict) -> str:
            return f"{stats['p50_ms']:.0f} / {stats['p95_ms']:.0f} ms" if stats.get("n") else "-"
        print(f"| {mode['encode_ahead_tasks']} | {mode['first_open_ms']:.0f} ms | {cell(mode['task_open'])} | "
              f"{cell(mode['click'])} | {mode['load_average_1min'][1]} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo", help="demo, swinT (random weights: no download) or a file")
    parser.add_argument("--annotators", default="1,2,4,8", help="comma-separated numbers of concurrent annotators")
    parser.add_argument("--images", type=int, default=4, help="images each annotator opens (and retrieves)")
    parser.add_argument("--image-size", default="480x640", help="HEIGHTxWIDTH of the generated task images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads of the worker")
    parser.add_argument("--torch-threads", type=int, default=None, help="OMP_NUM_THREADS of the worker")
    parser.add_argument("--hostile", type=int, default=0, metavar="N", help="hostile requests sent per level")
    parser.add_argument("--json", help="write the report to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, store)")
    parser.add_argument("--in-order", action="store_true", help="labeling in order instead (see above)")
    parser.add_argument("--tasks", type=int, default=8, help="--in-order: tasks the annotator labels")
    parser.add_argument("--seconds-per-task", type=float, default=20.0, help="--in-order: time spent on each task")
    parser.add_argument("--ahead", default="0,2", help="--in-order: ENCODE_AHEAD_TASKS values, one run each")
    args = parser.parse_args(argv)
    if args.in_order:
        return main_in_order(args)
    levels = [int(v) for v in args.annotators.split(",") if v.strip()]
    height, width = (int(v) for v in args.image_size.lower().split("x"))
    size = (height, width)
    labels = [class_names()[c] for c in CLASSES]
    config = label_config(labels)

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    images_root, model_dir = work / "images", work / "model_dir"
    images_root.mkdir()
    checkpoint = args.checkpoint
    if checkpoint == "swinT":  # speed does not depend on the weights: random ones, no 200 MB download
        checkpoint = str(random_swin_t_checkpoint(work / "swinT_random.safetensors"))
    scenes = Scenes(images_root, size)
    backend = None
    try:
        started = time.perf_counter()
        backend = start_backend(model_dir, images_root, checkpoint, args.device, args.threads, args.torch_threads,
                                work / "backend.log")
        load_s = time.perf_counter() - started
        session = requests.Session()
        setup = session.post(f"{backend.url}/setup", json={"project": PROJECT, "schema": config,
                                                            "hostname": "http://localhost:8080", "access_token": "x",
                                                            "extra_params": None}, timeout=60)
        setup.raise_for_status()
        send_references(session, backend.url, scenes, config, labels)
        # warm-up: model kernels, reference embeddings (the webhook embeds them in the background)
        warm = Results()
        url, scene = scenes.new("warmup")
        for _ in range(2):
            warm.timed("warmup", session, f"{backend.url}/predict", predict_body([task(1, url)], config))
            x, y = inner_point(scene.masks[0])
            warm.timed("warmup", session, f"{backend.url}/predict", predict_body(
                [task(1, url)], config, {"result": [keypoint(x, y, size, labels[0])]}))
        if warm.failures:
            raise RuntimeError(f"warm-up failed: {warm.failures}")
        rss_warm = backend.worker_rss_mb()
        report: dict[str, Any] = {
            "settings": {"checkpoint": args.checkpoint, "device": args.device, "image_size": args.image_size,
                         "gunicorn_threads": args.threads, "torch_threads": args.torch_threads or "default",
                         "images_per_annotator": args.images, "hostile_per_level": args.hostile,
                         "cpu_count": os.cpu_count()},
            "model_load_s": round(load_s, 1),
            "levels": [],
        }
        for annotators in levels:
            report["levels"].append(run_level(backend, scenes, config, labels, annotators, args.images, args.hostile,
                                              images_root))
        report["rss_mb"] = {"after_warmup": round(rss_warm or 0, 1), "end": round(backend.worker_rss_mb() or 0, 1)}
        report["backend_alive"] = backend.process.poll() is None
    finally:
        if backend is not None:
            backend.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    if args.hostile:
        for level in report["levels"]:
            print(f"hostile, {level['annotators']} annotators: {level['hostile']['by_class']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    bad = any(level["statuses"].get("5xx") or level["statuses"].get("no answer")
              or (level.get("hostile") or {}).get("by_class", {}).get("5xx")
              or (level.get("hostile") or {}).get("by_class", {}).get("no answer") for level in report["levels"])
    return 1 if bad or not report["backend_alive"] else 0


def main_in_order(args: argparse.Namespace) -> int:
    height, width = (int(v) for v in args.image_size.lower().split("x"))
    size = (height, width)
    labels = [class_names()[c] for c in CLASSES]
    config = label_config(labels)
    work = Path(tempfile.mkdtemp(prefix="bench-in-order-"))
    checkpoint = args.checkpoint
    if checkpoint == "swinT":
        checkpoint = str(random_swin_t_checkpoint(work / "swinT_random.safetensors"))
    report: dict[str, Any] = {
        "settings": {"checkpoint": args.checkpoint, "device": args.device, "image_size": args.image_size,
                     "tasks": args.tasks, "seconds_per_task": args.seconds_per_task,
                     "gunicorn_threads": args.threads, "torch_threads": args.torch_threads or "default",
                     "cpu_count": os.cpu_count()},
        "modes": []}
    try:
        for ahead in (int(v) for v in args.ahead.split(",") if v.strip()):
            report["modes"].append(run_in_order(args, work, checkpoint, config, labels, size, ahead))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_in_order(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    bad = any(m["statuses"].get("5xx") or m["statuses"].get("no answer") or m["failures"] or not m["backend_alive"]
              for m in report["modes"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
