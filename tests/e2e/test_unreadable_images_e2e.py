"""A task whose image cannot be read is not stored as "nothing found" (issue 20, item 8), through a real Label
Studio 1.23.2's "Retrieve predictions".

Label Studio stores every dict entry of /predict's "results" and skips, the next time, every task that has a
prediction of the current model version; an entry that is an empty list it stores nothing for. So a task whose
image was missing must be answered `[]`: nothing stored, and once the image exists the next "Retrieve
predictions" asks for it again and stores its prediction.
"""

from __future__ import annotations

import os

import pytest
import requests

from .labelstudio import brush_region, wait_for
from .test_labelstudio_e2e import _require_demo_model, config, square_image

pytestmark = pytest.mark.e2e


def upload_file(label_studio_server, task: dict):
    """The file on Label Studio's disk behind a task's /data/upload/<project>/<name> URL."""
    relative = task["data"]["image"].split("/data/upload/", 1)[1]
    found = [p for p in label_studio_server.cwd.rglob(os.path.basename(relative)) if p.as_posix().endswith(relative)]
    assert len(found) == 1, found
    return found[0]


def test_a_missing_image_is_stored_as_nothing_then_predicted_once_it_exists(ls, backend, label_studio_server):
    _require_demo_model()
    pid = ls.create_project(config(["Square"]))["id"]
    tasks = ls.upload_images(pid, {"ref.png": square_image(0)[0], "later.png": square_image(20)[0]})
    ls.connect_ml_backend(pid, backend.url)
    ls.create_annotation(tasks["ref.png"]["id"], [brush_region(square_image(0)[1], "Square")])
    wait_for(lambda: requests.get(f"{backend.url}/references", params={"project": pid}, timeout=30)
             .json()["examples_per_label"].get("Square"), timeout=120, what="the example in the backend's store")

    target = tasks["later.png"]["id"]
    image = upload_file(label_studio_server, tasks["later.png"])
    hidden = image.with_name(image.name + ".hidden")
    image.rename(hidden)  # the image is missing: Label Studio answers 404 for it
    try:
        answer = ls.retrieve_predictions(pid, [target])
        assert answer.get("processed_items", 1) >= 0
        assert ls.predictions(target) == []  # nothing stored for a task that could not be predicted
    finally:
        hidden.rename(image)

    ls.retrieve_predictions(pid, [target])  # asked again, now that the image exists
    predictions = wait_for(lambda: ls.predictions(target), timeout=120, what="the task's prediction")
    assert len(predictions) == 1
    assert predictions[0]["model_version"].startswith("base-dinov-")  # the base model served it
    log = backend.log_path.read_text(errors="replace")
    assert f"task {target}: no prediction" in log  # the reason is in the backend's log
