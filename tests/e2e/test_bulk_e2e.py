"""End to end: bulk auto-labeling and the background mode of /predict against a real Label Studio 1.23.2.

The task images come from a small local HTTP server that answers each image after a delay, so a bulk job
takes long enough to be interrupted in its middle and a "Retrieve predictions" call overruns a short
PREDICT_TIME_BUDGET, whatever the speed of the model. Both the bulk command and the backend are told that
this server may be read (ALLOWED_HOSTS).

These tests check the plumbing (every task ends with exactly one prediction of the job's version, none
twice, a broken image reported and skipped, Ray mode == local mode), not mask quality, so any checkpoint does
(E2E_DINOV_CHECKPOINT; the demo model by default).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from dinov.build import DEMO_CHECKPOINT
from dinov.data.scenes import class_id, class_names, generate_scene

from .conftest import E2E_CHECKPOINT, E2E_DEVICE, REPO_ROOT
from .labelstudio import brush_region, wait_for

pytestmark = pytest.mark.e2e

IMAGE_DELAY_S = 0.4
SIZE = (96, 128)
CLASSES = [class_id("square", "red"), class_id("circle", "blue")]
LABELS = [class_names()[c] for c in CLASSES]
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          + "".join(f'<Label value="{label}"/>' for label in LABELS) + "</BrushLabels></View>")
# Low thresholds: with any checkpoint the predictions hold regions, so comparing them means something.
PREDICTION_ENV = {"SCORE_THRESHOLD": "0.05", "MIN_AREA": "1", "MAX_INSTANCES_PER_LABEL": "3"}


class SlowImages:
    """Serves PNG images on 127.0.0.1, each after IMAGE_DELAY_S."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path)
                time.sleep(IMAGE_DELAY_S)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, name: str, data: bytes) -> str:
        self.files[f"/{name}"] = data
        return f"{self.url}/{name}"


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images():
    server = SlowImages()
    yield server
    server.server.shutdown()


@pytest.fixture(scope="module")
def checkpoint():
    if E2E_CHECKPOINT == "demo" and not DEMO_CHECKPOINT.exists():
        pytest.fail(f"the demo checkpoint {DEMO_CHECKPOINT} does not exist yet; set E2E_DINOV_CHECKPOINT to "
                    "another checkpoint file for these plumbing tests")
    return E2E_CHECKPOINT


def make_project(ls, images: SlowImages, name: str, unlabeled: int, broken: bool) -> dict:
    """A project with 2 annotated scenes (the references) and `unlabeled` scenes, one with a broken image."""
    pid = ls.create_project(CONFIG, title=f"bulk e2e {name}")["id"]
    tasks, truth = [], {}
    for i in range(2 + unlabeled):
        scene = generate_scene(100 + i, size=SIZE, num_objects=2, classes=CLASSES)
        data = b"this is not an image" if broken and i == 3 else png(scene.image)
        tasks.append({"image": images.add(f"{name}/{i}.png", data)})
        truth[i] = scene
    ls.import_tasks(pid, tasks)
    by_url = {t["data"]["image"]: t["id"] for t in ls.tasks(pid)}
    ids = [by_url[t["image"]] for t in tasks]
    for i in range(2):  # the references: every object of the first two scenes, brushed exactly
        scene = truth[i]
        result = [brush_region(mask, LABELS[CLASSES.index(int(c))]) for mask, c in zip(scene.masks, scene.classes)]
        ls.create_annotation(ids[i], result)
    return {"id": pid, "task_ids": ids, "broken": ids[3] if broken else None, "unlabeled": ids[2:]}


def bulk_env(label_studio_url: str, token: str, model_dir: Path, checkpoint: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    env.update({"LABEL_STUDIO_URL": label_studio_url, "LABEL_STUDIO_API_KEY": token, "MODEL_DIR": str(model_dir),
                "DINOV_CHECKPOINT": checkpoint, "DEVICE": E2E_DEVICE, "ALLOWED_HOSTS": "127.0.0.1",
                "PYTHONUNBUFFERED": "1", **PREDICTION_ENV})
    return env


def bulk_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "labelstudio_backend.bulk", "--no-progress", *args]


def predictions(ls, task_id: int) -> list[dict]:
    return ls.predictions(task_id)


def regions(prediction: dict) -> list[dict]:
    """A prediction's regions without their random ids and scores, in a stable order (Ray batches images
    differently from the local run, which moves scores in the 7th digit; see region_scores)."""
    found = [{k: v for k, v in r.items() if k not in ("id", "score")} for r in prediction["result"]]
    return sorted(found, key=lambda r: json.dumps(r, sort_keys=True))


def region_scores(prediction: dict) -> list[float]:
    return sorted(r.get("score", 0.0) for r in prediction["result"])


