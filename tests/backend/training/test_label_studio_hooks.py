"""What Label Studio 1.23.2 asks of a model connection around Start Training (its ml/api_connector.py and
ml/models.py): the `job` of the START_TRAINING answer, /job_status, /versions, /health while the model loads and
with basic auth; START_TRAINING events of its "train on submission" switch coalescing; model_version that names
the served model and reads apart when Label Studio shortens it."""

from __future__ import annotations

import base64
import threading

import pytest

import tests.support.training_doubles as training_doubles
from labelstudio_backend.http.app import create_app
from labelstudio_backend.settings import Settings
from labelstudio_backend.store.training import ActiveModel
from tests.support.doubles import CONFIG, ColourPredictor
from tests.support.fault_harness import wait_for as poll

LS_AGENT = {"User-Agent": "heartex/1.23.2"}  # what Label Studio's MLApi sends


def wait_for(check, timeout=60.0):
    return poll(check, timeout=timeout)


def shortened(version: str) -> str:
    """Label Studio 1.23.2's tab label of a name (web/dist/apps/labelstudio/358.js): longer than 15 characters,
    its first 8, "..." and its last 6."""
    return version if len(version) <= 15 else f"{version[:8]}...{version[-6:]}"


@pytest.fixture
def app(tmp_path):
    made = []

    def make(target=training_doubles.sleeping_job, **overrides):
        settings = Settings(model_dir=tmp_path / "model_dir", **overrides)
        flask_app = create_app(lambda s: ColourPredictor(), settings, load_model=False)
        runtime = flask_app.extensions["dinov"]
        runtime.training.target = target
        made.append(runtime)
        client = flask_app.test_client()
        assert client.post("/setup", json={"project": "3.1", "schema": CONFIG}).status_code == 200
        return runtime, client
    yield make
    for runtime in made:
        for job in runtime.training.store.open_jobs():
            runtime.training.cancel(job["project_id"], "end of test")
        runtime.training.shutdown()
        runtime.shutdown()


def start_training(client, **project) -> dict:
    """The request Label Studio 1.23.2 sends for Start Training (feature flag ..._1417_start_training_mlbackend_
    webhooks on by default): the START_TRAINING webhook with the project as its webhook serializer writes it."""
    answer = client.post("/webhook", json={"action": "START_TRAINING",
                                           "project": {"id": 3, "label_config": CONFIG, **project}})
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def job_status(client, job) -> tuple[int, dict]:
    answer = client.post("/job_status", json={"job": job})
    return answer.status_code, answer.get_json()


def test_start_training_answers_a_job_that_job_status_follows(app):
    runtime, client = app(target=training_doubles.rejected_job, train_steps=40)
    answer = start_training(client, min_annotations_to_start_training=0, num_tasks_with_annotations=9)
    job = answer["job"]
    assert job and isinstance(job, str) and answer["job_status"] == "queued"
    assert f"training job {job} of project 3 queued" in answer["message"] and "40 steps" in answer["message"]
    assert "GET /training?project=3" in answer["message"]
    assert runtime.training.store.job(int(job))["annotated"] == 9
    code, status = wait_for(lambda: (s := job_status(client, job))[1]["state"] == "rejected" and s)
    assert code == 200 and status["job_status"] == "rejected" and "not better" in status["message"]
    assert status["project"] == 3
    code, gone = job_status(client, "999")
    assert code == 410 and "no training job 999" in gone["error"]  # Label Studio reads 410 as "removed"
    # older Label Studio's POST /train: the same answer
    train = client.post("/train", json={"project": "3.1", "label_config": CONFIG}).get_json()
    assert train["job"] and train["job"] != job


def test_a_running_job_status_is_started_in_label_studios_words(app):
    runtime, client = app()
    job = start_training(client)["job"]
    _, status = wait_for(lambda: (s := job_status(client, job))[1]["steps"] == 100 and s)  # the child runs
    assert status["state"] == "running" and status["job_status"] == "started"


