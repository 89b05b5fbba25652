"""Bulk auto-labeling (labelstudio_backend/bulk/) against the fake Label Studio and the colour model of
tests/support/doubles.py: images are grey with red and blue squares, so the expected masks are known exactly."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tests.support.doubles as doubles
from labelstudio_backend import bulk
from labelstudio_backend.bulk import (
    BulkError,
    BulkOptions,
    JsonSink,
    PinnedReferences,
    label_config_from_export,
    parse_task_ids,
    run_bulk,
    select_tasks,
)
from labelstudio_backend.runtime.runtime import Runtime
from labelstudio_backend.serving.backend import DINOvBackend
from labelstudio_backend.settings import Settings
from tests.support.doubles import (
    CONFIG,
    TOKEN,
    ColourPredictor,
    brush,
    make_project,
    masks_by_label,
    png,
    scene,
    settings_for,
)


def run(ls, tmp_path, model=None, **options) -> bulk.BulkReport:
    model = model or ColourPredictor()
    settings = options.pop("settings", None) or settings_for(ls, tmp_path)
    stop = options.pop("stop", None)
    build_project = options.pop("build_project", None)
    opts = BulkOptions(project=options.pop("project", 3), progress=False, **options)
    return run_bulk(opts, settings, model_factory=lambda s: model, stop=stop, build_project=build_project)


def without_ids(prediction: dict) -> dict:
    prediction = {k: v for k, v in prediction.items() if k != "id"}  # the fake Label Studio's prediction id
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
    model = ColourPredictor()
    report = run(ls, tmp_path, model, batch_size=3, workers=2, only_unlabeled=True)
    assert (report.selected, report.done, report.failed) == (7, 7, [])
    assert report.skipped == {"labeled (--only-unlabeled)": 2}
    assert report.model_version.startswith("base-dinov-fake-ckpt-") and report.revision == 2  # two annotations
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
    runtime = Runtime(settings, model_factory=lambda s: ColourPredictor())
    runtime.load_model()
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
        first = run(ls, tmp_path, ColourPredictor(on_encode=interrupt), batch_size=3, stop=stop, only_unlabeled=True)
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
    # the same model and settings: the same version, from the newest references; each task's prediction of it
    # replaced (Label Studio keeps one tab per version)
    assert refreshed.model_version == first.model_version and refreshed.revision == 3 and first.revision == 2
    assert refreshed.done == 3
    assert all([p["model_version"] for p in ls.of_task(t)] == [first.model_version] for t in truth)
    assert ls.count("DELETE", "/api/predictions/") == 3


def test_broken_image_is_reported_and_skipped(ls, tmp_path, monkeypatch, capsys):
    truth = make_project(ls, unlabeled=4, broken=(11,))
    monkeypatch.setenv("LABEL_STUDIO_URL", ls.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model_dir"))
    monkeypatch.setenv("MIN_AREA", "4")
    report_path = tmp_path / "report.json"
    status = bulk.main(["--project", "3", "--only-unlabeled", "--batch-size", "2", "--no-progress",
                        "--report", str(report_path)], model_factory=lambda s: ColourPredictor())
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


def test_a_created_answer_without_a_count_posts_nothing_twice(ls, tmp_path):
    """An import answered 201 with a body that is not JSON (a proxy's page) may have stored everything: the sink
    asks Label Studio which tasks hold the prediction instead of posting them again one by one."""
    truth = make_project(ls, unlabeled=5)
    ls.unparsable_201 = True
    report = run(ls, tmp_path, batch_size=3, only_unlabeled=True)
    assert report.done == 5 and report.failed == []
    assert ls.count("POST", "/api/predictions") == 0
    assert all(len(ls.of_task(t)) == 1 for t in truth)


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

    first = run(ls, tmp_path, ColourPredictor(on_encode=stop_after_first), batch_size=2, out=out, stop=stop,
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
    assert third.model_version == second.model_version and third.revision > second.revision and third.done == 5
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
    report = run_bulk(options, settings, model_factory=lambda s: ColourPredictor())
    assert report.mode == "folder" and report.done == 4 and report.failed == []
    tasks = json.loads(out.read_text())
    assert [t["data"]["image"] for t in tasks] == [f"/data/local-files/?d=photos/img{i}.png" for i in range(4)]
    for task in tasks:
        found = masks_by_label(task["predictions"][0])
        expected = truth[task["data"]["image"].rsplit("/", 1)[1]]
        assert all(np.array_equal(found[label], expected[label]) for label in ("Red", "Blue"))
    # the derived config and the store hold what the export says
    assert 'BrushLabels name="tag" toName="image"' in label_config_from_export(export)
    again = run_bulk(options, settings, model_factory=lambda s: ColourPredictor())
    assert again.done == 0 and again.skipped == {"already predicted": 4}
    with pytest.raises(BulkError, match="--references"):
        run_bulk(BulkOptions(images=images, out=out), settings)


def test_json_sink_refuses_a_foreign_file(tmp_path):
    out = tmp_path / "x.json"
    out.write_text("{not json")
    with pytest.raises(BulkError, match="not JSON"):
        JsonSink(out, project_mode=True)


# --- Ray ------------------------------------------------------------------------------------------------------

def test_ray_mode_gives_the_same_predictions_as_local_mode(ls, tmp_path):
    pytest.importorskip("ray")
    import ray.cloudpickle

    make_project(ls, unlabeled=5, broken=(12,))
    local_out, ray_out = tmp_path / "local.json", tmp_path / "ray.json"
    local = run(ls, tmp_path, batch_size=2, out=local_out)
    from labelstudio_backend.bulk.ray_mode import init_ray

    for module in (sys.modules[__name__], doubles):  # the test double goes to the workers
        ray.cloudpickle.register_pickle_by_value(module)
    init_ray(None, num_cpus=2, log_to_driver=False)
    try:
        remote = run(ls, tmp_path, batch_size=2, out=ray_out, ray="")
    finally:
        ray.shutdown()
        for module in (sys.modules[__name__], doubles):
            ray.cloudpickle.unregister_pickle_by_value(module)
    assert (remote.done, [f["task"] for f in remote.failed]) == (local.done, [12]) == (6, [12])
    assert remote.failed[0]["reason"] == local.failed[0]["reason"]
    by_task = lambda path: {i["task"]: without_ids(i) for i in json.loads(path.read_text())}
    assert by_task(ray_out) == by_task(local_out)


class ProjectColourPredictor(ColourPredictor):
    """A project's fine-tuned colour model: it finds the regions of the first label only."""

    def __init__(self, active):
        super().__init__()
        self.checkpoint_id = active.checkpoint_id
        self.model_name = f"fake-ckpt+p{active.project_id}"

    def segment_generic(self, encoded, classes, **kwargs):
        return [i for i in super().segment_generic(encoded, classes, **kwargs) if i.class_index == 0]


def activate_project_model(settings) -> tuple[Path, object]:
    """Project 3's active checkpoint in MODEL_DIR, and a build of its model that checks the file it is given:
    the delta's bytes, and outside the driver's process a copy of its own (Ray workers may not share
    MODEL_DIR)."""
    from labelstudio_backend.store.training import ActiveModel, TrainingStore, training_db

    path = settings.model_dir / "project_models" / "project3-job1.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"a delta")
    TrainingStore(training_db(settings.model_dir)).set_active(ActiveModel(
        project_id=3, path=str(path), checkpoint_id="fake-ckpt+p3-0a1b2c3d", base_digest="fake-ckpt",
        score_threshold=0.3, job_id=1))
    driver = os.getpid()

    def build(base, active):
        assert Path(active.path).read_bytes() == b"a delta"
        assert (active.path == str(path)) == (os.getpid() == driver), active.path
        return ProjectColourPredictor(active)

    return path, build


def test_ray_mode_serves_the_project_model_as_local_mode_does(ls, tmp_path):
    pytest.importorskip("ray")
    import ray.cloudpickle

    from labelstudio_backend.bulk.ray_mode import init_ray
    from labelstudio_backend.runtime.projects import ProjectRecords

    make_project(ls, unlabeled=3)
    settings = settings_for(ls, tmp_path)
    _, build = activate_project_model(settings)
    outs = {name: tmp_path / f"{name}.json" for name in ("local", "ray", "rollback")}
    local = run(ls, tmp_path, batch_size=2, out=outs["local"], settings=settings, build_project=build)
    for module in (sys.modules[__name__], doubles):  # the test doubles go to the workers
        ray.cloudpickle.register_pickle_by_value(module)
    init_ray(None, num_cpus=2, log_to_driver=False)
    try:
        remote = run(ls, tmp_path, batch_size=2, out=outs["ray"], ray="", settings=settings, build_project=build)
        ProjectRecords(settings).save(3, {"project_model": "base"}, CONFIG)  # the project's rollback
        rollback = run(ls, tmp_path, batch_size=2, out=outs["rollback"], ray="", settings=settings,
                       build_project=build)
    finally:
        ray.shutdown()
        for module in (sys.modules[__name__], doubles):
            ray.cloudpickle.unregister_pickle_by_value(module)
    by_task = lambda path: {i["task"]: without_ids(i) for i in json.loads(path.read_text())}
    assert by_task(outs["ray"]) == by_task(outs["local"]) and local.done == remote.done == rollback.done == 5
    for report in (local, remote):
        assert (report.model, report.checkpoint) == ("project", "fake-ckpt+p3-0a1b2c3d")
        assert "+p3" in report.model_version and "project model fake-ckpt+p3-0a1b2c3d" in report.summary()
    for item in json.loads(outs["ray"].read_text()):
        assert len(masks_by_label(item)) == 1  # the project's model found one label's regions
    assert (rollback.model, rollback.checkpoint) == ("base", "fake-ckpt") and "+p3" not in rollback.model_version
    found = [set(masks_by_label(item)) for item in json.loads(outs["rollback"].read_text())]
    assert set.union(*found) == {"Red", "Blue"} and max(map(len, found)) == 2  # the base model's two labels


def test_local_mode_serves_the_project_model_unless_the_job_rolls_it_back(ls, tmp_path):
    make_project(ls, unlabeled=3)
    settings = settings_for(ls, tmp_path)
    _, build = activate_project_model(settings)
    served = run(ls, tmp_path, batch_size=2, out=tmp_path / "served.json", settings=settings, build_project=build)
    base = run(ls, tmp_path, batch_size=2, out=tmp_path / "base.json", settings=settings, build_project=build,
               extra_params={"project_model": "base"})
    assert (served.model, served.checkpoint) == ("project", "fake-ckpt+p3-0a1b2c3d")
    assert (base.model, base.checkpoint) == ("base", "fake-ckpt") and "+p3" not in base.model_version
    found = [set(masks_by_label(item)) for item in json.loads((tmp_path / "base.json").read_text())]
    assert set.union(*found) == {"Red", "Blue"}  # the base model's two labels, not the project model's one


def test_a_ray_worker_whose_base_is_not_the_project_models_refuses_to_start(ls, tmp_path):
    from labelstudio_backend.bulk.ray_mode import Segmenter
    from labelstudio_backend.store.training import ActiveModel

    settings = settings_for(ls, tmp_path)
    build = lambda base, active: ProjectColourPredictor(active)
    pinned = PinnedReferences(model_version="dinov-fake-ckpt+p3-refs1-abcdef", revision=1,
                              checkpoint="fake-ckpt+p3-0a1b2c3d", labels=["Red"], task_ids=[1],
                              vectors=np.zeros((1, 3), np.float32))
    active = ActiveModel(project_id=3, path="/driver/project3-job1.safetensors",
                         checkpoint_id="fake-ckpt+p3-0a1b2c3d", base_digest="fake-ckpt", score_threshold=0.3, job_id=1)
    worker = Segmenter(settings, CONFIG, 3, pinned, lambda s: ColourPredictor(), project_model=active,
                       delta=b"a delta", build_project=build)  # as an actor: in a process of its own
    assert worker.backend.model.checkpoint_id == "fake-ckpt+p3-0a1b2c3d"
    assert worker.backend.model.active.path.startswith(worker.folder.name)  # the bytes sent, in a file of its own
    assert Path(worker.backend.model.active.path).read_bytes() == b"a delta"

    other = ActiveModel(**{**active.__dict__, "base_digest": "another-base"})
    with pytest.raises(RuntimeError, match="pinned with fake-ckpt\\+p3-0a1b2c3d: its checkpoint was trained on base "
                                           "another-base"):
        Segmenter(settings, CONFIG, 3, pinned, lambda s: ColourPredictor(), project_model=other, delta=b"a delta",
                  build_project=build)
    with pytest.raises(RuntimeError, match="every node needs the driver DINOV_CHECKPOINT"):
        Segmenter(settings, CONFIG, 3, pinned, lambda s: ColourPredictor())  # no checkpoint sent: the base
