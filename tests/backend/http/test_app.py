"""The ML backend protocol through Flask's test client, with a test-double predictor and a temporary store.

The double segments by colour: a prompt's embedding is the mean colour under its mask, generic
segmentation returns the connected parts of the image close to a class's colour, and interactive
segmentation returns the same-coloured part under the click / box centre / stroke. Scenes are grey
images with red and blue squares, so every expected mask is known exactly. A box reference filled as
it is would average to a blue-grey that matches nothing: finding the blue squares shows that the box
was first turned into the object's mask.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import requests
import requests_mock
from PIL import Image

from labelstudio_backend.fetching.images import ImageLoader
from labelstudio_backend.http.app import create_app
from labelstudio_backend.labelstudio.regions import encode_rle, region_to_mask
from labelstudio_backend.settings import Settings
from labelstudio_backend.store import ReferenceStore
from tests.support.doubles import ColourPredictor

LS = "http://ls.test:8080"
SIZE = (64, 96)  # (height, width)
GREY, RED, BLUE = (128, 128, 128), (230, 20, 20), (20, 20, 230)
PROJECT = "7.1700000000"

CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Red"/><Label value="Blue"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Red"/><Label value="Blue"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="Red"/><Label value="Blue"/></RectangleLabels>
</View>"""

POLYGON_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="Red"/><Label value="Blue"/></PolygonLabels>
</View>"""

# (row0, row1, col0, col1) of each square, end exclusive
SCENES = {
    "a": {"red": [(10, 26, 10, 31)], "blue": [(35, 56, 50, 76)]},
    "b": {"red": [(5, 21, 60, 81), (40, 59, 5, 26)], "blue": [(28, 50, 35, 56)]},
    "c": {"red": [(30, 50, 30, 50)], "blue": [(5, 20, 70, 90)]},
}


def scene_image(name: str) -> np.ndarray:
    image = np.zeros((*SIZE, 3), np.uint8)
    image[:] = GREY
    for color, key in ((RED, "red"), (BLUE, "blue")):
        for r0, r1, c0, c1 in SCENES[name][key]:
            image[r0:r1, c0:c1] = color
    return image


def square_mask(box) -> np.ndarray:
    r0, r1, c0, c1 = box
    mask = np.zeros(SIZE, bool)
    mask[r0:r1, c0:c1] = True
    return mask


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


# --- fixtures ---------------------------------------------------------------------------------------------

def task(task_id: int, scene: str) -> dict:
    return {"id": task_id, "project": 7, "data": {"image": f"/data/upload/7/{scene}.png"}}


class Backend:
    """An app over a temporary MODEL_DIR with the images served by a mocked Label Studio."""

    def __init__(self, model_dir, predictor=None, **overrides):
        values = dict(label_studio_url=LS, label_studio_api_key="token-1", model_dir=model_dir)
        values.update(overrides)
        self.settings = Settings(**values)
        session = requests.Session()
        self.http = requests_mock.Adapter()
        session.mount("http://", self.http)
        for name in SCENES:
            self.http.register_uri("GET", f"{LS}/data/upload/7/{name}.png", content=png(scene_image(name)))
        self.http.register_uri("GET", f"{LS}/data/upload/7/missing.png", status_code=404)
        self.predictor = predictor or ColourPredictor()
        self.store = ReferenceStore(model_dir / "references.sqlite3")
        self.app = create_app(lambda settings: self.predictor, self.settings, store=self.store,
                              images=ImageLoader(self.settings, session=session))
        self.runtime = self.app.extensions["dinov"]
        self.client = self.app.test_client()

    def drain(self):
        """Wait for the background work queued so far (webhook events applied, references embedded)."""
        assert self.runtime.queues.wait_idle(timeout=30)

    def post(self, path, payload, **kwargs):
        return self.client.post(path, json=payload, **kwargs)

    def setup(self, config=CONFIG, extra_params=None):
        response = self.post("/setup", {"project": PROJECT, "schema": config, "hostname": LS,
                                        "access_token": "x", "extra_params": extra_params})
        assert response.status_code == 200, response.json
        return response.json["model_version"]

    def annotate(self, annotation_id, task_obj, result, action="ANNOTATION_CREATED", updated="2024-05-01T10:00:00Z"):
        annotation = {"id": annotation_id, "task": task_obj["id"], "project": 7, "result": result,
                      "was_cancelled": False, "ground_truth": False, "completed_by": 1,
                      "created_at": updated, "updated_at": updated}
        started = time.perf_counter()
        response = self.post("/webhook", {"action": action, "annotation": annotation, "task": task_obj,
                                          "project": {"id": 7, "label_config": CONFIG}})
        assert response.status_code == 200, response.json
        return time.perf_counter() - started

    def predict(self, tasks, context=None, config=CONFIG):
        return self.post("/predict", {"tasks": tasks, "project": PROJECT, "label_config": config,
                                      "params": {"login": None, "password": None, "context": context}})


def pct(x, y):
    return 100.0 * x / SIZE[1], 100.0 * y / SIZE[0]


def brush(mask, label, rid="b1"):
    return {"id": rid, "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": SIZE[1],
            "original_height": SIZE[0], "value": {"format": "rle", "rle": encode_rle(mask), "brushlabels": [label]}}


def rectangle(r0, r1, c0, c1, label, rid="r1"):
    x, y = pct(c0, r0)
    w, h = pct(c1 - c0, r1 - r0)
    return {"id": rid, "type": "rectanglelabels", "from_name": "rect", "to_name": "image", "original_width": SIZE[1],
            "original_height": SIZE[0], "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                                                   "rectanglelabels": [label]}}


def keypoint(col, row, label, positive=True, rid="k1"):
    x, y = pct(col + 0.5, row + 0.5)
    return {"id": rid, "type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": positive,
            "original_width": SIZE[1], "original_height": SIZE[0],
            "value": {"x": x, "y": y, "width": 1, "keypointlabels": [label]}}


def scribble_and_box_on_a(backend):
    """Task 1 (scene a): a scribble inside the red square, a loose box around the blue one."""
    scribble = np.zeros(SIZE, bool)
    scribble[15:18, 14:26] = True
    return backend.annotate(101, task(1, "a"), [brush(scribble, "Red"), rectangle(32, 60, 46, 80, "Blue")])


def regions_by_label(prediction):
    found = {}
    for region in prediction["result"]:
        found.setdefault(region["value"][region["type"]][0], []).append(region_to_mask(region, SIZE))
    return found


def same_masks(found, expected_boxes):
    expected = sorted((square_mask(b) for b in expected_boxes), key=lambda m: np.argwhere(m)[0].tolist())
    found = sorted(found, key=lambda m: np.argwhere(m)[0].tolist())
    return len(found) == len(expected) and all(np.array_equal(f, e) for f, e in zip(found, expected))


@pytest.fixture
def backend(tmp_path):
    b = Backend(tmp_path)
    yield b
    b.runtime.shutdown()


# --- protocol ---------------------------------------------------------------------------------------------

def test_health(backend):
    backend.runtime.load_model()
    response = backend.client.get("/health")
    assert response.status_code == 200
    assert response.json["status"] == "UP" and response.json["model_class"] == "DINOvBackend"
    assert response.json["webhooks"] == {"pending": 0} and set(response.json["queues"]) == {
        "model", "webhooks", "sync", "embeddings", "estimates", "deferred", "training", "ahead"}
    assert backend.client.get("/").status_code == 200


def test_setup_returns_model_version_and_refuses_bad_input(backend):
    started = time.perf_counter()
    version = backend.setup()
    assert time.perf_counter() - started < 3.0
    assert version.startswith("base-dinov-fake-ckpt-")  # the served model first; no reference revision
    tuned = backend.setup(extra_params={"score_threshold": 0.5})
    assert tuned != version  # per-project settings are part of the version
    bad = backend.post("/setup", {"project": PROJECT, "schema": "<View><Text name='t' value='$t'/></View>"})
    assert bad.status_code == 422 and "no <Image> tag" in bad.json["error"]
    bad = backend.post("/setup", {"project": PROJECT, "schema": CONFIG, "extra_params": {"allowed_hosts": "*"}})
    assert bad.status_code == 400 and "not a per-project setting" in bad.json["error"]
    bad = backend.post("/setup", {"project": PROJECT, "schema": CONFIG, "extra_params": "{broken"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json["error"]


def test_preannotation_from_a_scribble_and_a_box(backend):
    backend.setup()
    scribble_and_box_on_a(backend)
    backend.drain()
    assert backend.store.stats(7)["examples_per_label"] == {"Blue": 1, "Red": 1}

    response = backend.predict([task(2, "b"), task(1, "a"), task(3, "missing"), task(4, "c")])
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == 4
    version = results[0]["model_version"]
    assert version == backend.setup()  # the references (one annotation now) do not change it

    b = regions_by_label(results[0])
    assert same_masks(b["Red"], SCENES["b"]["red"]) and same_masks(b["Blue"], SCENES["b"]["blue"])
    for region in results[0]["result"]:
        assert region["from_name"] == "tag" and region["to_name"] == "image" and region["type"] == "brushlabels"
        assert 0.0 < region["score"] <= 1.0
    assert 0.0 < results[0]["score"] <= 1.0
    assert results[1]["result"] == []   # its own annotation is never an example
    assert results[2] == []   # the image failed: nothing for Label Studio to store, the others still return
    c = regions_by_label(results[3])
    assert same_masks(c["Red"], SCENES["c"]["red"]) and same_masks(c["Blue"], SCENES["c"]["blue"])
    metrics = backend.client.get("/metrics").get_data(as_text=True)
    assert 'dinov_task_failures_total{reason="ImageError"} 1.0' in metrics


def test_polygon_output(backend):
    backend.setup(POLYGON_CONFIG)
    scribble_and_box_on_a(backend)
    backend.drain()
    result = backend.predict([task(2, "b")], config=POLYGON_CONFIG).json["results"][0]
    assert {r["type"] for r in result["result"]} == {"polygonlabels"}
    found = regions_by_label(result)
    assert same_masks(found["Red"], SCENES["b"]["red"]) and same_masks(found["Blue"], SCENES["b"]["blue"])


def test_unset_score_threshold_applies_the_checkpoints_default(backend):
    """SCORE_THRESHOLD unset: the predictor's own (calibrated) default decides; a per-project value overrides it."""
    scribble_and_box_on_a(backend)
    backend.drain()
    backend.runtime.load_model().default_score_threshold = 0.95  # above every score the double gives
    assert backend.predict([task(2, "b")]).json["results"][0]["result"] == []
    backend.setup(extra_params={"score_threshold": 0.5})
    assert set(regions_by_label(backend.predict([task(2, "b")]).json["results"][0])) == {"Red", "Blue"}