def test_train_on_submission_events_coalesce(app):
    # Label Studio's "Start model training on annotation submission" sends START_TRAINING for every saved
    # annotation, with min_annotations_to_start_training = 1 in the project.
    runtime, client = app(train_on_submission_tasks=10, train_quiet_s=3600)
    store = runtime.training.store
    few = start_training(client, min_annotations_to_start_training=1, num_tasks_with_annotations=3)
    assert few["job"] is None and "3 annotated tasks, a job needs 6" in few["message"]
    for annotated in (6, 8):  # fewer than 10 new annotated tasks: the job waits for a quiet period
        waiting = start_training(client, min_annotations_to_start_training=1, num_tasks_with_annotations=annotated)
        assert waiting["job"] is None and "3600 s after the last submission" in waiting["message"]
    assert store.start_requests(3)["pending"] == 2 and store.latest_job(3) is None
    enough = start_training(client, min_annotations_to_start_training=1, num_tasks_with_annotations=10)
    first = enough["job"]
    assert first and store.job(int(first))["annotated"] == 10 and store.start_requests(3)["pending"] == 0
    wait_for(lambda: store.job(int(first))["state"] == "running")
    for annotated in (10, 11, 14):  # submissions while it runs: answered with the running job, which keeps running
        kept = start_training(client, min_annotations_to_start_training=1, num_tasks_with_annotations=annotated)
        assert kept["job"] == first and kept["job_status"] == "started" and "keeps running" in kept["message"]
    assert store.job(int(first))["state"] == "running" and store.start_requests(3)["pending"] == 3
    much_more = start_training(client, min_annotations_to_start_training=1, num_tasks_with_annotations=15)
    assert much_more["job"] != first and store.job(int(first))["state"] == "cancelled"  # 15 >= 1.5 x 10
    assert "15 annotated tasks, the running job had 10" in store.job(int(much_more["job"]))["reason"]
    # the switch off: Start Training starts a job at once (the running one is superseded)
    now = start_training(client, min_annotations_to_start_training=0, num_tasks_with_annotations=15)
    assert now["job"] not in (first, much_more["job"]) and store.job(int(much_more["job"]))["state"] == "cancelled"


def test_after_a_quiet_period_the_coalesced_submissions_start_one_job(app):
    runtime, client = app(target=training_doubles.rejected_job, train_quiet_s=3600)
    jobs, store = runtime.training, runtime.training.store
    settings = runtime.projects.settings_for(3)
    for annotated in (6, 7, 7):
        assert start_training(client, min_annotations_to_start_training=1,
                              num_tasks_with_annotations=annotated)["job"] is None
    last = store.start_requests(3)["last_request"]
    # what the timers do when TRAIN_QUIET_S has passed (called here with that moment, not waited for)
    assert jobs.start_when_quiet(3, CONFIG, settings, armed_at=last - 1, now=last + 3600) is None  # an older timer
    assert jobs.start_when_quiet(3, CONFIG, settings, armed_at=last, now=last + 10) is None  # not quiet yet
    job = jobs.start_when_quiet(3, CONFIG, settings, armed_at=last, now=last + 3600)
    assert job["annotated"] == 7 and "quiet after submissions" in job["reason"]
    assert store.start_requests(3)["pending"] == 0
    assert jobs.start_when_quiet(3, CONFIG, settings, armed_at=last, now=last + 3600) is None  # started once
    wait_for(lambda: store.job(job["job_id"])["state"] == "rejected")
    assert store.latest_job(3)["job_id"] == job["job_id"]


def test_the_quiet_period_timer_starts_the_job(app):
    runtime, client = app(target=training_doubles.rejected_job, train_quiet_s=0.2)
    assert start_training(client, min_annotations_to_start_training=1, num_tasks_with_annotations=6)["job"] is None
    job = wait_for(lambda: runtime.training.store.latest_job(3))
    assert job["annotated"] == 6 and "quiet after submissions" in job["reason"]


