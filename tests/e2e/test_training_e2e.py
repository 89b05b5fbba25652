"""End to end: Start Training in a real Label Studio fine-tunes a project model that the backend then serves.

Two classes of shapes the demo model never saw (orange hexagons and white crosses, in colours it never saw
either), 14 annotated images (4 of them validate), the Train button (POST /api/ml/<id>/train), the backend on
its default settings (the whole model, 2000 cheap steps, at most 10 minutes). When the job ends, the project's
model_version changes and the predictions of 8 held-out tasks are clearly better than the demo model's: mIoU up
by 0.15 or more, no more wrong regions per image. Everything here is deterministic (scenes by seed, the split by
project and task ids, the job's seed, one torch thread) except where the time limit stops the training; the
verdict rests on 4 validation tasks (three runs in a row, and other splits: BENCHMARKS.md, Start Training).
"""

from __future__ import annotations

import numpy as np
import pytest
import requests

from dinov.data.scenes import EXTRA_KINDS, generate_extra_scene
from dinov.metrics import mask_iou

from .labelstudio import brush_region, region_label, region_mask, wait_for
from .test_labelstudio_e2e import _require_demo_model, wait_for_examples

pytestmark = pytest.mark.e2e

LABELS = list(EXTRA_KINDS)
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">{labels}</BrushLabels>
</View>""".format(labels="".join(f'<Label value="{label}"/>' for label in LABELS))
SIZE = (160, 200)
ANNOTATED, HELD_OUT = 14, 8
CLEARLY_BETTER = 0.15  # held-out mIoU gain the issue asks of a project model


def truth(scene) -> list[tuple[str, np.ndarray]]:
    return [(LABELS[int(c)], m) for c, m in zip(scene.classes, scene.masks)]


def held_out_quality(ls, tasks: dict, scenes: dict, names: list[str], version: str) -> dict:
    """mIoU (per true instance, the best IoU among predicted regions of its label) and wrong regions per image
    (IoU < 0.5 with every true instance of their label) of the predictions of `version`."""
    best, wrong = [], 0
    for name in names:
        predictions = [p for p in ls.predictions(tasks[name]["id"]) if p["model_version"] == version]
        assert len(predictions) == 1, predictions
        predicted = [(region_label(r), region_mask(r, SIZE)) for r in predictions[0]["result"]]
        truths = truth(scenes[name])
        for label, mask in truths:
            best.append(max([float(mask_iou(m, mask)[0, 0]) for l, m in predicted if l == label], default=0.0))
        for label, mask in predicted:
            ious = [float(mask_iou(mask, t)[0, 0]) for l, t in truths if l == label]
            wrong += max(ious, default=0.0) < 0.5
    return {"miou": float(np.mean(best)), "wrong_per_image": wrong / len(names)}


def predict(ls, pid: int, tasks: dict, names: list[str], other_than: str | None) -> str:
    """Retrieve predictions of `names` and wait for them; returns their model_version (not `other_than`)."""
    ls.retrieve_predictions(pid, [tasks[n]["id"] for n in names])

    def versions():
        found = [{p["model_version"] for p in ls.predictions(tasks[n]["id"])} - {other_than} for n in names]
        return found if all(found) else None
    found = wait_for(versions, timeout=180, what="a prediction of every held-out task")
    assert len(set.union(*found)) == 1, found
    return next(iter(found[0]))


@pytest.fixture(scope="module")
def training_backend(backend_factory):
    # Start Training as a new admin gets it: the default TRAIN_STEPS, TRAIN_MINUTES and TRAIN_PARAMETERS
    return backend_factory()


def shortened(version: str) -> str:
    """Label Studio 1.23.2's prediction tab label: a name longer than 15 characters as its first 8, "...", its last 6."""
    return version if len(version) <= 15 else f"{version[:8]}...{version[-6:]}"