def test_a_label_without_examples_gives_nothing(backend):
    backend.setup()
    mask = square_mask(SCENES["a"]["red"][0])
    backend.annotate(101, task(1, "a"), [brush(mask, "Red")])
    backend.drain()
    found = regions_by_label(backend.predict([task(2, "b")]).json["results"][0])
    assert set(found) == {"Red"}


def test_embeddings_are_cached_in_the_store(tmp_path, backend):
    backend.setup()
    scribble_and_box_on_a(backend)
    backend.drain()
    backend.predict([task(2, "b")])
    assert backend.predictor.encoded_prompts == 2
    backend.predict([task(4, "c")])
    assert backend.predictor.encoded_prompts == 2  # no reference encoded twice
    # a new process over the same MODEL_DIR reads them from SQLite, without encoding the reference image
    fresh = Backend(tmp_path)
    result = fresh.predict([task(2, "b")]).json["results"][0]
    assert same_masks(regions_by_label(result)["Red"], SCENES["b"]["red"])
    assert fresh.predictor.encoded_prompts == 0 and fresh.predictor.encoded_images == 1
    fresh.runtime.shutdown()


def test_updates_and_deletes_change_the_references(backend):
    backend.setup()
    scribble_and_box_on_a(backend)
    backend.drain()
    first = backend.predict([task(2, "b")]).json["results"][0]
    # the annotator relabels the scribble as Blue: red squares are now predicted as Blue
    scribble = np.zeros(SIZE, bool)
    scribble[15:18, 14:26] = True
    backend.annotate(101, task(1, "a"), [brush(scribble, "Blue")], action="ANNOTATION_UPDATED",
                     updated="2024-05-02T10:00:00Z")
    backend.drain()
    second = backend.predict([task(2, "b")]).json["results"][0]
    assert second["model_version"] == first["model_version"]  # new references, same model and settings
    assert same_masks(regions_by_label(second)["Blue"], SCENES["b"]["red"])
    response = backend.post("/webhook", {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 101}],
                                         "project": {"id": 7}})
    assert response.status_code == 200
    backend.drain()
    third = backend.predict([task(2, "b")]).json["results"][0]
    assert third["result"] == [] and third["model_version"] == second["model_version"]


