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
from .labelstudio import region_label, region_mask, wait_for
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
        page.goto(f"{label_studio_url}/user/login/")
        page.fill("input[name=email]", USERNAME)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
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
