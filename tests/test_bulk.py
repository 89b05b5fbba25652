"""Bulk auto-labeling (labelstudio_backend/bulk/) against a fake Label Studio and a test-double model.

The fake Label Studio is a real HTTP server on 127.0.0.1 that implements the few API endpoints the job uses,
with the behaviour of Label Studio 1.23.2 that matters here: the task list is ordered by updated_at (newest
first, 404 past the end), a prediction posted alone moves its task to the first page, the bulk import does
not, drops results that do not validate and refuses a list with a foreign task.

The model double segments by colour (a prompt's embedding is the mean colour under it; generic segmentation
returns the parts of the image close to a class colour), so the expected masks are known exactly: images are
grey with red and blue squares.
"""

from __future__ import annotations

import io
import json
import math
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np
import pytest
from PIL import Image

from labelstudio_backend import bulk
from labelstudio_backend.bulk import (
    BulkError, BulkOptions, JsonSink, PinnedReferences, label_config_from_export, parse_task_ids, run_bulk,
    select_tasks,
)
from labelstudio_backend.backend import DINOvBackend
from labelstudio_backend.runtime import Runtime
from labelstudio_backend.regions import encode_rle, region_to_mask
from labelstudio_backend.settings import Settings

TOKEN = "bulk0123456789abcdef0123456789abcdef0123"
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

    def __init__(self, on_encode=None):
        self.batches: list[int] = []
        self.on_encode = on_encode or (lambda model: None)

    def encode_images(self, images, batch_size=8):
        self.batches.append(len(images))
        self.on_encode(self)
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
        return SimpleNamespace(best=None, candidates=[])


# --- the fake Label Studio ----------------------------------------------------------------------------------