def test_versions_name_the_served_model_and_read_apart_when_shortened(app, tmp_path):
    runtime, client = app()
    runtime.load_model()
    setup = lambda extra=None: client.post("/setup", json={"project": "3.1", "schema": CONFIG,  # noqa: E731
                                                           "extra_params": extra}).get_json()["model_version"]
    base = setup()
    assert base.startswith("base-dinov-fake-ckpt-")
    # annotations do not change it
    client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 3, "label_config": CONFIG},
                                  "task": {"id": 1, "data": {"image": "/data/1.png"}},
                                  "annotation": {"id": 11, "task": 1, "result": []}})
    assert setup() == base
    # a setting that changes predictions does, one that only decides training does not
    tuned = setup({"score_threshold": 0.6})
    assert tuned != base and shortened(tuned) != shortened(base)
    assert setup({"train_quiet_s": 10}) == base
    # a fine-tuned model of the project: named by project and job at the start
    path = tmp_path / "model_dir" / "project_models" / "project3-job7.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"a delta")
    runtime.project_models.build = lambda base_, active: ColourPredictor()
    runtime.training.store.set_active(ActiveModel(project_id=3, path=str(path), checkpoint_id="fake-ckpt+p3-0a1b2c3d",
                                                  base_digest="fake-ckpt", score_threshold=0.4, job_id=7))
    project = setup()
    assert project.startswith("p3j7-dinov-") and shortened(project).startswith("p3j7-")
    assert len({shortened(v) for v in (base, tuned, project)}) == 3
    listed = client.get("/versions", json={"project": "3.1"}).get_json()  # as Label Studio asks: GET with a body
    assert listed["versions"] == [project, base] and listed["served"] == project
    assert listed["project_model"] == {"checkpoint": "fake-ckpt+p3-0a1b2c3d", "job": 7, "served": True}
    # Label Studio 1.23.2 drops the body of its GET /versions: without a project, every served model and the base
    assert client.get("/versions").get_json()["versions"] == [project, base]


def test_label_studio_keeps_the_connection_while_the_model_loads(tmp_path):
    release = threading.Event()

    def slow_model(settings):
        release.wait(30)
        return ColourPredictor()

    flask_app = create_app(slow_model, Settings(model_dir=tmp_path / "model_dir"))
    runtime = flask_app.extensions["dinov"]
    client = flask_app.test_client()
    try:
        wait_for(lambda: runtime.model_status().state == "loading")
        probe = client.get("/health")
        assert probe.status_code == 503 and probe.get_json()["status"] == "UNAVAILABLE"
        from_ls = client.get("/health", headers=LS_AGENT)
        assert from_ls.status_code == 200 and from_ls.get_json()["status"] == "LOADING"
        assert "loading" in from_ls.get_json()["reason"]
        assert client.post("/setup", json={"project": "3.1", "schema": CONFIG}).status_code == 200
    finally:
        release.set()
    wait_for(lambda: runtime.model_loaded)
    assert client.get("/health", headers=LS_AGENT).get_json()["status"] == "UP"
    runtime.training.shutdown()
    runtime.shutdown()


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_label_studio_reads_wrong_credentials_as_an_authentication_failure(tmp_path):
    # Label Studio 1.23.2 says "authentication parameters were either not provided or are incorrect" only when
    # /health answers 401 (ml/serializers.py _validate_healthcheck)
    settings = Settings(model_dir=tmp_path / "model_dir", basic_auth_user="ls", basic_auth_pass="s3cret")
    flask_app = create_app(lambda s: ColourPredictor(), settings, load_model=False)
    runtime = flask_app.extensions["dinov"]
    runtime.load_model()
    client = flask_app.test_client()
    try:
        assert client.get("/health").status_code == 200  # an orchestrator's probe
        assert client.get("/health", headers=LS_AGENT).status_code == 401  # Label Studio without credentials
        assert client.get("/health", headers={**LS_AGENT, **basic("ls", "wrong")}).status_code == 401
        assert client.get("/health", headers=basic("ls", "wrong")).status_code == 401
        assert client.get("/health", headers={**LS_AGENT, **basic("ls", "s3cret")}).status_code == 200
    finally:
        runtime.training.shutdown()
        runtime.shutdown()