def test_webhook_answers_within_a_second_while_work_is_slow(tmp_path):
    backend = Backend(tmp_path, predictor=ColourPredictor(encode_delay=1.5))
    backend.setup()
    elapsed = scribble_and_box_on_a(backend)
    assert elapsed < 1.0
    for event in ("TASKS_CREATED", "PROJECT_UPDATED", "START_TRAINING", "SOMETHING_NEW"):
        started = time.perf_counter()
        response = backend.post("/webhook", {"action": event, "project": {"id": 7, "label_config": CONFIG}})
        assert response.status_code == 200 and time.perf_counter() - started < 1.0
    backend.drain()
    assert backend.store.stats(7)["examples"] == 2
    backend.runtime.shutdown()


def test_time_budget_defers_the_rest(tmp_path):
    backend = Backend(tmp_path, predictor=ColourPredictor(encode_delay=0.3), predict_time_budget=1.0)
    backend.setup()
    mask = square_mask(SCENES["a"]["red"][0])
    backend.annotate(101, task(1, "a"), [brush(mask, "Red")])
    backend.drain()
    tasks = [task(10 + i, "bc"[i % 2]) for i in range(8)]
    for t in tasks:  # distinct URLs, so the feature cache does not hide the cost
        backend.http.register_uri("GET", f"{LS}/data/upload/7/{t['id']}.png", content=png(scene_image("b")))
        t["data"]["image"] = f"/data/upload/7/{t['id']}.png"
    results = backend.predict(tasks).json["results"]
    assert len(results) == len(tasks)
    done = [r for r in results if isinstance(r, dict)]
    assert 1 <= len(done) < len(tasks)
    assert all(r == [] for r in results[len(done):])  # no prediction: Label Studio asks again later
    backend.runtime.shutdown()


