"""The interactive flow in Label Studio's own web UI, driven in a real browser (Debian's chromium).

An annotator opens a task, turns on Auto-Annotation, picks the Auto-Detect tool's smart keypoint, chooses a
label and clicks an object; the backend's mask shows as a suggestion, the annotator accepts it and submits.
The submitted annotation must hold one brush region of that label covering the clicked object and not its
neighbour of the same colour (the spill annotators saw before).

Needs Playwright for Python (requirements-test.txt) and /usr/bin/chromium (scripts/test.sh installs Debian's
package when it is missing); no browser is downloaded. The UI facts used here (selectors, what the smart tools
send) were observed on Label Studio 1.23.2.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from dinov.data.scenes import COLOURS, shape_mask
from dinov.metrics import iou as mask_iou

from .conftest import PASSWORD, USERNAME
from .labelstudio import brush_region, region_label, region_mask, wait_for
from .test_labelstudio_e2e import config

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
# Headless, offline: without the background-networking flags chromium keeps calling home, which this
# machine's closed network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

IMAGE_SIZE = (256, 320)  # (H, W), the size of the captured UI payloads in the precision issue
# name: (kind, centre (x, y) in pixels, extent in pixels, colour). The red circle sits at the captured click
# (84.888 %, 77.978 %), a red square of the same colour 20 px to its left.
OBJECTS = {
    "red circle": ("circle", (271.6, 199.6), 64, "red"),
    "red square": ("square", (190.0, 205.0), 56, "red"),
    "blue square": ("square", (175.0, 96.0), 80, "blue"),
    "blue circle": ("circle", (60.0, 90.0), 64, "blue"),
}


def log_in(page, label_studio_url: str) -> None:
    """Sign in as the test user through Label Studio's login form."""
    page.goto(f"{label_studio_url}/user/login/")
    page.fill("input[name=email]", USERNAME)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")