def test_bulk_job_interrupted_and_rerun_and_ray_mode(ls, label_studio_url, label_studio_token, images, checkpoint,
                                                     tmp_path):
    project = make_project(ls, images, "bulk", unlabeled=10, broken=True)
    pid, broken = project["id"], project["broken"]
    env = bulk_env(label_studio_url, label_studio_token, tmp_path / "model_dir", checkpoint)

    # Ray mode first, writing to a file: it pins the references and leaves Label Studio as it is.
    ray_out = tmp_path / "ray.json"
    done = subprocess.run(bulk_command("--project", str(pid), "--only-unlabeled", "--batch-size", "2", "--ray",
                                       "--out", str(ray_out), "--report", str(tmp_path / "ray-report.json")),
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]  # 1: the broken image failed
    ray_report = json.loads((tmp_path / "ray-report.json").read_text())
    assert ray_report["done"] == 9 and [f["task"] for f in ray_report["failed"]] == [broken]
    assert all(predictions(ls, t) == [] for t in project["task_ids"])

    # Local mode, posting to Label Studio, stopped by Ctrl-C once the first batch is in.
    log = open(tmp_path / "first.log", "w")
    job = subprocess.Popen(bulk_command("--project", str(pid), "--only-unlabeled", "--batch-size", "1",
                                        "--workers", "1", "--report", str(tmp_path / "first.json")),
                           env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: any(predictions(ls, t) for t in project["unlabeled"]), timeout=300, interval=0.1,
                 what="the first prediction of the bulk job")
        job.send_signal(signal.SIGINT)
        assert job.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["interrupted"] and 1 <= first["done"] < 9, first
    assert first["model_version"] == ray_report["model_version"]  # the pinned references

    # An annotation made meanwhile does not restart the job (the references stay pinned).
    last = generate_scene(100 + 11, size=SIZE, num_objects=2, classes=CLASSES)
    label = LABELS[CLASSES.index(int(last.classes[0]))]
    ls.create_annotation(project["task_ids"][-1], [brush_region(last.masks[0], label)])
    rerun = subprocess.run(bulk_command("--project", str(pid), "--only-unlabeled", "--batch-size", "4",
                                        "--report", str(tmp_path / "second.json")),
                           env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr[-3000:]
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["model_version"] == first["model_version"]
    assert second["skipped"]["already predicted"] == first["done"]
    assert second["skipped"]["labeled (--only-unlabeled)"] == 3
    assert first["done"] + second["done"] == 8  # 10 unlabeled, one broken, one labeled meanwhile
    assert [f["task"] for f in second["failed"]] == [broken]
    assert "not an image" in second["failed"][0]["reason"] or "cannot" in second["failed"][0]["reason"]

    # Every task exactly once (the broken one never), and Ray mode predicted what local mode posted.
    from_ray = {item["task"]: item for item in json.loads(ray_out.read_text())}
    for task_id in project["unlabeled"]:
        stored = predictions(ls, task_id)
        if task_id == broken:
            assert stored == []
            continue
        if task_id == project["task_ids"][-1]:
            continue  # labeled before the rerun reached it, unless the first run had
        assert len(stored) == 1, (task_id, stored)
        assert stored[0]["model_version"] == first["model_version"]
        assert regions(stored[0]) == regions(from_ray[task_id])
        assert region_scores(stored[0]) == pytest.approx(region_scores(from_ray[task_id]), abs=1e-5)
        assert stored[0]["score"] == pytest.approx(from_ray[task_id]["score"], abs=1e-5)
    assert any(stored["result"] for t in project["unlabeled"] if t != broken for stored in predictions(ls, t))


def test_retrieve_predictions_beyond_the_time_budget(ls, backend_factory, images, checkpoint):
    """Label Studio sends every task in one /predict call; the backend answers within PREDICT_TIME_BUDGET with
    [] for the tasks it could not do in time (stored as nothing) and posts them from the background."""
    project = make_project(ls, images, "retrieve", unlabeled=8, broken=False)
    pid, targets = project["id"], project["unlabeled"]
    server = backend_factory(DINOV_CHECKPOINT=checkpoint, ALLOWED_HOSTS="127.0.0.1", PREDICT_TIME_BUDGET="2",
                             **PREDICTION_ENV)
    ml = ls.connect_ml_backend(pid, server.url, is_interactive=False)
    wait_for(lambda: requests.get(f"{server.url}/references", params={"project": pid}, timeout=10).json()
             ["revision"] >= 2, timeout=120, what="the references synced")
    version = ls.ml_backend(ml["id"])["model_version"]  # the served model and settings, not the references

    started = time.monotonic()
    ls.retrieve_predictions(pid, targets)
    assert time.monotonic() - started < 60
    right_away = {t: len(predictions(ls, t)) for t in targets}
    assert set(right_away.values()) <= {0, 1} and 0 in right_away.values(), right_away  # some deferred
    ls.retrieve_predictions(pid, targets)  # the user asks again while the background works
    wait_for(lambda: all(predictions(ls, t) for t in targets), timeout=300, interval=1.0,
             what="every task predicted")
    time.sleep(2 * IMAGE_DELAY_S)
    for task_id in targets:
        stored = predictions(ls, task_id)
        assert [p["model_version"] for p in stored] == [stored[0]["model_version"]], (task_id, stored)
        assert stored[0]["model_version"] == version
    assert version
