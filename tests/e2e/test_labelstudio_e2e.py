"""End to end: a real Label Studio 1.23.2, this backend under gunicorn, and the reference sync.

The first group needs no trained model (connection, webhooks into the reference store, the API sync).
The second group checks masks against the known truth of generated scenes and needs the demo checkpoint
(DINOV_CHECKPOINT=demo, dinov/assets/demo.safetensors).
"""

from __future__ import annotations

import numpy as np
import pytest
import requests

from dinov.build import DEMO_CHECKPOINT
from dinov.data.scenes import class_id, class_names, generate_scene
from dinov.metrics import iou as mask_iou
from labelstudio_backend.errors import LabelStudioError
from labelstudio_backend.references.sync import sync_project
from labelstudio_backend.store import ReferenceStore

from .conftest import E2E_CHECKPOINT
from .labelstudio import (
    brush_region,
    keypoint_region,
    rectangle_region,
    region_label,
    region_mask,
    wait_for,
)

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    {labels}
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    {labels}
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    {labels}
  </RectangleLabels>
</View>"""


def config(labels: list[str]) -> str:
    return CONFIG.format(labels="\n    ".join(f'<Label value="{label}"/>' for label in labels))


def square_image(offset: int = 0, size: tuple[int, int] = (48, 64)) -> tuple[np.ndarray, np.ndarray]:
    """A grey image with a white square; returns (image, mask of the square)."""
    image = np.full((*size, 3), 90, np.uint8)
    mask = np.zeros(size, bool)
    mask[10:30, 10 + offset : 30 + offset] = True
    image[mask] = 255
    return image, mask


def references(backend, project_id: int) -> dict:
    response = requests.get(f"{backend.url}/references", params={"project": project_id}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_examples(backend, project_id: int, expected: dict, timeout: float = 60.0) -> dict:
    return wait_for(lambda: (r := references(backend, project_id))["examples_per_label"] == expected and r,
                    timeout=timeout, what=f"examples {expected} in project {project_id}")


# ------------------------------------------------------------------------- without a trained model


def test_label_studio_started(label_studio_server, ls):
    assert label_studio_server.url.startswith("http://127.0.0.1:")
    me = ls.call("GET", "/api/current-user/whoami")
    assert me["email"] == "e2e@example.com"


def test_connect_backend_and_webhooks_fill_the_store(ls, backend):
    project = ls.create_project(config(["Cat", "Dog"]))
    pid = project["id"]
    (image_a, mask_a), (image_b, mask_b) = square_image(0), square_image(20)
    tasks = ls.upload_images(pid, {"a.png": image_a, "b.png": image_b})

    ml = ls.connect_ml_backend(pid, backend.url)
    assert ml["state"] == "CO", ml  # /health and /setup answered
    assert ml["model_version"], ml
    hooks = ls.webhooks(pid)
    assert [(h["url"], h["send_for_all_actions"], h["send_payload"]) for h in hooks] == [
        (f"{backend.url}/webhook", True, True)
    ]
    assert references(backend, pid)["examples_per_label"] == {}

    annotation = ls.create_annotation(
        tasks["a.png"]["id"], [brush_region(mask_a, "Cat"), rectangle_region((10, 10, 30, 30), (48, 64), "Dog")]
    )
    first = wait_for_examples(backend, pid, {"Cat": 1, "Dog": 1})

    # a cancelled (skipped) annotation is no example
    ls.create_annotation(tasks["b.png"]["id"], [brush_region(mask_b, "Dog")], was_cancelled=True)
    # ANNOTATION_UPDATED replaces the annotation's regions
    ls.update_annotation(annotation["id"], result=[brush_region(mask_a, "Dog")])
    updated = wait_for_examples(backend, pid, {"Dog": 1})
    assert updated["revision"] > first["revision"]

    # ANNOTATIONS_DELETED removes them
    ls.delete_annotation(annotation["id"])
    wait_for_examples(backend, pid, {})


def test_start_training_syncs_what_the_webhook_missed(ls, backend):
    project = ls.create_project(config(["Cat", "Dog"]))
    pid = project["id"]
    image, mask = square_image(5)
    tasks = ls.upload_images(pid, {"c.png": image})
    ml = ls.connect_ml_backend(pid, backend.url)
    hook = ls.webhooks(pid)[0]
    ls.set_webhook_active(hook["id"], False)
    ls.create_annotation(tasks["c.png"]["id"], [brush_region(mask, "Cat"), brush_region(mask, "Dog")])
    ls.set_webhook_active(hook["id"], True)
    assert references(backend, pid)["examples_per_label"] in ({}, {"Cat": 1, "Dog": 1})  # a first-use sync may run
    ls.start_training(ml["id"])  # START_TRAINING -> sync from the API
    state = wait_for_examples(backend, pid, {"Cat": 1, "Dog": 1})
    assert state["last_sync"]


def test_sync_project_from_the_api(ls, label_studio_url, label_studio_token, tmp_path):
    """sync_project against the real API: full, incremental, updates, deletions, both token kinds."""
    project = ls.create_project(config(["Cat", "Dog"]))
    pid = project["id"]
    images = {f"s{i}.png": square_image(i * 3)[0] for i in range(4)}
    tasks = ls.upload_images(pid, images)
    _, mask = square_image(0)
    made = {name: ls.create_annotation(tasks[name]["id"], [brush_region(mask, "Cat")]) for name in ("s0.png", "s1.png")}
    ls.create_annotation(tasks["s2.png"]["id"], [brush_region(mask, "Dog")], was_cancelled=True)
    store = ReferenceStore(tmp_path / "refs.sqlite3")

    report = sync_project(store, label_studio_url, label_studio_token, pid, page_size=2)  # several pages
    assert (report.full, report.added, report.updated, report.removed, report.tasks_seen) == (True, 2, 0, 0, 4)
    assert report.pages == 2
    assert store.stats(pid)["examples_per_label"] == {"Cat": 2}
    examples = store.examples(pid)
    assert {e.image_url for e in examples} == {tasks["s0.png"]["data"]["image"], tasks["s1.png"]["data"]["image"]}
    assert all(e.original_size == (64, 48) for e in examples)

    again = sync_project(store, label_studio_url, label_studio_token, pid, page_size=2)
    assert (again.full, again.added, again.updated, again.removed) == (False, 0, 0, 0)

    # incremental: an update, a deletion and a new annotation since the last sync
    ls.update_annotation(made["s0.png"]["id"], result=[brush_region(mask, "Dog")])
    ls.delete_annotation(made["s1.png"]["id"])
    ls.create_annotation(tasks["s3.png"]["id"], [brush_region(mask, "Cat"), brush_region(mask, "Dog")])
    step = sync_project(store, label_studio_url, label_studio_token, pid, page_size=2)
    assert (step.full, step.added, step.updated, step.removed) == (False, 1, 1, 1)
    assert store.stats(pid)["examples_per_label"] == {"Cat": 1, "Dog": 2}

    # a deleted task is found by a full sync; a personal access token works as well
    ls.delete_task(tasks["s3.png"]["id"])
    pat = ls.create_access_token()
    full = sync_project(store, label_studio_url, pat, pid, full=True, page_size=2)
    assert (full.full, full.removed) == (True, 1)
    assert store.stats(pid)["examples_per_label"] == {"Dog": 1}

    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_API_KEY"):
        sync_project(store, label_studio_url, "0" * 40, pid)

    # a project deleted in Label Studio (no webhook says so) is forgotten
    ls.delete_project(pid)
    gone = sync_project(store, label_studio_url, label_studio_token, pid)
    assert gone.project_deleted and store.stats(pid)["examples"] == 0 and store.revision(pid) == 0


def test_first_use_sync_pulls_existing_annotations(ls, backend):
    project = ls.create_project(config(["Cat", "Dog"]))
    pid = project["id"]
    image, mask = square_image(2)
    tasks = ls.upload_images(pid, {"d.png": image})
    ls.create_annotation(tasks["d.png"]["id"], [brush_region(mask, "Dog")])  # before the backend is connected
    ls.connect_ml_backend(pid, backend.url)  # /setup: the project's first use starts a sync
    wait_for_examples(backend, pid, {"Dog": 1})


def test_references_survive_a_backend_restart(ls, backend_factory):
    first = backend_factory()
    project = ls.create_project(config(["Cat", "Dog"]))
    pid = project["id"]
    image, mask = square_image(4)
    tasks = ls.upload_images(pid, {"r.png": image})
    ls.connect_ml_backend(pid, first.url)
    ls.create_annotation(tasks["r.png"]["id"], [brush_region(mask, "Cat"), brush_region(mask, "Dog")])
    before = wait_for_examples(first, pid, {"Cat": 1, "Dog": 1})
    first.stop()
    # no API key: no sync, so what the new process shows comes from the SQLite store in MODEL_DIR
    second = backend_factory(first.model_dir, LABEL_STUDIO_API_KEY="")
    after = references(second, pid)
    assert (after["examples_per_label"], after["revision"]) == ({"Cat": 1, "Dog": 1}, before["revision"])
    second.stop()


def test_retrieve_predictions_returns_one_entry_per_task(ls, backend):
    """With no example yet, every task still gets an entry (empty result) so Label Studio stores it."""
    _require_demo_model()  # the backend answers 503 while its model cannot load
    project = ls.create_project(config(["Cat", "Dog"]))
    pid = project["id"]
    tasks = ls.upload_images(pid, {f"e{i}.png": square_image(i)[0] for i in range(3)})
    ls.connect_ml_backend(pid, backend.url)
    ids = [t["id"] for t in tasks.values()]
    answer = ls.retrieve_predictions(pid, ids)
    assert answer["processed_items"] == 3
    for task_id in ids:
        predictions = ls.predictions(task_id)
        assert len(predictions) == 1, predictions
        assert predictions[0]["result"] == []
        assert predictions[0]["model_version"]


# --------------------------------------------------------------- with the demo model: masks vs truth

SCENE_CLASSES = [class_id("circle", "red"), class_id("square", "blue"), class_id("triangle", "yellow")]
SCENE_LABELS = [class_names()[c] for c in SCENE_CLASSES]
SCENE_SIZE = (256, 256)


def _require_demo_model() -> None:
    if E2E_CHECKPOINT == "demo" and not DEMO_CHECKPOINT.exists():
        pytest.fail(f"the demo checkpoint {DEMO_CHECKPOINT} does not exist yet: these checks need the trained model")


def _scene(seed: int):
    return generate_scene(seed, size=SCENE_SIZE, num_objects=(2, 4), classes=SCENE_CLASSES)


def _truth(scene) -> list[tuple[str, np.ndarray]]:
    return [(class_names()[int(c)], m) for c, m in zip(scene.classes, scene.masks)]


@pytest.fixture(scope="module")
def scene_project(ls, backend):
    """A project of generated scenes: the first three fully annotated with brush masks, the rest not."""
    _require_demo_model()
    project = ls.create_project(config(SCENE_LABELS))
    pid = project["id"]
    scenes = {f"scene{seed}.png": _scene(seed) for seed in range(100, 108)}
    tasks = ls.upload_images(pid, {name: scene.image for name, scene in scenes.items()})
    ml = ls.connect_ml_backend(pid, backend.url)
    annotated = list(scenes)[:3]
    for name in annotated:
        ls.create_annotation(tasks[name]["id"], [brush_region(m, label) for label, m in _truth(scenes[name])])
    counts: dict[str, int] = {}
    for name in annotated:
        for label, _ in _truth(scenes[name]):
            counts[label] = counts.get(label, 0) + 1
    wait_for_examples(backend, pid, counts, timeout=120)
    return {"id": pid, "ml": ml, "scenes": scenes, "tasks": tasks, "annotated": annotated}


def test_retrieve_predictions_segments_unlabelled_scenes(ls, scene_project):
    pid, scenes, tasks = scene_project["id"], scene_project["scenes"], scene_project["tasks"]
    targets = [name for name in scenes if name not in scene_project["annotated"]]
    # Tasks beyond the backend's time budget are answered [] (stored as nothing) and finished in the
    # background, which posts their predictions through the API.
    ls.retrieve_predictions(pid, [tasks[name]["id"] for name in targets])
    wait_for(lambda: all(ls.predictions(tasks[name]["id"]) for name in targets), timeout=300,
             what="a prediction for every target task")
    best_ious, labels_right, wrong_regions = [], [], []
    for name in targets:
        predictions = ls.predictions(tasks[name]["id"])
        assert len(predictions) == 1, predictions
        regions = [r for r in predictions[0]["result"] if r["type"] == "brushlabels"]
        predicted = [(region_label(r), region_mask(r, SCENE_SIZE)) for r in regions]
        truths = _truth(scenes[name])
        for label, truth in truths:
            same_label = [mask_iou(m, truth) for l, m in predicted if l == label]
            any_label = [mask_iou(m, truth) for _, m in predicted]
            best_ious.append(max(same_label, default=0.0))
            labels_right.append(max(same_label, default=0.0) >= max(any_label, default=0.0))
        # a wrong region: its IoU with every true instance of its label is below 0.5 (an annotator deletes it)
        wrong_regions.append(sum(all(mask_iou(m, t) < 0.5 for l, t in truths if l == label) for label, m in predicted))
    print(f"mean best IoU {np.mean(best_ious):.3f}, labels right {np.mean(labels_right):.2f}, "
          f"wrong regions per image {np.mean(wrong_regions):.2f}")
    # The precision issue's bar for the demo model at its calibrated default threshold (demo-17451e55 measured best
    # IoU 0.957, labels right 1.00, no wrong region; the first retrained demo 0.50 with 0.2 wrong regions per image).
    assert np.mean(best_ious) >= 0.6, f"mean best IoU {np.mean(best_ious):.3f}: {np.round(best_ious, 2)}"
    assert np.mean(labels_right) >= 0.8
    assert np.mean(wrong_regions) <= 1.0, f"wrong regions per image: {wrong_regions}"


def test_interactive_click_and_box_give_the_object(ls, scene_project):
    name = [n for n in scene_project["scenes"] if n not in scene_project["annotated"]][0]
    scene, task_id, ml_id = scene_project["scenes"][name], scene_project["tasks"][name]["id"], scene_project["ml"]["id"]
    ious = []
    for (label, truth), box in zip(_truth(scene), scene.boxes):
        ys, xs = np.nonzero(truth)
        inside = np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2)  # the object pixel nearest its centroid
        for prompt in (keypoint_region(xs[inside] + 0.5, ys[inside] + 0.5, SCENE_SIZE, label),
                       rectangle_region(tuple(box), SCENE_SIZE, label)):
            answer = ls.interactive(ml_id, task_id, {"result": [prompt]})
            assert "errors" not in answer, answer
            regions = answer["data"]["result"]
            assert len(regions) == 1 and region_label(regions[0]) == label, regions
            ious.append(mask_iou(region_mask(regions[0], SCENE_SIZE), truth))
    print(f"interactive mean IoU {np.mean(ious):.3f}")
    # measured 0.75 with the demo model and the stay-on-the-object rule (0.6 was the floor before both)
    assert np.mean(ious) >= 0.7, f"mean IoU {np.mean(ious):.3f}: {np.round(ious, 2)}"


def test_opening_a_task_encodes_the_next_ones_ahead(ls, scene_project, backend):
    # Label Studio asks /predict for one task when an annotator opens it; the project's sampling is Label
    # Studio's default, Sequential, so the backend reads the next unlabeled tasks from the data manager and
    # prepares ENCODE_AHEAD_TASKS (2) of them, after the request is answered.
    pid, tasks = scene_project["id"], scene_project["tasks"]
    assert ls.call("GET", f"/api/projects/{pid}")["sampling"] == "Sequential sampling"
    targets = sorted(tasks[name]["id"] for name in scene_project["scenes"] if name not in scene_project["annotated"])
    for prediction in ls.predictions(targets[0]):  # Label Studio skips a task predicted by this model version
        ls.call("DELETE", f"/api/predictions/{prediction['id']}/", expect=204)
    ls.retrieve_predictions(pid, [targets[0]])
    opened = f"project {pid}: after task {targets[0]} opened, 2 next tasks in "
    line = wait_for(lambda: next((x for x in backend.log_tail(400).splitlines() if opened in x), None), timeout=120,
                    what="the encode-ahead of the next two tasks")
    # both prepared: predicted (references embedded) or at least encoded; nothing failed
    assert "'kept': 2" in line or ("'encoded'" in line and "failed" not in line), line