def test_the_budget_covers_the_embedding_of_new_references(tmp_path):
    """Three references arrived just before a "Retrieve predictions"; embedding them takes longer than the budget.
    They are embedded ahead (the embeddings queue), and the call answers within its budget instead of embedding
    them inside its first task."""
    backend = Backend(tmp_path, predictor=ColourPredictor(encode_delay=0.5), predict_time_budget=1.0)
    backend.setup()
    backend.runtime.load_model()
    for annotation_id, (task_id, name) in enumerate([(1, "a"), (2, "b"), (3, "c")], start=101):
        backend.annotate(annotation_id, task(task_id, name), [brush(square_mask(SCENES[name]["red"][0]), "Red")])
    assert backend.runtime.queues["webhooks"].wait_idle(10)  # applied; their embedding (1.5 s) is under way
    started = time.perf_counter()
    results = backend.predict([task(10, "a"), task(11, "b")]).json["results"]
    assert time.perf_counter() - started < 1.4
    assert results == [[], []]  # deferred: Label Studio stores nothing, the background predicts them
    assert backend.store.claimed_task_ids(7, backend.setup()) == {10, 11}
    backend.drain()
    answered = backend.predict([task(4, "c")]).json["results"][0]  # the references are ready now
    assert same_masks(regions_by_label(answered)["Red"], SCENES["c"]["red"])
    backend.runtime.shutdown()


def test_webhook_events_are_kept_before_the_answer(backend):
    backend.setup()
    release = threading.Event()
    backend.runtime.queues["webhooks"].submit("busy", release.wait, 10)  # the queue is busy with something else
    scribble_and_box_on_a(backend)
    assert backend.store.pending_event_count() == 1 and backend.store.stats(7)["examples"] == 0
    bad = backend.post("/webhook", {"action": "ANNOTATION_CREATED", "annotation": {"id": 5}, "task": None,
                                    "project": {"id": 7}})
    assert bad.status_code == 400 and "no task" in bad.json["error"]  # refused, not kept
    assert backend.store.pending_event_count() == 1
    release.set()
    backend.drain()
    assert backend.store.pending_event_count() == 0 and backend.store.stats(7)["examples"] == 2