def ui_scene() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A grey 320x256 image with the four objects; returns (RGB uint8 [H, W, 3], {name: bool mask [H, W]})."""
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(128, 8, (*IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
    masks = {}
    for name, (kind, centre, extent, colour) in OBJECTS.items():
        masks[name] = shape_mask(kind, centre, extent, 0.0, IMAGE_SIZE)
        image[masks[name]] = COLOURS[colour]
    return image, masks


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/test.sh does it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-test.txt)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def test_smart_keypoint_click_in_the_web_ui_gives_the_clicked_object(ls, backend, label_studio_url, browser):
    labels = list(OBJECTS)
    project = ls.create_project(config(labels))  # brush, smart keypoint "kp", smart rectangle "box"
    image, masks = ui_scene()
    task = ls.upload_images(project["id"], {"ui.png": image})["ui.png"]
    ls.connect_ml_backend(project["id"], backend.url, is_interactive=True)

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    asked: list[dict] = []  # what the UI sent to the backend (through Label Studio)
    page.on("request", lambda r: asked.append(r.post_data_json) if r.url.endswith("/interactive-annotating") else None)
    try:
        log_in(page, label_studio_url)
        page.goto(f"{label_studio_url}/projects/{project['id']}/data?task={task['id']}")
        picture = page.locator("img[alt=image]")
        picture.wait_for(timeout=60_000)

        page.locator("[data-testid=bottombar-auto-annotation-toggle]").check(force=True)
        auto_accept = page.locator("[data-testid=bottombar-auto-accept-toggle]")
        auto_accept.wait_for(state="attached", timeout=10_000)
        assert not auto_accept.is_checked(), "Auto-Accept must be off so that the answer shows as a suggestion"

        # The Auto-Detect tool (M) is the last toolbar group's first tool; hovering shows its smart variants.
        page.locator(".lsf-toolbar__group").last.locator("button.lsf-tool").first.hover()
        page.locator(".lsf-toolbar__smart button[aria-label=key-point-tool]").click()
        # The label buttons come per control in config order: brush, then keypoint, then rectangle.
        label_buttons = page.locator(".lsf-label")
        label_buttons.nth(len(labels) + labels.index("red circle")).click()

        shown = picture.bounding_box()
        page.mouse.click(shown["x"] + shown["width"] * 0.84888, shown["y"] + shown["height"] * 0.77978)
        page.locator("[data-testid=bottombar-accept-suggestions-button]").click(timeout=120_000)
        page.get_by_role("button", name="Submit").click()
        annotations = wait_for(lambda: ls.call("GET", f"/api/tasks/{task['id']}/annotations/"), timeout=30,
                               what="the submitted annotation")
    finally:
        page.close()

    assert len(asked) == 1, asked
    click = asked[0]["context"]["result"][0]
    assert click["type"] == "keypointlabels" and click["is_positive"] and click["value"]["keypointlabels"] == ["red circle"]
    assert abs(click["value"]["x"] - 84.888) < 0.5 and abs(click["value"]["y"] - 77.978) < 0.5, click["value"]

    assert len(annotations) == 1
    regions = annotations[0]["result"]
    assert [(r["type"], region_label(r)) for r in regions] == [("brushlabels", "red circle")], regions
    mask = region_mask(regions[0], IMAGE_SIZE)
    assert mask_iou(mask, masks["red circle"]) >= 0.8, mask_iou(mask, masks["red circle"])
    spill = (mask & masks["red square"]).sum() / masks["red square"].sum()
    assert spill < 0.05, f"the click mask covers {spill:.0%} of the red square next to the red circle"


def shortened(version: str) -> str:
    """Label Studio 1.23.2's prediction tab label (web/dist/apps/labelstudio/358.js): a name longer than 15
    characters as its first 8, "..." and its last 6."""
    return version if len(version) <= 15 else f"{version[:8]}...{version[-6:]}"


def serve_a_project_model(backend, checkpoint: str, project_id: int, job_id: int) -> None:
    """Make the backend serve a project checkpoint as a finished, better job would: a delta of the demo model's own
    decoder weights (predictions as the base model's, a version of its own), recorded in its training store."""
    from dinov.build import load_model
    from dinov.checkpoint import file_digest
    from dinov.delta import save_delta, trainable_names
    from labelstudio_backend.store.training import ActiveModel, TrainingStore, training_db

    model, _, base_digest = load_model(checkpoint, cache_dir=backend.model_dir)
    names = [n for n in trainable_names(model) if ".decoder." in n or n.startswith("decoder")][:4] or \
        trainable_names(model)[:4]
    path = backend.model_dir / "project_models" / f"project{project_id}-job{job_id}.safetensors"
    save_delta(model, names, path, base_digest, metadata={"project": str(project_id), "job": str(job_id)})
    TrainingStore(training_db(backend.model_dir)).set_active(ActiveModel(
        project_id=project_id, path=str(path), checkpoint_id=f"{base_digest}+p{project_id}-{file_digest(path)[:8]}",
        base_digest=base_digest, score_threshold=float(model.default_score_threshold), job_id=job_id))


def test_start_training_from_the_model_card_and_two_versions_on_two_tabs(ls, backend, label_studio_url, browser):
    """The admin's path: Start Training from the model card's menu; with 5 annotated tasks the job is rejected
    with its reason and the connection stays Connected; once the project's model is served, a task's predictions
    of the base and the project model show as two tabs with different labels."""
    import requests

    from .conftest import E2E_CHECKPOINT

    labels = list(OBJECTS)
    project = ls.create_project(config(labels))
    image, masks = ui_scene()
    tasks = ls.upload_images(project["id"], {f"t{i}.png": image for i in range(6)})
    ml = ls.connect_ml_backend(project["id"], backend.url, is_interactive=True)
    for name in list(tasks)[:5]:
        ls.create_annotation(tasks[name]["id"], [brush_region(masks[label], label) for label in labels])
    target = tasks["t5.png"]["id"]

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        log_in(page, label_studio_url)
        page.goto(f"{label_studio_url}/projects/{project['id']}/settings/ml")
        page.get_by_text("Connected").first.wait_for(timeout=60_000)
        page.locator("[aria-label='Machine learning model options']").first.click()
        page.get_by_text("Start Training", exact=True).last.click()  # the menu item: opens the dialog
        page.get_by_role("button", name="Start Training").click()    # the dialog's button
        page.get_by_text("Request Sent!").wait_for(timeout=60_000)

        def ended():
            job = requests.get(f"{backend.url}/training", params={"project": project["id"]}, timeout=10).json()["job"]
            return job if job and job["state"] not in ("queued", "running") else None
        job = wait_for(ended, timeout=120, what="the training job to end")
        assert job["state"] == "rejected" and "has 5 annotated tasks" in job["message"], job
        page.goto(f"{label_studio_url}/projects/{project['id']}/settings/ml")
        page.get_by_text("Connected").first.wait_for(timeout=60_000)  # not Error, not Disconnected

        ls.retrieve_predictions(project["id"], [target])
        base = wait_for(lambda: [p["model_version"] for p in ls.predictions(target)], timeout=180,
                        what="the base model's prediction")[0]
        serve_a_project_model(backend, E2E_CHECKPOINT, project["id"], job["job_id"] + 1)
        tuned = ls.ml_backend(ml["id"])["model_version"]  # Label Studio's /setup: the served model's version
        assert tuned.startswith(f"p{project['id']}j{job['job_id'] + 1}-") and base.startswith("base-"), (base, tuned)
        listed = ls.call("GET", f"/api/ml/{ml['id']}/versions")  # Label Studio asks the backend's /versions
        assert tuned in listed["versions"] and base in listed["versions"], listed
        ls.retrieve_predictions(project["id"], [target])
        wait_for(lambda: {p["model_version"] for p in ls.predictions(target)} == {base, tuned}, timeout=180,
                 what="the project model's prediction")
        assert shortened(base) != shortened(tuned)
        page.goto(f"{label_studio_url}/projects/{project['id']}/data?task={target}")
        page.locator("img[alt=image]").wait_for(timeout=60_000)
        for version in (base, tuned):  # each prediction's tab shows its version, shortened
            page.get_by_text(shortened(version)).first.wait_for(timeout=30_000)
    finally:
        page.close()