class FakeLabelStudio:
    def __init__(self):
        self.lock = threading.Lock()
        self.projects: dict[int, dict] = {}
        self.tasks: dict[int, dict] = {}
        self.files: dict[str, bytes] = {}
        self.predictions: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.fail_imports = 0  # answer this many imports with 500
        self.refuse_imports = False  # answer every import with 400 (as for a list with a foreign task)
        self.clock = 0
        handler = type("Handler", (_Handler,), {"ls": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stamp(self) -> str:
        self.clock += 1
        return f"2024-05-01T10:{self.clock // 60:02d}:{self.clock % 60:02d}.000000Z"

    def add_project(self, pid: int, config: str = CONFIG) -> None:
        self.projects[pid] = {"id": pid, "label_config": config, "parsed_label_config": {}}

    def add_task(self, pid: int, tid: int, image: bytes, annotations: list[dict] | None = None) -> dict:
        self.files[f"/data/upload/{pid}/{tid}.png"] = image
        task = {"id": tid, "project": pid, "data": {"image": f"/data/upload/{pid}/{tid}.png"},
                "annotations": [], "updated_at": self.stamp()}
        self.tasks[tid] = task
        for annotation in annotations or []:
            self.annotate(tid, annotation)
        return task

    def annotate(self, tid: int, result: list[dict]) -> None:
        task = self.tasks[tid]
        stamp = self.stamp()
        task["annotations"].append({"id": 1000 + len(self.predictions) + self.clock, "task": tid, "result": result,
                                    "was_cancelled": False, "ground_truth": False, "completed_by": 1,
                                    "created_at": stamp, "updated_at": stamp})
        task["updated_at"] = stamp

    def of_task(self, tid: int) -> list[dict]:
        return [p for p in self.predictions if p["task"] == tid]

    def count(self, method: str, prefix: str) -> int:
        return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    ls: FakeLabelStudio

    def log_message(self, *args):
        pass

    def _send(self, status: int, body) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(body, bytes) else "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") != f"Token {TOKEN}":
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
        if not self._authorised():
            return
        parts = url.path.strip("/").split("/")
        with ls.lock:
            if parts[:2] == ["api", "projects"] and len(parts) == 3:
                project = ls.projects.get(int(parts[2]))
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
            if url.path.rstrip("/") == "/api/predictions":
                return self._send(200, ls.of_task(int(query["task"][0])))
        self._send(404, {"detail": "Not found."})

    def do_POST(self):
        ls, url = self.ls, urlparse(self.path)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
        with ls.lock:
            ls.requests.append(("POST", url.path))
        if not self._authorised():
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
                return self._send(201, {"created": created})
            if url.path.rstrip("/") == "/api/predictions":
                task = ls.tasks.get(body.get("task"))
                if task is None:
                    return self._send(400, {"task": ["Invalid pk - object does not exist."]})
                ls.predictions.append(dict(body))
                task["updated_at"] = ls.stamp()  # Prediction.save() touches its task
                return self._send(201, body)
        self._send(404, {"detail": "Not found."})


# --- fixtures -----------------------------------------------------------------------------------------------

@pytest.fixture
def ls():
    fake = FakeLabelStudio()
    yield fake
    fake.stop()


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


def run(ls, tmp_path, model=None, **options) -> bulk.BulkReport:
    model = model or ColourModel()
    settings = options.pop("settings", None) or settings_for(ls, tmp_path)
    stop = options.pop("stop", None)
    opts = BulkOptions(project=options.pop("project", 3), progress=False, **options)
    return run_bulk(opts, settings, model_factory=lambda s: model, stop=stop)


def masks_by_label(prediction: dict) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    for region in prediction["result"]:
        label = region["value"]["brushlabels"][0]
        found[label] = found.get(label, np.zeros(SIZE, bool)) | region_to_mask(region, SIZE)
    return found


def without_ids(prediction: dict) -> dict:
    return {**prediction, "result": [{k: v for k, v in r.items() if k != "id"} for r in prediction["result"]]}


# --- tests --------------------------------------------------------------------------------------------------

def test_parse_task_ids():
    assert parse_task_ids("100-200, 305,400-") == [(100, 200), (305, 305), (400, sys.maxsize)]
    assert parse_task_ids("-5") == [(0, 5)]
    for bad in ("a-b", "9-3", " , "):
        with pytest.raises(BulkError, match="--task-ids"):
            parse_task_ids(bad)


def test_select_tasks_reasons():
    tasks = [{"id": 1, "labeled": True, "versions": []}, {"id": 2, "labeled": False, "versions": ["v1"]},
             {"id": 3, "labeled": False, "versions": ["v0"]}, {"id": 50, "labeled": False, "versions": []}]
    selected, skipped = select_tasks(tasks, "v1", only_unlabeled=True, ranges=[(1, 10)])
    assert [t["id"] for t in selected] == [3]
    assert skipped == {"outside --task-ids": 1, "already predicted": 1, "labeled (--only-unlabeled)": 1}


def test_bulk_posts_one_prediction_per_task_in_batches(ls, tmp_path):
    truth = make_project(ls, unlabeled=7)
    model = ColourModel()
    report = run(ls, tmp_path, model, batch_size=3, workers=2, only_unlabeled=True)
    assert (report.selected, report.done, report.failed) == (7, 7, [])
    assert report.skipped == {"labeled (--only-unlabeled)": 2}
    assert "-refs2-" in report.model_version  # two annotations in the store
    assert ls.count("POST", "/api/projects/3/import/predictions") == math.ceil(7 / 3)
    assert ls.count("POST", "/api/predictions") == 0
    assert [b for b in model.batches[-3:]] == [3, 3, 1]  # the task images, batched (after the references)
    for tid, masks in truth.items():
        (prediction,) = ls.of_task(tid)
        assert prediction["model_version"] == report.model_version
        found = masks_by_label(prediction)
        assert set(found) == {"Red", "Blue"}
        assert all(np.array_equal(found[label], masks[label]) for label in found)
    # the job file pins the version and the embeddings
    pinned = PinnedReferences.load(tmp_path / "model_dir" / "bulk" / "project-3.json")
    assert pinned.model_version == report.model_version and sorted(pinned.labels) == ["Blue", "Red"]
    saved = json.loads((tmp_path / "model_dir" / "bulk" / "project-3.report.json").read_text())
    assert saved["done"] == 7 and saved["model_version"] == report.model_version


def test_bulk_predicts_what_the_server_predicts(ls, tmp_path):
    make_project(ls, unlabeled=3)
    report = run(ls, tmp_path, batch_size=2)
    settings = settings_for(ls, tmp_path)
    runtime = Runtime(settings, model_factory=lambda s: ColourModel())
    runtime.predictor
    server = DINOvBackend(3, CONFIG, runtime=runtime)  # the server's model class over the same store
    assert server.model_version == report.model_version
    tasks = [{"id": t["id"], "data": t["data"]} for t in ls.tasks.values()]
    answers = server.predict(tasks)
    for task, answer in zip(tasks, answers):
        (posted,) = ls.of_task(task["id"])
        assert without_ids(posted) == without_ids({"task": task["id"], **answer})
    runtime.shutdown()


def test_ctrl_c_stops_after_the_batch_and_a_rerun_finishes(ls, tmp_path):
    truth = make_project(ls, unlabeled=8)

    def interrupt(model):  # Ctrl-C while the model encodes the second batch of task images
        if len(model.batches) == 4:  # two reference images, then the task batches
            signal.raise_signal(signal.SIGINT)

    stop = threading.Event()
    with bulk.StopOnSigint(stop):
        first = run(ls, tmp_path, ColourModel(on_encode=interrupt), batch_size=3, stop=stop, only_unlabeled=True)
    assert first.interrupted and first.done == 6 and first.failed == []
    assert sum(len(ls.of_task(t)) for t in truth) == 6
    second = run(ls, tmp_path, batch_size=3, only_unlabeled=True)
    assert not second.interrupted and second.done == 2
    assert second.skipped == {"already predicted": 6, "labeled (--only-unlabeled)": 2}
    assert second.model_version == first.model_version
    assert all(len(ls.of_task(t)) == 1 for t in truth)  # none twice, none missed


def test_a_rerun_keeps_the_pinned_references_unless_refreshed(ls, tmp_path):
    truth = make_project(ls, unlabeled=3)
    first = run(ls, tmp_path, only_unlabeled=True)
    image, masks = scene(99)  # an annotation made overnight
    ls.add_task(3, 99, png(image), [[brush(masks["Red"], "Red", "r9")]])
    again = run(ls, tmp_path, only_unlabeled=True)
    assert again.model_version == first.model_version and again.done == 0
    assert again.skipped["already predicted"] == 3
    refreshed = run(ls, tmp_path, only_unlabeled=True, refresh_references=True)
    assert refreshed.model_version != first.model_version and "-refs3-" in refreshed.model_version
    assert refreshed.done == 3
    assert all(sorted(p["model_version"] for p in ls.of_task(t)) == sorted([first.model_version,
                                                                            refreshed.model_version])
               for t in truth)


def test_broken_image_is_reported_and_skipped(ls, tmp_path, monkeypatch, capsys):
    truth = make_project(ls, unlabeled=4, broken=(11,))
    monkeypatch.setenv("LABEL_STUDIO_URL", ls.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model_dir"))
    monkeypatch.setenv("MIN_AREA", "4")
    report_path = tmp_path / "report.json"
    status = bulk.main(["--project", "3", "--only-unlabeled", "--batch-size", "2", "--no-progress",
                        "--report", str(report_path)], model_factory=lambda s: ColourModel())
    assert status == 1  # some task failed
    report = json.loads(report_path.read_text())
    assert report["done"] == 3 and len(report["failed"]) == 1
    assert report["failed"][0]["task"] == 11 and "not an image" in report["failed"][0]["reason"]
    assert ls.of_task(11) == [] and all(len(ls.of_task(t)) == 1 for t in truth if t != 11)
    assert "1 failed" in capsys.readouterr().out


def test_task_id_ranges(ls, tmp_path):
    make_project(ls, unlabeled=6)
    report = run(ls, tmp_path, task_ids=parse_task_ids("11-13,15"))
    assert report.done == 4 and report.skipped == {"outside --task-ids": 4}
    assert sorted(p["task"] for p in ls.predictions) == [11, 12, 13, 15]


def test_tasks_listed_before_anything_is_posted(ls, tmp_path):
    """A prediction posted alone moves its task to the first page of the task list: the job lists every task
    before it writes, so none is missed or predicted twice."""
    truth = make_project(ls, unlabeled=12)
    ls.refuse_imports = True  # every batch goes one by one through POST /api/predictions/
    report = run(ls, tmp_path, batch_size=2, page_size=3, only_unlabeled=True)
    assert report.done == 12 and all(len(ls.of_task(t)) == 1 for t in truth)
    assert ls.count("POST", "/api/predictions") == 12


def test_a_refused_batch_is_posted_one_by_one(ls, tmp_path, monkeypatch):
    truth = make_project(ls, unlabeled=3)
    original = bulk.LabelStudioSink.write

    def write_with_a_deleted_task(self, items):
        ls.tasks.pop(11, None)  # deleted in Label Studio while the job ran
        return original(self, items)

    monkeypatch.setattr(bulk.LabelStudioSink, "write", write_with_a_deleted_task)
    report = run(ls, tmp_path, batch_size=3, only_unlabeled=True)
    assert report.done == 2 and [f["task"] for f in report.failed] == [11]
    assert "refused" in report.failed[0]["reason"]
    assert all(len(ls.of_task(t)) == 1 for t in truth if t != 11)


def test_label_studio_down_stops_the_job(ls, tmp_path):
    make_project(ls, unlabeled=8)
    ls.fail_imports = 100
    report = run(ls, tmp_path, batch_size=1, only_unlabeled=True)
    assert "writes in a row failed" in report.stopped_because and report.done == 0
    assert ls.count("POST", "/api/projects/3/import/predictions") == bulk.MAX_WRITE_FAILURES
    assert len(report.failed) < 8  # it stopped instead of predicting everything for nothing


def test_out_file_instead_of_posting_and_resume(ls, tmp_path):
    truth = make_project(ls, unlabeled=5)
    out = tmp_path / "predictions.json"
    stop = threading.Event()

    def stop_after_first(model):
        if len(model.batches) == 4:
            stop.set()

    first = run(ls, tmp_path, ColourModel(on_encode=stop_after_first), batch_size=2, out=out, stop=stop,
                only_unlabeled=True)
    assert first.interrupted and first.done == 4
    assert ls.predictions == [] and ls.count("POST", "/api/") == 0
    second = run(ls, tmp_path, batch_size=2, out=out, only_unlabeled=True)
    assert second.done == 1 and second.skipped["already predicted"] == 4
    items = json.loads(out.read_text())
    assert sorted(i["task"] for i in items) == sorted(truth)
    assert {tuple(sorted(i)) for i in items} == {("model_version", "result", "score", "task")}
    assert not out.with_name(out.name + ".partial.jsonl").exists()
    # pinned again on new references: the file holds the new version only, one prediction per task
    image, masks = scene(98)
    ls.add_task(3, 98, png(image), [[brush(masks["Blue"], "Blue", "b9")]])
    third = run(ls, tmp_path, batch_size=2, out=out, only_unlabeled=True, refresh_references=True)
    assert third.model_version != second.model_version and third.done == 5
    items = json.loads(out.read_text())
    assert sorted(i["task"] for i in items) == sorted(truth)
    assert {i["model_version"] for i in items} == {third.model_version}


def test_folder_mode_with_an_export(tmp_path):
    images, refs = tmp_path / "photos", tmp_path / "export"
    images.mkdir()
    refs.mkdir()
    truth = {}
    for i in range(4):
        image, masks = scene(20 + i)
        Image.fromarray(image).save(images / f"img{i}.png")
        truth[f"img{i}.png"] = masks
    image, masks = scene(5)
    Image.fromarray(image).save(refs / "ref.png")
    export = [{"id": 41, "data": {"image": "/data/upload/9/0a1b2c3d-ref.png"},
               "annotations": [{"id": 77, "result": [brush(masks["Red"], "Red", "x1"), brush(masks["Blue"], "Blue",
                                                                                              "x2")],
                                "updated_at": "2024-05-01T10:00:00Z"}]}]
    (refs / "export.json").write_text(json.dumps(export))
    out = tmp_path / "tasks.json"
    settings = Settings(model_dir=tmp_path / "model_dir", min_area=4)
    options = BulkOptions(images=images, references=refs / "export.json", out=out, progress=False,
                          url_prefix="/data/local-files/?d=photos/", batch_size=3)
    report = run_bulk(options, settings, model_factory=lambda s: ColourModel())
    assert report.mode == "folder" and report.done == 4 and report.failed == []
    tasks = json.loads(out.read_text())
    assert [t["data"]["image"] for t in tasks] == [f"/data/local-files/?d=photos/img{i}.png" for i in range(4)]
    for task in tasks:
        found = masks_by_label(task["predictions"][0])
        expected = truth[task["data"]["image"].rsplit("/", 1)[1]]
        assert all(np.array_equal(found[label], expected[label]) for label in ("Red", "Blue"))
    # the derived config and the store hold what the export says
    assert 'BrushLabels name="tag" toName="image"' in label_config_from_export(export)
    again = run_bulk(options, settings, model_factory=lambda s: ColourModel())
    assert again.done == 0 and again.skipped == {"already predicted": 4}
    with pytest.raises(BulkError, match="--references"):
        run_bulk(BulkOptions(images=images, out=out), settings)


def test_json_sink_refuses_a_foreign_file(tmp_path):
    out = tmp_path / "x.json"
    out.write_text("{not json")
    with pytest.raises(BulkError, match="not JSON"):
        JsonSink(out, project_mode=True)


# --- the background mode of /predict --------------------------------------------------------------------------

def test_large_retrieve_predictions_finishes_in_the_background(ls, tmp_path):
    """/predict answers one entry per task within the budget; the rest is posted by a background thread;
    a second call meanwhile answers [] for the tasks the background owns; every task ends with one prediction."""
    from labelstudio_backend.server import create_app
    from labelstudio_backend.store import ReferenceStore
    from labelstudio_backend.sync import make_syncer

    truth = make_project(ls, unlabeled=10)

    class SlowModel(ColourModel):
        def encode_images(self, images, batch_size=8):
            time.sleep(0.25 * len(images))
            return super().encode_images(images, batch_size)

    settings = settings_for(ls, tmp_path, predict_time_budget=1.0)
    store = ReferenceStore(settings.db_path)
    app = create_app(lambda s: SlowModel(), settings, store=store, syncer=make_syncer(settings, store))
    client = app.test_client()
    runtime = app.extensions["dinov"]
    assert client.post("/setup", json={"project": "3.1700000000", "schema": CONFIG}).status_code == 200
    runtime.ensure_synced(3).result(timeout=30)  # the references, from the fake Label Studio's API
    version = DINOvBackend(3, CONFIG, runtime=runtime).model_version
    assert "-refs2-" in version
    tasks = [{"id": t["id"], "project": 3, "data": t["data"]} for t in ls.tasks.values() if t["id"] >= 10]

    def retrieve(batch):
        """What Label Studio does with the answer: store each dict entry, nothing for []."""
        answer = client.post("/predict", json={"tasks": batch, "project": "3.1700000000", "label_config": CONFIG,
                                               "params": {"context": None}})
        assert answer.status_code == 200, answer.json
        results = answer.json["results"]
        assert len(results) == len(batch)
        for task, entry in zip(batch, results):
            if isinstance(entry, dict):
                ls.predictions.append({"task": task["id"], **entry})
        return results

    started = time.perf_counter()
    first = retrieve(tasks)
    assert time.perf_counter() - started < 5
    answered = [t["id"] for t, r in zip(tasks, first) if isinstance(r, dict)]
    assert 1 <= len(answered) < len(tasks) and all(r == [] for r in first[len(answered):])
    second = retrieve([t for t in tasks if t["id"] not in answered])  # "Retrieve predictions" again
    assert all(r == [] for r in second)  # all owned by the background run
    assert runtime.deferral.wait(timeout=60)
    for tid, masks in truth.items():
        (prediction,) = ls.of_task(tid)
        assert prediction["model_version"] == version
        found = masks_by_label(prediction)
        assert all(np.array_equal(found[label], masks[label]) for label in ("Red", "Blue"))
    runtime.shutdown()


# --- Ray ------------------------------------------------------------------------------------------------------

def test_ray_mode_gives_the_same_predictions_as_local_mode(ls, tmp_path):
    ray = pytest.importorskip("ray")
    import ray.cloudpickle

    make_project(ls, unlabeled=5, broken=(12,))
    local_out, ray_out = tmp_path / "local.json", tmp_path / "ray.json"
    local = run(ls, tmp_path, batch_size=2, out=local_out)
    from labelstudio_backend.bulk.ray_mode import init_ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test double goes to the workers
    init_ray(None, num_cpus=2, log_to_driver=False)
    try:
        remote = run(ls, tmp_path, batch_size=2, out=ray_out, ray="")
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (remote.done, [f["task"] for f in remote.failed]) == (local.done, [12]) == (6, [12])
    assert remote.failed[0]["reason"] == local.failed[0]["reason"]
    by_task = lambda path: {i["task"]: without_ids(i) for i in json.loads(path.read_text())}
    assert by_task(ray_out) == by_task(local_out)