def test_a_full_queue_answers_503_with_retry_after(tmp_path):
    release = threading.Event()
    synced: list[int] = []

    def slow_sync(project_id: int, full: bool | None = None) -> None:
        release.wait(10)
        synced.append(project_id)

    settings = Settings(model_dir=tmp_path, work_queue_size=1)
    app = create_app(lambda s: ColourPredictor(), settings, store=ReferenceStore(tmp_path / "r.sqlite3"),
                     syncer=slow_sync)
    client = app.test_client()
    queue = app.extensions["dinov"].queues["sync"]
    assert client.post("/references?project=1&action=sync").status_code == 202
    deadline = time.monotonic() + 10
    while queue.stats()["running"] == 0 and time.monotonic() < deadline:  # running, no longer waiting
        time.sleep(0.01)
    assert client.post("/references?project=2&action=sync").status_code == 202  # waiting
    assert client.post("/references?project=2&action=sync").status_code == 202  # the same: waits once
    full = client.post("/references?project=3&action=sync")
    assert full.status_code == 503 and "sync queue is full" in full.json["error"]
    assert 1 <= int(full.headers["Retry-After"]) <= 300
    assert queue.stats()["rejected"] == 1
    release.set()
    assert app.extensions["dinov"].queues.wait_idle(10)
    assert synced == [1, 2]
    assert client.post("/references?project=3&action=sync").status_code == 202
    app.extensions["dinov"].shutdown()


def test_an_unexpected_failure_on_one_task_spares_the_others(tmp_path):
    class OutOfMemoryOnWideImages(ColourPredictor):
        def encode_image(self, image):
            if np.asarray(image).shape[1] > SIZE[1]:
                raise RuntimeError("CUDA out of memory")
            return super().encode_image(image)

    backend = Backend(tmp_path, predictor=OutOfMemoryOnWideImages())
    backend.http.register_uri("GET", f"{LS}/data/upload/7/wide.png", content=png(np.zeros((64, 200, 3), np.uint8)))
    backend.setup()
    scribble_and_box_on_a(backend)
    backend.drain()
    wide = {"id": 9, "data": {"image": "/data/upload/7/wide.png"}}
    response = backend.predict([wide, task(2, "b")])
    assert response.status_code == 200
    first, second = response.json["results"]
    assert first == [] and len(second["result"]) == 3  # not predicted: nothing for Label Studio to store
    backend.runtime.shutdown()


def test_bulk_imported_annotations(backend):
    backend.setup()
    red_a, red_c = square_mask(SCENES["a"]["red"][0]), square_mask(SCENES["c"]["red"][0])
    annotations = [{"id": 201, "task": 1, "result": [brush(red_a, "Red")], "updated_at": "2024-05-01T10:00:00Z"},
                   {"id": 202, "task": 4, "result": [brush(red_c, "Red")], "updated_at": "2024-05-01T11:00:00Z"}]
    response = backend.post("/webhook", {"action": "ANNOTATIONS_CREATED", "annotation": annotations,
                                         "task": [task(1, "a"), task(4, "c")],
                                         "project": {"id": 7, "label_config": CONFIG}})
    assert response.status_code == 200 and response.json["annotations"] == 2
    backend.drain()
    assert backend.store.stats(7)["examples_per_label"] == {"Red": 2}


# --- interactive ------------------------------------------------------------------------------------------

def test_click_gives_the_object_with_the_drawn_label(backend):
    backend.setup()
    r0, r1, c0, c1 = SCENES["b"]["blue"][0]
    response = backend.predict([task(2, "b")], context={"result": [keypoint(c0 + 5, r0 + 5, "Blue")]})
    assert response.status_code == 200
    (prediction,) = response.json["results"]
    (region,) = prediction["result"]
    assert region["from_name"] == "tag" and region["value"]["brushlabels"] == ["Blue"]
    assert np.array_equal(region_to_mask(region, SIZE), square_mask(SCENES["b"]["blue"][0]))
    assert prediction["score"] == pytest.approx(0.93)


def test_box_and_negative_click(backend):
    backend.setup()
    red = SCENES["b"]["red"][1]
    box = rectangle(red[0] - 2, red[1] + 2, red[2] - 2, red[3] + 2, "Red")
    (prediction,) = backend.predict([task(2, "b")], context={"result": [box]}).json["results"]
    assert np.array_equal(region_to_mask(prediction["result"][0], SIZE), square_mask(red))
    negative = keypoint(red[2] + 3, red[0] + 3, "Red", positive=False, rid="k2")
    (prediction,) = backend.predict([task(2, "b")], context={"result": [box, negative]}).json["results"]
    assert prediction["result"] == []