def test_too_few_annotated_tasks_are_rejected_with_the_reason_and_no_traceback(ls, training_backend):
    # Through Label Studio's own Start Training: 5 annotated tasks give "rejected" with the reason, no failure
    backend = training_backend
    pid = ls.create_project(CONFIG)["id"]
    scenes = {f"few{seed}.png": generate_extra_scene(seed, size=SIZE, num_objects=(2, 3)) for seed in range(200, 205)}
    tasks = ls.upload_images(pid, {name: scene.image for name, scene in scenes.items()})
    ml = ls.connect_ml_backend(pid, backend.url)
    for name, scene in scenes.items():
        ls.create_annotation(tasks[name]["id"], [brush_region(m, label) for label, m in truth(scene)])
    ls.start_training(ml["id"])

    def finished():
        job = requests.get(f"{backend.url}/training", params={"project": pid}, timeout=10).json()["job"]
        return job if job and job["state"] not in ("queued", "running") else None
    job = wait_for(finished, timeout=300, interval=1, what="the training job to end")
    assert job["state"] == "rejected", job
    assert "has 5 annotated tasks; training needs at least 6" in job["message"], job["message"]
    status = requests.post(f"{backend.url}/job_status", json={"job": str(job["job_id"])}, timeout=10).json()
    assert status["job_status"] == "rejected" and status["message"] == job["message"]
    log = backend.log_tail(5000)
    assert f"training job {job['job_id']} rejected" in log and "Traceback" not in log, log
    assert ls.ml_backend(ml["id"])["state"] == "CO"  # the connection stays usable


def test_start_training_serves_a_better_project_model(ls, training_backend):
    _require_demo_model()
    backend = training_backend
    pid = ls.create_project(CONFIG)["id"]
    scenes = {f"shapes{seed}.png": generate_extra_scene(seed, size=SIZE, num_objects=(3, 5))
              for seed in range(300, 300 + ANNOTATED + HELD_OUT)}
    tasks = ls.upload_images(pid, {name: scene.image for name, scene in scenes.items()})
    ml = ls.connect_ml_backend(pid, backend.url)
    names = list(scenes)
    annotated, held_out = names[:ANNOTATED], names[ANNOTATED:]
    counts: dict[str, int] = {}
    for name in annotated:
        ls.create_annotation(tasks[name]["id"], [brush_region(m, label) for label, m in truth(scenes[name])])
        for label, _ in truth(scenes[name]):
            counts[label] = counts.get(label, 0) + 1
    wait_for_examples(backend, pid, counts, timeout=120)

    before_version = predict(ls, pid, tasks, held_out, None)
    before = held_out_quality(ls, tasks, scenes, held_out, before_version)

    ls.start_training(ml["id"])  # START_TRAINING to the backend's /webhook

    def finished():
        job = requests.get(f"{backend.url}/training", params={"project": pid}, timeout=10).json()["job"]
        return job if job and job["state"] not in ("queued", "running") else None
    job = wait_for(finished, timeout=900, interval=2, what="the training job to end")
    figures = job["figures"]
    assert job["state"] == "done", f"{job['state']}: {job['message']}; {figures}\n{backend.log_tail()}"
    assert figures["after"]["miou"] > figures["before"]["miou"] and figures["validation_tasks"] >= 3
    assert figures["after"]["wrong_per_image"] <= figures["before"]["wrong_per_image"], figures

    status = requests.get(f"{backend.url}/references", params={"project": pid}, timeout=10).json()["training"]
    assert status["served"] == status["active_checkpoint"] and f"+p{pid}-" in status["served"]
    metrics = requests.get(f"{backend.url}/metrics", timeout=10).text
    assert f'dinov_training_state{{project="{pid}",state="done"}} 1.0' in metrics

    after_version = predict(ls, pid, tasks, held_out, before_version)
    checkpoint = f"+p{pid}-{status['served'].rsplit('-', 1)[-1]}"  # model_version: dinov-demo-1a2b3c4d+p1-5e6f...
    assert checkpoint in after_version and checkpoint not in before_version, (before_version, after_version)
    # the versions read apart on Label Studio's tabs; the connection's model version is the new model's
    assert after_version.startswith(f"p{pid}j{job['job_id']}-") and before_version.startswith("base-")
    assert shortened(after_version) != shortened(before_version)
    assert ls.ml_backend(ml["id"])["model_version"] == after_version  # Label Studio's /setup on GET /api/ml/<id>
    listed = ls.call("GET", f"/api/ml/{ml['id']}/versions")  # Label Studio asks the backend's /versions
    assert after_version in listed["versions"] and before_version in listed["versions"], listed
    status = requests.post(f"{backend.url}/job_status", json={"job": str(job["job_id"])}, timeout=10).json()
    assert status["job_status"] == "finished" and status["figures"] == figures
    after = held_out_quality(ls, tasks, scenes, held_out, after_version)
    print(f"\nproject {pid}: held-out tasks: before {before}, after {after}; validation {figures}")
    assert after["miou"] >= before["miou"] + CLEARLY_BETTER, (before, after)
    assert after["wrong_per_image"] <= before["wrong_per_image"], (before, after)