def test_all_similar_mode(backend):
    backend.setup(extra_params={"interactive_mode": "similar"})
    r0, _, c0, _ = SCENES["b"]["red"][0]
    (prediction,) = backend.predict([task(2, "b")], context={"result": [keypoint(c0 + 3, r0 + 3, "Red")]}).json[
        "results"]
    found = regions_by_label(prediction)
    assert set(found) == {"Red"} and same_masks(found["Red"], SCENES["b"]["red"])


def test_the_next_click_on_the_same_image_reuses_its_features(backend):
    backend.setup()
    for col in (62, 64, 70):
        backend.predict([task(2, "b")], context={"result": [keypoint(col, 10, "Red")]})
    assert backend.predictor.encoded_images == 1


def test_concurrent_clicks_on_different_images_do_not_mix(backend):
    backend.setup()
    answers = {}

    def click(scene, task_id, box):
        client = backend.app.test_client()
        r0, r1, c0, c1 = box
        for _ in range(3):
            response = client.post("/predict", json={
                "tasks": [task(task_id, scene)], "project": PROJECT, "label_config": CONFIG,
                "params": {"context": {"result": [keypoint((c0 + c1) // 2, (r0 + r1) // 2, "Red")]}}})
            answers.setdefault(scene, []).append(region_to_mask(response.json["results"][0]["result"][0], SIZE))

    threads = [threading.Thread(target=click, args=("b", 2, SCENES["b"]["red"][1])),
               threading.Thread(target=click, args=("c", 4, SCENES["c"]["red"][0]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(m, square_mask(SCENES["b"]["red"][1])) for m in answers["b"])
    assert all(np.array_equal(m, square_mask(SCENES["c"]["red"][0])) for m in answers["c"])


# --- bad input --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload, status, message", [
    (None, 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({"project": PROJECT, "label_config": CONFIG}, 400, "'tasks'"),
    ({"tasks": [task(2, "b")], "project": PROJECT}, 422, "labeling config"),
    ({"tasks": [task(2, "b")], "project": "abc", "label_config": CONFIG}, 400, "not a Label Studio project id"),
    ({"tasks": [task(2, "b"), task(4, "c")], "project": PROJECT, "label_config": CONFIG,
      "params": {"context": {"result": [keypoint(3, 3, "Red")]}}}, 400, "exactly one task"),
    ({"tasks": [task(2, "b")], "project": PROJECT, "label_config": CONFIG,
      "params": {"context": {"result": [keypoint(3, 3, "Green")]}}}, 422, "'Green' is not in any"),
    ({"tasks": [task(2, "b")], "project": PROJECT, "label_config": CONFIG,
      "params": {"context": {"result": [dict(brush(np.ones(SIZE, bool), "Red"), original_width=10)]}}}, 422, "RLE"),
    ({"tasks": [task(2, "b")], "project": PROJECT, "label_config": CONFIG,
      "params": {"context": {"result": [keypoint(3, 3, "Red", positive=False)]}}}, 400, "only negative clicks"),
    ({"tasks": [task(3, "missing")], "project": PROJECT, "label_config": CONFIG,
      "params": {"context": {"result": [keypoint(3, 3, "Red")]}}}, 422, "not found"),
])
def test_bad_predict_requests_get_a_clear_4xx(backend, payload, status, message):
    if payload is None:
        response = backend.client.post("/predict", data=b"{not json", content_type="application/json")
    else:
        response = backend.post("/predict", payload)
    assert response.status_code == status, response.json
    assert message in response.json["error"]
    assert "Traceback" not in response.get_data(as_text=True)


def test_model_that_cannot_load_answers_503(tmp_path):
    def broken(settings):
        raise FileNotFoundError("no such checkpoint: /nowhere.pth")

    app = create_app(broken, Settings(model_dir=tmp_path, checkpoint="/nowhere.pth"),
                     store=ReferenceStore(tmp_path / "r.sqlite3"))
    client = app.test_client()
    response = client.post("/predict", json={"tasks": [task(2, "b")], "project": PROJECT, "label_config": CONFIG,
                                             "params": {"context": {"result": [keypoint(3, 3, "Red")]}}})
    assert response.status_code == 503 and "DINOV_CHECKPOINT=/nowhere.pth" in response.json["error"]
    health = client.get("/health")
    assert health.status_code == 503 and health.json["status"] == "UNAVAILABLE"
    assert "no such checkpoint" in health.json["reason"] and "next attempt in" in health.json["reason"]
    app.extensions["dinov"].shutdown()


def test_a_failed_model_load_is_retried_and_health_recovers(tmp_path):
    attempts = []

    def flaky(settings):
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise OSError("the checkpoint volume is not mounted yet")
        return ColourPredictor()

    app = create_app(flaky, Settings(model_dir=tmp_path, model_load_retry_s=0.05),
                     store=ReferenceStore(tmp_path / "r.sqlite3"))
    client = app.test_client()
    deadline = time.monotonic() + 10
    while client.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    health = client.get("/health").json
    assert health["status"] == "UP" and health["model"]["loaded"] and health["model"]["attempts"] == 3
    assert attempts[2] - attempts[1] >= 2 * (attempts[1] - attempts[0]) * 0.8  # the pause doubles
    app.extensions["dinov"].shutdown()


def test_basic_auth_on_every_endpoint_but_health(tmp_path):
    backend = Backend(tmp_path, basic_auth_user="ls", basic_auth_pass="s3cret")
    backend.runtime.load_model()
    assert backend.client.get("/health").status_code == 200  # Label Studio's and Docker's health checks
    wrong = "Basic " + base64.b64encode(b"ls:nope").decode()
    for method, path in [("GET", "/"), ("POST", "/setup"), ("POST", "/predict"), ("POST", "/webhook"),
                         ("POST", "/train"), ("GET", "/metrics"), ("GET", "/references?project=7")]:
        for headers in ({}, {"Authorization": wrong}, {"Authorization": "Basic \u00e4\u00e4"},
                        {"Authorization": "Basic " + base64.b64encode("l\u00e4:p\u00e4".encode()).decode()},
                        {"Authorization": "Token abc"}):
            response = backend.client.open(path, method=method, json={}, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.json)
            assert response.json["status"] == 401 and response.json["error"]
            assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert "BASIC_AUTH_USER" in backend.client.get("/metrics").json["error"]
    assert backend.client.get("/metrics", auth=("ls", "s3cret")).status_code == 200
    backend.runtime.shutdown()


def test_setup_gives_the_backends_own_webhook_its_credentials(tmp_path):
    backend = Backend(tmp_path, basic_auth_user="ls", basic_auth_pass="s3cret")
    hooks = [{"id": 1, "project": 7, "url": "http://localhost/webhook", "headers": {}, "actions": []},
             {"id": 2, "project": 7, "url": "http://elsewhere:9090/webhook", "headers": {}, "actions": []}]
    backend.http.register_uri("GET", f"{LS}/api/webhooks/?project=7", json=hooks)
    patch = backend.http.register_uri("PATCH", f"{LS}/api/webhooks/1/", json={})
    other = backend.http.register_uri("PATCH", f"{LS}/api/webhooks/2/", json={})
    response = backend.post("/setup", {"project": PROJECT, "schema": CONFIG}, auth=("ls", "s3cret"))
    assert response.status_code == 200, response.json
    assert patch.call_count == 1 and other.call_count == 0  # the test client's Host is "localhost"
    assert patch.last_request.json() == {"headers": {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()},
                                         "actions": []}
    assert patch.last_request.headers["Authorization"] == "Token token-1"
    backend.runtime.shutdown()


def test_a_body_over_the_limit_is_a_413(tmp_path):
    backend = Backend(tmp_path, max_request_bytes=1000)
    response = backend.client.post("/predict", data=b"x" * 2000, content_type="application/json")
    assert response.status_code == 413
    assert "MAX_REQUEST_BYTES=1000" in response.json["error"]
    backend.runtime.shutdown()


# --- operations -------------------------------------------------------------------------------------------

def test_metrics_and_references(backend):
    backend.setup()
    scribble_and_box_on_a(backend)
    backend.drain()
    backend.predict([task(2, "b")])
    references = backend.client.get("/references?project=7").json
    assert references["examples_per_label"] == {"Blue": 1, "Red": 1} and references["revision"] == 1
    metrics = backend.client.get("/metrics")
    assert metrics.status_code == 200 and metrics.content_type.startswith("text/plain")
    text = metrics.get_data(as_text=True)
    assert 'dinov_references{label="Red",project="7"} 1.0' in text
    assert 'dinov_requests_total{endpoint="/predict",method="POST",status="200"} 1.0' in text
    assert 'dinov_predicted_tasks_total{mode="batch"} 1.0' in text
    assert "dinov_request_seconds_bucket" in text and "dinov_model_loaded 1.0" in text
    bad = backend.client.get("/references?project=x")
    assert bad.status_code == 400


def test_leave_one_out_estimate(backend):
    backend.setup()
    # two tasks annotated with full masks: each is predicted exactly from the other
    for annotation_id, task_id, scene in ((101, 1, "a"), (102, 2, "b")):
        result = [brush(square_mask(box), "Red", rid=f"red{i}") for i, box in enumerate(SCENES[scene]["red"])]
        result += [brush(square_mask(box), "Blue", rid=f"blue{i}") for i, box in enumerate(SCENES[scene]["blue"])]
        backend.annotate(annotation_id, task(task_id, scene), result)
    backend.drain()
    started = backend.post("/references?project=7&action=estimate", None)
    assert started.status_code == 202
    backend.drain()
    estimate = backend.client.get("/references?project=7").json["leave_one_out"]
    assert estimate["tasks_evaluated"] == 2
    for label in ("Red", "Blue"):
        assert estimate["labels"][label]["mean_iou"] == pytest.approx(1.0)
        assert estimate["labels"][label]["recall"] == pytest.approx(1.0)
    assert estimate["labels"]["Red"]["regions"] == 3


# --- the real predictor -----------------------------------------------------------------------------------

def test_the_real_predictor_fits_the_backend(tmp_path, reference_dir):
    """DINOvPredictor on the official miniT architecture (random weights): the masks mean nothing, but every
    call the backend makes must go through and give well-formed Label Studio predictions."""
    from dinov.build import load_model
    from dinov.predictor import DINOvPredictor
    from dinov.transforms import ResizeConfig

    model, _, digest = load_model(reference_dir / "miniT_ckpt.pth")
    predictor = DINOvPredictor(model, resize=ResizeConfig(shortest_edge=128, max_size=256), checkpoint_id="miniT")
    backend = Backend(tmp_path, predictor=predictor, score_threshold=0.0, min_area=1, max_instances_per_label=3)
    assert backend.setup().startswith(f"base-dinov-miniT_ckpt-{digest[:8]}-")  # model_version names the checkpoint
    scribble_and_box_on_a(backend)
    backend.drain()
    results = backend.predict([task(2, "b"), task(3, "missing")]).json["results"]
    assert len(results) == 2 and results[1] == []
    assert 1 <= len(results[0]["result"]) <= 6 and results[0]["model_version"] == backend.setup()
    for region in results[0]["result"]:
        assert region["value"]["brushlabels"][0] in ("Red", "Blue")
        assert region_to_mask(region, SIZE).any()
    context = {"result": [keypoint(40, 35, "Blue"), keypoint(5, 5, "Blue", positive=False, rid="k2")]}
    (prediction,) = backend.predict([task(2, "b")], context=context).json["results"]
    assert len(prediction["result"]) == 1 and prediction["result"][0]["value"]["brushlabels"] == ["Blue"]
    assert 0.0 <= prediction["score"] <= 1.0
    backend.runtime.shutdown()


def test_deleting_a_task_removes_its_references(backend):
    backend.setup()
    scribble_and_box_on_a(backend)
    backend.drain()
    first = backend.predict([task(2, "b")]).json["results"][0]
    assert first["result"]
    response = backend.post("/webhook", {"action": "TASKS_DELETED", "tasks": [{"id": 1}], "project": {"id": 7}})
    assert response.status_code == 200
    backend.drain()
    after = backend.predict([task(2, "b")]).json["results"][0]
    assert after["result"] == [] and after["model_version"] == first["model_version"]



def test_the_prediction_score_is_the_kept_share_of_the_candidates_when_the_model_reports_them(tmp_path):
    class ReportsCandidates(ColourPredictor):
        def segment_generic(self, *args, **kwargs):
            from dinov.results import GenericInstances

            found = GenericInstances(super().segment_generic(*args, **kwargs))
            found.candidate_score_sum = 2.0 * sum(i.score for i in found)
            return found

    backend = Backend(tmp_path, predictor=ReportsCandidates())
    backend.setup()
    scribble_and_box_on_a(backend)
    backend.drain()
    (prediction,) = backend.predict([task(2, "b")]).json["results"]
    assert prediction["result"] and prediction["score"] == pytest.approx(0.5)
    backend.runtime.shutdown()
