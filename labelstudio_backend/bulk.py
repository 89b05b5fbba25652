"""Bulk auto-labeling: pre-annotate a whole Label Studio project, or a folder of images, with DINOv.

    python -m labelstudio_backend.bulk --project 3                        # post predictions to Label Studio
    python -m labelstudio_backend.bulk --project 3 --only-unlabeled --task-ids 1000-1999
    python -m labelstudio_backend.bulk --project 3 --out predictions.json  # for /api/projects/3/import/predictions
    python -m labelstudio_backend.bulk --images photos/ --references export.json --out tasks.json
    python -m labelstudio_backend.bulk --project 3 --ray auto             # on a Ray cluster (bulk_ray.py)

Each task is predicted by the server's own code (DINOvBackend._preannotate: the project's reference store, the
per-project settings /setup saved in MODEL_DIR, the same filters and region conversion). Around it:

- The job pins the references at its start: the example embeddings and the model_version (which names the
  reference revision) go to MODEL_DIR/bulk/<job>.json and .npz; a rerun keeps them unless
  --refresh-references, so an annotation made overnight does not restart the job from zero.
- Tasks are listed once, before anything is written, and those that already hold a prediction of the pinned
  version are skipped, so a rerun continues where the last run stopped.
- A bounded thread pool fetches images while the model works on the previous batch; a batch is encoded in
  one call (predictor.encode_images) and written in one request.
- A task whose image or prediction fails is reported and gets no prediction (a rerun tries it again); the
  others go on. Ctrl-C stops after the current batch. The report (done, skipped, failed with reasons) is
  printed and written as JSON.

Label Studio 1.23.2 facts this relies on (checked against a running server):
- GET /api/projects/<id>/tasks/?page=&page_size= lists tasks with their annotations and predictions, newest
  updated_at first, 404 past the last page. POST /api/predictions/ (one prediction) sets its task's
  updated_at, which moves the task to the first page; POST /api/projects/<id>/import/predictions (a list of
  {"task", "result", "score", "model_version"}) bulk-creates without touching updated_at. It answers
  201 {"created": n}: a prediction whose result does not validate is dropped silently (n is smaller), and a
  task id outside the project refuses the whole list (400).
- A prediction with an empty result is stored (it marks the task as predicted). Among the entries of a
  /predict answer, [] stores nothing for its task (so do {} and an entry without "result", which Label Studio
  logs as errors); a null entry fails the whole request.
- The data manager's task list (/api/tasks/) makes Label Studio call the ML backend for tasks without
  predictions when the project retrieves predictions automatically, so it is not used.

The background mode of /predict lives here too: when a "Retrieve predictions" call brings more tasks than fit
into PREDICT_TIME_BUDGET, DINOvBackend.defer_tasks answers [] for the rest (stored as nothing) and hands them to
a background thread that predicts them with the same pipeline and posts the predictions through the API.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections import Counter, defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from labelstudio_backend.images import ImageLoader
from labelstudio_backend.label_config import ParsedConfig, parse_label_config
from labelstudio_backend.model import DINOvBackend, ModelUnavailable, Predictor, Runtime, _int_or_none
from labelstudio_backend.settings import Settings, SettingsError
from labelstudio_backend.sync import LabelStudioClient, LabelStudioError

logger = logging.getLogger(__name__)

OFFLINE_PROJECT_ID = 0          # the project id of the reference store built from an export
MAX_WRITE_FAILURES = 3          # consecutive failed writes (Label Studio down) before a job stops
BACKGROUND_CLAIM_TTL_S = 600.0  # how long a posted task stays claimed (longer than Label Studio's 100 s timeout)


class BulkError(ValueError):
    """The job cannot run as asked; the message says what to change."""


# --- task selection ---------------------------------------------------------------------------------------

def parse_task_ids(text: str) -> list[tuple[int, int]]:
    """'100-200,305,400-' -> [(100, 200), (305, 305), (400, max)]: inclusive ranges of task ids."""
    ranges = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            start = int(low) if low.strip() else 0
            end = (int(high) if high.strip() else sys.maxsize) if dash else start
        except ValueError:
            raise BulkError(f"--task-ids {text!r}: {part!r} is not a task id or a range like 100-200") from None
        if end < start:
            raise BulkError(f"--task-ids {text!r}: the range {part!r} ends before it starts")
        ranges.append((start, end))
    if not ranges:
        raise BulkError(f"--task-ids {text!r} names no task; give ids or ranges such as 100-200,305")
    return ranges


def in_ranges(task_id: Any, ranges: Sequence[tuple[int, int]] | None) -> bool:
    if not ranges:
        return True
    value = _int_or_none(task_id)
    return value is not None and any(start <= value <= end for start, end in ranges)


def select_tasks(tasks: Iterable[dict], model_version: str, only_unlabeled: bool = False,
                 ranges: Sequence[tuple[int, int]] | None = None,
                 done: set | None = None) -> tuple[list[dict], Counter]:
    """The tasks to predict, and how many were skipped for which reason.

    A listed task carries "labeled" (it has a non-cancelled annotation) and "versions" (the model versions of
    its predictions); `done` holds the keys (task ids) written before by this job to a file.
    """
    selected, skipped = [], Counter()
    for task in tasks:
        if not in_ranges(task.get("id"), ranges):
            skipped["outside --task-ids"] += 1
        elif model_version in task.get("versions", ()) or (done and task_key(task) in done):
            skipped["already predicted"] += 1
        elif only_unlabeled and task.get("labeled"):
            skipped["labeled (--only-unlabeled)"] += 1
        else:
            selected.append(task)
    return selected, skipped


def task_key(task: dict) -> Any:
    """What identifies a task in the job's output: its image URL in folder mode, else its Label Studio id."""
    return task["key"] if "key" in task else task.get("id")


# --- Label Studio API -------------------------------------------------------------------------------------

def listed_task(task: dict) -> dict:
    """What the job keeps of a listed task: id, data, whether it is labeled, its predictions' versions."""
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
    return {"id": int(task["id"]), "data": task.get("data") or {},
            "labeled": any(not a.get("was_cancelled") for a in annotations),
            "versions": sorted({str(p.get("model_version")) for p in task.get("predictions") or []
                                if isinstance(p, dict)})}


def list_project_tasks(client: LabelStudioClient, project_id: int, page_size: int = 100,
                       expected: int | None = None, passes: int = 3) -> list[dict]:
    """Every task of the project (listed_task records, by id).

    The list is ordered by updated_at, so a task that annotators change while we read moves to the first page;
    when fewer tasks than the project's count were seen, the pages are read again (at most `passes` times).
    """
    found: dict[int, dict] = {}
    for attempt in range(passes):
        page = 1
        while True:
            tasks = client.task_page(project_id, page, page_size)
            if not tasks:
                break
            for task in tasks:
                found[int(task["id"])] = listed_task(task)
            page += 1
        if expected is None or len(found) >= expected:
            break
        logger.info("listed %d of %d tasks (tasks changed while listing); reading the pages again",
                    len(found), expected)
    return [found[i] for i in sorted(found)]


def has_prediction(client: LabelStudioClient, task_id: int, model_version: str) -> bool:
    """Whether the task holds a prediction of this model version (asked of Label Studio now)."""
    found = client.get_json("/api/predictions/", params={"task": int(task_id)})
    return any(isinstance(p, dict) and p.get("model_version") == model_version for p in found or [])


# --- writing predictions ----------------------------------------------------------------------------------

DONE, EXISTS, FAILED = "done", "exists", "failed"


class Sink(Protocol):
    """Where predictions go: write() answers (status, reason) per item, status one of DONE, EXISTS, FAILED."""

    def done_keys(self, model_version: str) -> set: ...
    def write(self, items: list[tuple[dict, dict]]) -> list[tuple[str, str]]: ...
    def close(self) -> None: ...


class LabelStudioSink:
    """Posts predictions to a project: one import request per batch, one by one to isolate a refused one.

    With check_existing, a task that meanwhile got a prediction of the same version (another job, or the
    server answering "Retrieve predictions") is left alone, so that no task gets two.
    """

    def __init__(self, client: LabelStudioClient, project_id: int, check_existing: bool = True):
        self.client, self.project_id, self.check_existing = client, int(project_id), check_existing

    def done_keys(self, model_version: str) -> set:
        return set()  # the task list says which tasks hold a prediction

    def write(self, items: list[tuple[dict, dict]]) -> list[tuple[str, str]]:
        outcomes: list[tuple[str, str] | None] = [None] * len(items)
        payload, where = [], []
        for i, (task, prediction) in enumerate(items):
            if self.check_existing and has_prediction(self.client, task["id"], prediction["model_version"]):
                outcomes[i] = (EXISTS, "predicted meanwhile by another job")
                continue
            payload.append({"task": int(task["id"]), "result": prediction["result"],
                            "score": prediction.get("score"), "model_version": prediction["model_version"]})
            where.append(i)
        if payload:
            path = f"/api/projects/{self.project_id}/import/predictions"
            response = self.client.request("POST", path, json=payload)
            if response.status_code >= 500:  # Label Studio is failing, not refusing these predictions
                raise LabelStudioError(f"Label Studio answered {response.status_code} to POST {path}: "
                                       f"{response.text[:300]}", response.status_code)
            created = _created(response)
            if created == len(payload):
                for i in where:
                    outcomes[i] = (DONE, "")
            elif created:  # some results did not validate and were dropped: find out which
                for i, item in zip(where, payload):
                    ok = has_prediction(self.client, item["task"], item["model_version"])
                    outcomes[i] = (DONE, "") if ok else (FAILED, "Label Studio dropped the prediction: its result "
                                                                 "does not validate against the labeling config")
            else:  # refused as a whole (e.g. a task deleted meanwhile): one by one, for the reasons
                for i, item in zip(where, payload):
                    outcomes[i] = self._post_one(item)
        return [o or (FAILED, "not written") for o in outcomes]

    def _post_one(self, item: dict) -> tuple[str, str]:
        response = self.client.request("POST", "/api/predictions/", json=item)
        if response.status_code == 201:
            return DONE, ""
        return FAILED, f"Label Studio refused the prediction ({response.status_code}): {response.text[:300]}"

    def close(self) -> None:
        pass


def _created(response) -> int:
    if response.status_code != 201:
        return 0
    try:
        return int(response.json().get("created", 0))
    except (ValueError, AttributeError, TypeError):
        return 0


class JsonSink:
    """Writes predictions to a JSON file for import instead of posting them.

    Items are appended to a journal (<out>.partial.jsonl, flushed per batch) so that an interrupted or killed
    run loses nothing and a rerun continues; close() writes <out> as one JSON list and removes the journal.
    Project mode writes {"task", "result", "score", "model_version"} (POST /api/projects/<id>/import/predictions);
    folder mode writes tasks with their predictions (the project import: POST /api/projects/<id>/import).
    """

    def __init__(self, path: Path, project_mode: bool, image_key: str = "image"):
        self.path = Path(path)
        self.journal = self.path.with_name(self.path.name + ".partial.jsonl")
        self.project_mode = project_mode
        self.image_key = image_key
        self.items = self._read_existing()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "w") as f:  # start the journal with what is kept
            for item in self.items:
                f.write(json.dumps(item) + "\n")
        self._file = open(self.journal, "a")

    def _read_existing(self) -> list[dict]:
        if self.journal.exists():
            items = []
            for line in self.journal.read_text().splitlines():
                try:
                    items.append(json.loads(line))
                except ValueError:  # a line cut by a crash
                    continue
            return items
        if self.path.exists():
            try:
                items = json.loads(self.path.read_text())
            except ValueError:
                raise BulkError(f"--out {self.path} exists and is not JSON; move it away or choose another file") \
                    from None
            if not isinstance(items, list):
                raise BulkError(f"--out {self.path} exists and is not a JSON list of predictions")
            return items
        return []

    def _key(self, item: dict) -> Any:
        if self.project_mode:
            return item.get("task")
        return (item.get("data") or {}).get(self.image_key)

    def _version(self, item: dict) -> str | None:
        if self.project_mode:
            return item.get("model_version")
        return next((p.get("model_version") for p in item.get("predictions") or []), None)

    def done_keys(self, model_version: str) -> set:
        """Keys written before with this model version. Items of another version (the job was pinned again)
        are dropped, so that the file never holds two predictions for one task."""
        kept = [i for i in self.items if self._version(i) == model_version]
        if len(kept) < len(self.items):
            logger.warning("%s: dropping %d predictions of other model versions (the references were pinned "
                           "again)", self.path, len(self.items) - len(kept))
            self.items = kept
            with open(self.journal, "w") as f:
                f.writelines(json.dumps(item) + "\n" for item in kept)
            self._file.close()
            self._file = open(self.journal, "a")
        return {self._key(i) for i in kept}

    def write(self, items: list[tuple[dict, dict]]) -> list[tuple[str, str]]:
        for task, prediction in items:
            if self.project_mode:
                item = {"task": task["id"], **prediction}
            else:
                item = {"data": task["data"], "predictions": [prediction]}
            self.items.append(item)
            self._file.write(json.dumps(item) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        return [(DONE, "")] * len(items)

    def close(self) -> None:
        self._file.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.items))
        os.replace(tmp, self.path)
        self.journal.unlink()


# --- pinned references ------------------------------------------------------------------------------------

@dataclass
class PinnedReferences:
    """The in-context examples a job predicts with, frozen at its start: one row per example, in the store's
    order (per label, most recent first)."""

    model_version: str
    revision: int
    checkpoint: str
    labels: list[str]
    task_ids: list[int | None]
    vectors: np.ndarray  # float32 [n, D]
    pinned_at: str = ""

    def banks(self, labels: Sequence[str], per_label: int, exclude_task_id: int | None = None) -> dict[str, np.ndarray]:
        """label -> [k, D], as DINOvBackend.label_banks builds them: at most per_label examples, never the
        task's own."""
        rows: dict[str, list[np.ndarray]] = defaultdict(list)
        for label, task_id, vector in zip(self.labels, self.task_ids, self.vectors):
            if exclude_task_id is not None and task_id == exclude_task_id:
                continue
            if len(rows[label]) < per_label:
                rows[label].append(vector)
        return {label: np.stack(rows[label]) for label in labels if rows.get(label)}

    @property
    def examples(self) -> int:
        return len(self.labels)

    def save(self, path: Path) -> None:
        """path.json (what the job is pinned to) and path.npz (the embeddings), written atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        banks = path.with_suffix(".npz")
        tmp = banks.with_name(banks.stem + ".tmp.npz")
        np.savez(tmp, vectors=np.asarray(self.vectors, np.float32), labels=np.asarray(self.labels, dtype=str),
                 task_ids=np.asarray([-1 if t is None else t for t in self.task_ids], dtype=np.int64))
        os.replace(tmp, banks)
        record = {"model_version": self.model_version, "revision": self.revision, "checkpoint": self.checkpoint,
                  "examples": self.examples, "labels": sorted(set(self.labels)), "pinned_at": self.pinned_at,
                  "banks": banks.name}
        tmp_json = path.with_name(path.name + ".tmp")
        tmp_json.write_text(json.dumps(record, indent=2))
        os.replace(tmp_json, path)

    @classmethod
    def load(cls, path: Path) -> "PinnedReferences | None":
        try:
            record = json.loads(path.read_text())
            with np.load(path.with_name(record["banks"])) as banks:
                vectors, labels, task_ids = banks["vectors"], banks["labels"], banks["task_ids"]
        except (OSError, ValueError, KeyError) as e:
            if path.exists():
                logger.warning("the pinned job state %s cannot be read (%s); pinning the references again", path, e)
            return None
        return cls(model_version=record["model_version"], revision=int(record["revision"]),
                   checkpoint=record["checkpoint"], labels=[str(label) for label in labels],
                   task_ids=[None if t < 0 else int(t) for t in task_ids], vectors=vectors.astype(np.float32),
                   pinned_at=record.get("pinned_at", ""))


def pin_references(backend: DINOvBackend, labels: Sequence[str], attempts: int = 3) -> PinnedReferences:
    """Embed the project's examples now and freeze them with the model_version they belong to.

    Per label, enough examples are kept that leaving out any one task's own (as the server does for the task
    it predicts) still leaves MAX_EXAMPLES_PER_LABEL. If the store changes while we read it, read again.
    """
    store, project_id = backend.runtime.store, backend.project_id
    per_label = backend.settings.max_examples_per_label
    for attempt in range(attempts):
        revision = store.revision(project_id)
        examples = store.examples(project_id, labels=list(labels), per_label=1_000_000,
                                  **backend._reference_filter())
        chosen = []
        for label in labels:
            rows = [e for e in examples if e.label == label]
            count = per_label
            while count < len(rows):
                most_of_one_task = max(Counter(e.task_id for e in rows[:count]).values())
                if count >= per_label + most_of_one_task:
                    break
                count = per_label + most_of_one_task
            chosen += rows[:count]
        vectors = backend.embed_examples(chosen)
        version = backend.model_version
        if store.revision(project_id) == revision:
            break
        logger.info("the references changed while being pinned; reading them again")
    kept = [(e, vectors[backend._embedding_key(e)]) for e in chosen if backend._embedding_key(e) in vectors]
    dim = next((len(v) for _, v in kept), 0)
    return PinnedReferences(
        model_version=version, revision=revision, checkpoint=backend.runtime.checkpoint_id,
        labels=[e.label for e, _ in kept], task_ids=[_int_or_none(e.task_id) for e, _ in kept],
        vectors=np.stack([v for _, v in kept]).astype(np.float32) if kept else np.zeros((0, dim), np.float32),
        pinned_at=_now())


def version_at_revision(backend: DINOvBackend, revision: int) -> str:
    """The model_version the backend would name at another reference revision (same checkpoint and settings)."""
    live = backend.runtime.store.revision(backend.project_id)
    return backend.model_version.replace(f"-refs{live}-", f"-refs{revision}-")


class PinnedBackend(DINOvBackend):
    """DINOvBackend predicting against pinned references (and, on Ray workers, the driver's settings)."""

    def __init__(self, project_id: int, label_config: str, runtime: Runtime, pinned: PinnedReferences,
                 settings: Settings | None = None):
        super().__init__(project_id, label_config, runtime=runtime)
        if settings is not None:
            self.settings = settings
        self.pinned = pinned

    @property
    def model_version(self) -> str:
        return self.pinned.model_version

    def label_banks(self, labels: Sequence[str], exclude_task_id: int | None = None) -> dict[str, np.ndarray]:
        return self.pinned.banks(labels, self.settings.max_examples_per_label, exclude_task_id)


# --- the model step ---------------------------------------------------------------------------------------

def remember_encoded(runtime: Runtime, url: str, encoded: Any) -> None:
    """Put an encoded image into the runtime's feature cache, under the key Runtime.encode looks up, so that
    DINOvBackend._preannotate uses it instead of encoding the image again."""
    runtime.features.put((url, runtime.checkpoint_id), encoded)


def encode_batch(runtime: Runtime, images: Sequence[np.ndarray]) -> list[Any]:
    """Encoded images in one model call when the predictor can batch; one image failing does not fail the
    others (they are encoded one by one then). A failed image's entry is its exception."""
    predictor = runtime.predictor
    batched = getattr(predictor, "encode_images", None)
    if batched is not None and len(images) > 1:
        try:
            with runtime.device_lock:
                return list(batched(list(images), batch_size=len(images)))
        except ModelUnavailable:
            raise
        except Exception as e:
            logger.info("encoding a batch of %d failed (%s); encoding its images one by one", len(images), e)
    encoded: list[Any] = []
    for image in images:
        try:
            with runtime.device_lock:
                encoded.append(predictor.encode_image(image))
        except ModelUnavailable:
            raise
        except Exception as e:
            encoded.append(e)
    return encoded


def segment_batch(backend: DINOvBackend, config: ParsedConfig, model_version: str,
                  items: Sequence[tuple[dict, np.ndarray]]) -> list[tuple[dict | None, str]]:
    """(prediction, "") or (None, reason) per (task, image): encoded as a batch, segmented one by one."""
    runtime = backend.runtime
    encoded = encode_batch(runtime, [image for _, image in items]) if items else []
    labels = config.output_labels
    results: list[tuple[dict | None, str]] = []
    for (task, _), enc in zip(items, encoded):
        if isinstance(enc, Exception):
            results.append((None, _reason(enc)))
            continue
        try:
            remember_encoded(runtime, config.image_url(task), enc)
            results.append((backend._preannotate(task, config, labels, model_version), ""))
        except ModelUnavailable:
            raise
        except Exception as e:  # this task only
            logger.debug("task %s failed", task.get("id"), exc_info=True)
            results.append((None, _reason(e)))
    return results


def _reason(error: BaseException) -> str:
    text = str(error).strip() or "no message"
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


# --- the pipeline -----------------------------------------------------------------------------------------

@dataclass
class BulkReport:
    job: str = ""
    mode: str = "label_studio"
    project: int | None = None
    model_version: str = ""
    revision: int = 0
    started_at: str = ""
    finished_at: str = ""
    seconds: float = 0.0
    tasks_listed: int = 0
    selected: int = 0
    done: int = 0
    done_without_regions: int = 0
    skipped: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)  # [{"task": id, "reason": text}]
    interrupted: bool = False
    stopped_because: str = ""
    images_per_second: float = 0.0
    out: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        lines = [f"bulk job {self.job}: {self.done} done ({self.done_without_regions} without regions), "
                 f"{skipped} skipped, {len(self.failed)} failed, of {self.tasks_listed} tasks; "
                 f"model_version {self.model_version}; {self.seconds:.1f} s, {self.images_per_second:.2f} images/s"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count}: {reason}")
        reasons = Counter(f["reason"] for f in self.failed)
        for reason, count in reasons.most_common(10):
            lines.append(f"  failed {count}: {reason}")
        if self.interrupted or self.stopped_because:
            lines.append(f"  stopped early: {self.stopped_because or 'interrupted'}; run the same command again "
                         "to continue")
        return "\n".join(lines)


class Recorder:
    """Counts each task's outcome into the report (and the progress bar) and writes the predictions: one write
    in flight at a time, so that posting a batch overlaps the model work on the next one.

    After MAX_WRITE_FAILURES failed writes in a row (Label Studio unreachable) it sets `stop`.
    """

    def __init__(self, sink: Sink, report: BulkReport, stop: threading.Event, progress: Any = None,
                 on_task: Callable[[dict, str, str], None] | None = None):
        self.sink, self.report, self.stop, self.progress = sink, report, stop, progress
        self.on_task = on_task or (lambda task, status, reason: None)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulk-writer")
        self._write: Future | None = None
        self._write_failures = 0
        self._lock = threading.Lock()  # the writer thread counts too

    def failed(self, task: dict, reason: str) -> None:
        self._count(task, FAILED, reason)

    def write(self, writes: list[tuple[dict, dict]]) -> None:
        self._wait()
        if self.report.stopped_because:  # writing stopped working: keep these for the next run
            for task, _ in writes:
                self._count(task, FAILED, f"not written: {self.report.stopped_because}")
        elif writes:
            self._write = self._writer.submit(self._do_write, writes)

    def finish(self) -> None:
        try:
            self._wait()
        finally:
            self._writer.shutdown(wait=True)

    def _wait(self) -> None:
        if self._write is not None:
            future, self._write = self._write, None
            future.result()

    def _do_write(self, writes: list[tuple[dict, dict]]) -> None:
        try:
            outcomes = self.sink.write(writes)
            self._write_failures = 0
        except (LabelStudioError, OSError) as e:
            self._write_failures += 1
            outcomes = [(FAILED, f"writing the prediction failed: {e}")] * len(writes)
            logger.error("writing %d predictions failed: %s", len(writes), e)
            if self._write_failures >= MAX_WRITE_FAILURES:
                self.report.stopped_because = f"{MAX_WRITE_FAILURES} writes in a row failed; last: {e}"
                self.stop.set()
        for (task, prediction), (status, reason) in zip(writes, outcomes):
            self._count(task, status, reason, prediction)

    def _count(self, task: dict, status: str, reason: str, prediction: dict | None = None) -> None:
        with self._lock:
            report = self.report
            if status == DONE:
                report.done += 1
                if prediction is not None and not prediction.get("result"):
                    report.done_without_regions += 1
            elif status == EXISTS:
                report.skipped[reason] = report.skipped.get(reason, 0) + 1
            else:
                report.failed.append({"task": task_key(task), "reason": reason})
                logger.warning("task %s: no prediction: %s", task_key(task), reason)
            if self.progress is not None:
                self.progress.update(1)
                self.progress.set_postfix(done=report.done, failed=len(report.failed), refresh=False)
        self.on_task(task, status, reason)


def finish_report(report: BulkReport, predicted: int, seconds: float, unfinished: bool) -> None:
    report.seconds = round(report.seconds + seconds, 3)
    report.images_per_second = round(predicted / seconds, 3) if seconds > 0 else 0.0
    if unfinished and not report.stopped_because:
        report.interrupted = True
        report.stopped_because = "interrupted (Ctrl-C)"


class Pipeline:
    """Fetch images ahead (a bounded thread pool), encode and segment batch by batch, hand each batch's
    predictions to the recorder (which writes them while the model works on the next batch).

    load_image(task) -> RGB array. Setting `recorder.stop` stops after the current batch.
    """

    def __init__(self, backend: DINOvBackend, config: ParsedConfig, model_version: str, recorder: Recorder,
                 load_image: Callable[[dict], np.ndarray], batch_size: int = 8, workers: int = 4):
        if batch_size < 1 or workers < 1:
            raise BulkError(f"--batch-size and --workers must be at least 1, got {batch_size} and {workers}")
        self.backend, self.config, self.version, self.recorder = backend, config, model_version, recorder
        self.load_image, self.batch_size, self.workers = load_image, batch_size, workers

    def run(self, tasks: Sequence[dict]) -> BulkReport:
        recorder, stop = self.recorder, self.recorder.stop
        started = time.perf_counter()
        predicted = 0
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="bulk-images")
        pending: deque[tuple[dict, Future]] = deque()
        upcoming = iter(tasks)
        ahead = 2 * self.batch_size + self.workers  # bounded: a few batches of images in memory

        def fill() -> None:
            while len(pending) < ahead:
                task = next(upcoming, None)
                if task is None:
                    return
                pending.append((task, pool.submit(self.load_image, task)))

        try:
            fill()
            while pending and not stop.is_set():
                batch = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
                fill()  # the next images load while the model works on this batch
                items = []
                for task, future in batch:
                    try:
                        items.append((task, future.result()))
                    except Exception as e:
                        recorder.failed(task, _reason(e))
                results = segment_batch(self.backend, self.config, self.version, items)
                predicted += len(items)
                writes = []
                for (task, _), (prediction, reason) in zip(items, results):
                    if prediction is None:
                        recorder.failed(task, reason)
                    else:
                        writes.append((task, prediction))
                recorder.write(writes)
            unfinished = bool(pending)
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            recorder.finish()
        finish_report(recorder.report, predicted, time.perf_counter() - started, unfinished)
        return recorder.report


# --- folder mode ------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class FolderImages:
    """Images from local folders, for runs without Label Studio: task images by their URL in the task data,
    reference images (URLs of an export: /data/upload/..., /data/local-files/?d=...) by file name."""

    settings: Settings
    task_files: dict[str, str]  # task data URL -> file path
    reference_dirs: tuple[str, ...]

    def load(self, url: str, task_id: int | None = None) -> np.ndarray:
        return ImageLoader(self.settings).decode(self.fetch(url, task_id), url)

    def fetch(self, url: str, task_id: int | None = None) -> bytes:
        from dinov.data.labelstudio_export import find_image

        path = self.task_files.get(url)
        if path is None:
            errors = []
            for folder in self.reference_dirs:
                try:
                    path = str(find_image(url, folder))
                    break
                except FileNotFoundError as e:
                    errors.append(str(e))
            if path is None:
                raise FileNotFoundError("; ".join(errors) or f"image {url!r} not found")
        size = os.path.getsize(path)
        if size > self.settings.max_image_bytes:
            raise ValueError(f"{path}: {size} bytes, above MAX_IMAGE_BYTES={self.settings.max_image_bytes}")
        with open(path, "rb") as f:
            return f.read()


def load_export(path: Path) -> list[dict]:
    try:
        tasks = json.loads(Path(path).read_text())
    except OSError as e:
        raise BulkError(f"--references {path}: cannot read it ({e})") from None
    except ValueError as e:
        raise BulkError(f"--references {path} is not JSON ({e}); give a Label Studio JSON export") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise BulkError(f"--references {path} is not a Label Studio JSON export (a list of tasks)")
    if not any(t.get("annotations") for t in tasks):
        raise BulkError(f"--references {path} has no annotations; export a project with annotated tasks")
    return tasks


_TAGS = {"brushlabels": "BrushLabels", "polygonlabels": "PolygonLabels", "rectanglelabels": "RectangleLabels",
         "keypointlabels": "KeyPointLabels", "ellipselabels": "EllipseLabels"}


def label_config_from_export(tasks: list[dict]) -> str:
    """A labeling config with the controls, labels and image key the export's regions use."""
    controls: dict[tuple[str, str, str], dict[str, None]] = {}
    to_names: dict[str, None] = {}
    for task in tasks:
        for annotation in task.get("annotations") or []:
            for item in annotation.get("result") or []:
                kind = str(item.get("type", "")).lower()
                if kind not in _TAGS:
                    continue
                key = (kind, str(item.get("from_name", "label")), str(item.get("to_name", "image")))
                labels = controls.setdefault(key, {})
                labels.update(dict.fromkeys(str(v) for v in (item.get("value") or {}).get(kind) or []))
                to_names[key[2]] = None
    if not controls:
        raise BulkError("the export's annotations have no labeled brush, polygon, rectangle, keypoint or ellipse "
                        "regions; pass --label-config with the project's labeling config")
    image = next(iter(to_names))
    data = next((t.get("data") for t in tasks if isinstance(t.get("data"), dict)), {}) or {}
    value = image if image in data else next((k for k, v in data.items() if isinstance(v, str)), "image")
    if not any(kind in ("brushlabels", "polygonlabels", "rectanglelabels") for kind, _, _ in controls):
        labels = dict.fromkeys(label for found in controls.values() for label in found)
        controls[("brushlabels", "dinov_masks", image)] = labels  # somewhere for the predictions to go
    lines = [f'<View>\n  <Image name="{_xml(image)}" value="${_xml(value)}"/>']
    for (kind, name, to_name), labels in controls.items():
        if to_name != image:
            continue
        inner = "".join(f'<Label value="{_xml(label)}"/>' for label in labels)
        lines.append(f'  <{_TAGS[kind]} name="{_xml(name)}" toName="{_xml(to_name)}">{inner}</{_TAGS[kind]}>')
    return "\n".join(lines + ["</View>"])


def _xml(text: str) -> str:
    return str(text).replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def fill_store_from_export(store: Any, tasks: list[dict], image_key: str, project_id: int = OFFLINE_PROJECT_ID) -> None:
    """The export's non-cancelled annotations become the store's examples (and only they)."""
    present = set()
    for task in tasks:
        for annotation in task.get("annotations") or []:
            if not isinstance(annotation, dict) or annotation.get("was_cancelled") or "id" not in annotation:
                continue
            store.upsert_annotation(project_id, task, annotation, image_key=image_key)
            present.add(int(annotation["id"]))
    gone = [a for a in store.annotation_versions(project_id) if a not in present]
    if gone:
        store.delete_annotations(project_id, gone)


def folder_tasks(images_dir: Path, image_key: str, url_prefix: str, export: list[dict],
                 reference_dirs: Sequence[str]) -> tuple[list[dict], dict[str, str]]:
    """One task per image under images_dir (sorted): data[image_key] = url_prefix + relative path. An image
    that an export task shows keeps that task's id, so it is never predicted from its own annotation."""
    from dinov.data.labelstudio_export import find_image

    if not images_dir.is_dir():
        raise BulkError(f"--images {images_dir} is not a folder")
    exported: dict[str, dict] = {}
    for task in export:
        reference = (task.get("data") or {}).get(image_key)
        if not isinstance(reference, str):
            continue
        for folder in reference_dirs:
            try:
                exported[str(find_image(reference, folder).resolve())] = task
                break
            except FileNotFoundError:
                continue
    tasks, files = [], {}
    for path in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        relative = path.relative_to(images_dir).as_posix()
        url = url_prefix + relative
        source = exported.get(str(path.resolve()))
        labeled = bool(source and any(not a.get("was_cancelled") for a in source.get("annotations") or []))
        tasks.append({"id": _int_or_none(source.get("id")) if source else None, "key": url,
                      "data": {image_key: url}, "labeled": labeled, "versions": []})
        files[url] = str(path)
    if not tasks:
        raise BulkError(f"--images {images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return tasks, files


# --- a job ------------------------------------------------------------------------------------------------

@dataclass
class BulkOptions:
    project: int | None = None
    images: Path | None = None
    references: Path | None = None
    reference_images: tuple[str, ...] = ()
    url_prefix: str = ""
    label_config: str | None = None
    extra_params: Any = None
    only_unlabeled: bool = False
    task_ids: list[tuple[int, int]] | None = None
    refresh_references: bool = False
    batch_size: int = 8
    workers: int = 4
    page_size: int = 100
    out: Path | None = None
    report: Path | None = None
    progress: bool = True
    ray: str | None = None  # None: local; "": a local Ray instance (or RAY_ADDRESS); else the cluster address
    replicas: int | None = None
    cpus_per_replica: float = 1.0


def run_bulk(options: BulkOptions, settings: Settings | None = None,
             model_factory: Callable[[Settings], Predictor] | None = None,
             stop: threading.Event | None = None, client: LabelStudioClient | None = None) -> BulkReport:
    """Run one bulk job (the command line's work); returns its report, also written to the report file."""
    settings = settings or Settings.from_env()
    settings = replace(settings, feature_cache_size=1)  # each encoded image is used once
    stop = stop or threading.Event()
    report = BulkReport(started_at=_now())
    if (options.project is None) == (options.images is None):
        raise BulkError("give --project <id> (a Label Studio project) or --images <folder> with --references "
                        "<export.json> (no Label Studio)")
    if options.images is not None and (options.references is None or options.out is None):
        raise BulkError("--images needs --references <Label Studio JSON export> and --out <file.json>")

    from labelstudio_backend.store import ReferenceStore

    if options.project is not None:
        if client is None:
            client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key,
                                       timeout=settings.fetch_timeout)
        project = client.project(options.project)
        if project is None:
            raise BulkError(f"project {options.project} does not exist in Label Studio at {client.base_url}")
        label_config = options.label_config or project.get("label_config")
        store = ReferenceStore(settings.db_path)
        images: Any = ImageLoader(settings)
        job = f"project-{options.project}"
        project_id = int(options.project)
        report.mode, report.project = "label_studio", project_id
    else:
        export = load_export(options.references)
        label_config = options.label_config or label_config_from_export(export)
        job = "images-" + hashlib.sha1(f"{options.images.resolve()}|{options.references.resolve()}".encode()
                                       ).hexdigest()[:10]
        store = ReferenceStore(settings.model_dir / "bulk" / f"{job}.references.sqlite3")
        project_id = OFFLINE_PROJECT_ID
        report.mode = "folder"
    config = parse_label_config(label_config)
    report.job = job

    if options.images is not None:
        reference_dirs = tuple(options.reference_images) or (str(options.images), str(options.references.parent))
        tasks, files = folder_tasks(options.images, config.value_key, options.url_prefix, export, reference_dirs)
        images = FolderImages(settings, files, reference_dirs)
        fill_store_from_export(store, export, config.value_key, project_id)

    runtime = Runtime(settings, model_factory=model_factory, store=store, images=images)
    try:
        backend = DINOvBackend(project_id, label_config, runtime=runtime)
        if options.extra_params:
            backend.settings = backend.settings.with_overrides(options.extra_params)
        runtime.predictor  # load the model first: its failure is the error to report
        job_path = settings.model_dir / "bulk" / f"{job}.json"
        pinned = None if options.refresh_references else PinnedReferences.load(job_path)
        if pinned is not None and pinned.model_version != version_at_revision(backend, pinned.revision):
            logger.info("the checkpoint or the settings changed since the job was pinned (%s); pinning again",
                        pinned.model_version)
            pinned = None
        if pinned is None:
            if options.project is not None:
                from labelstudio_backend.sync import sync_project

                sync_project(store, client.base_url, client.api_key, project_id, client=client)
            pinned = pin_references(backend, config.output_labels)
            if not pinned.examples:
                where = f"project {project_id}" if options.project is not None else str(options.references)
                raise BulkError(f"{where} has no usable labeled regions for the labels "
                                f"{', '.join(config.output_labels)}; annotate a few images first")
            pinned.save(job_path)
            logger.info("pinned %d examples of %s at reference revision %d: model_version %s", pinned.examples,
                        ", ".join(sorted(set(pinned.labels))), pinned.revision, pinned.model_version)
        else:
            logger.info("continuing with the references pinned at %s (revision %d, model_version %s); "
                        "--refresh-references takes the newest", pinned.pinned_at, pinned.revision,
                        pinned.model_version)
        report.model_version, report.revision = pinned.model_version, pinned.revision
        pinned_backend = PinnedBackend(project_id, label_config, runtime, pinned, settings=backend.settings)

        if options.project is not None:
            tasks = list_project_tasks(client, project_id, options.page_size, expected=project.get("task_number"))
            sink: Sink = (JsonSink(options.out, project_mode=True) if options.out
                          else LabelStudioSink(client, project_id))
        else:
            sink = JsonSink(options.out, project_mode=False, image_key=config.value_key)
        report.out = str(options.out) if options.out else None
        report.tasks_listed = len(tasks)
        selected, skipped = select_tasks(tasks, pinned.model_version, options.only_unlabeled, options.task_ids,
                                         sink.done_keys(pinned.model_version))
        report.selected, report.skipped = len(selected), dict(skipped)
        logger.info("%d of %d tasks to predict (%s)", len(selected), len(tasks),
                    ", ".join(f"{n} {why}" for why, n in skipped.items()) or "none skipped")
        try:
            if options.ray is not None:
                from labelstudio_backend.bulk_ray import run_on_ray

                run_on_ray(options, settings=backend.settings, label_config=label_config, project_id=project_id,
                           pinned=pinned, tasks=selected, images=images, sink=sink, report=report, stop=stop,
                           model_factory=model_factory)
            else:
                with _progress_bar(len(selected), options.progress) as bar:
                    recorder = Recorder(sink, report, stop, progress=bar)
                    Pipeline(pinned_backend, config, pinned.model_version, recorder, _image_loader(runtime, config),
                             options.batch_size, options.workers).run(selected)
        finally:
            sink.close()
    finally:
        runtime.shutdown()
    report.finished_at = _now()
    path = options.report or settings.model_dir / "bulk" / f"{job}.report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.as_dict(), indent=2))
    logger.info("report written to %s", path)
    return report


def _image_loader(runtime: Runtime, config: ParsedConfig) -> Callable[[dict], np.ndarray]:
    def load(task: dict) -> np.ndarray:
        return runtime.images.load(config.image_url(task), _int_or_none(task.get("id")))
    return load


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="predicting", dynamic_ncols=True, smoothing=0.05)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- the background mode of /predict ----------------------------------------------------------------------

class BackgroundPredictions:
    """Finishes, in one daemon thread per process, the tasks that /predict deferred, and posts their predictions
    through the Label Studio API.

    Tasks queued, running or posted in the last BACKGROUND_CLAIM_TTL_S are "claimed": a /predict call answers []
    for them (stored as nothing), so a second "Retrieve predictions" while this runs never predicts a task
    twice. Before posting, the sink asks Label Studio whether the task got a prediction of the version
    meanwhile (another worker, a bulk job).
    """

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        settings = runtime.settings
        session = getattr(runtime.images, "session", None)
        self.client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key,
                                        timeout=settings.fetch_timeout, session=session)
        self.lock = threading.Lock()
        self.queued: dict[tuple[int, str], set[int]] = defaultdict(set)
        self.posted: dict[tuple[int, str], dict[int, float]] = defaultdict(dict)
        self.jobs: "deque[tuple[int, str | None, list[dict], str]]" = deque()
        self.wakeup = threading.Condition(self.lock)
        self.idle = threading.Event()
        self.idle.set()
        self.thread = threading.Thread(target=self._loop, name="dinov-deferred", daemon=True)
        self.thread.start()

    def claimed(self, project_id: int, model_version: str) -> frozenset[int]:
        key = (project_id, model_version)
        with self.lock:
            now = time.monotonic()
            posted = self.posted.get(key, {})
            for task_id in [t for t, at in posted.items() if now - at > BACKGROUND_CLAIM_TTL_S]:
                del posted[task_id]
            return frozenset(self.queued.get(key, ())) | frozenset(posted)

    def submit(self, project_id: int, label_config: str | None, tasks: list[dict], model_version: str) -> int:
        key = (project_id, model_version)
        with self.lock:
            taken = self.queued[key] | set(self.posted[key])
            new = [t for t in tasks if _int_or_none(t.get("id")) is not None and int(t["id"]) not in taken]
            if new:
                self.queued[key].update(int(t["id"]) for t in new)
                self.jobs.append((project_id, label_config, new, model_version))
                self.idle.clear()
                self.wakeup.notify()
        return len(new)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued task is done (for tests and shutdown)."""
        return self.idle.wait(timeout)

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.jobs:
                    self.idle.set()
                    self.wakeup.wait()
                job = self.jobs.popleft()
            try:
                self._run(*job)
            except Exception:
                logger.exception("background predictions of project %s failed", job[0])
            finally:
                with self.lock:  # whatever was not posted can be asked for again
                    self.queued[(job[0], job[3])].difference_update(int(t["id"]) for t in job[2])

    def _run(self, project_id: int, label_config: str | None, tasks: list[dict], model_version: str) -> None:
        backend = DINOvBackend(project_id, label_config, runtime=self.runtime)
        config = backend.parsed_label_config
        key = (project_id, model_version)

        def on_task(task: dict, status: str, reason: str) -> None:
            if status in (DONE, EXISTS):
                with self.lock:
                    self.posted[key][int(task["id"])] = time.monotonic()

        # On a CPU a batch holds the model for a long time; interactive calls should not wait for it.
        on_gpu = "cuda" in str(getattr(self.runtime.predictor, "device", "cpu"))
        report = BulkReport(job=f"background-{project_id}", project=project_id, model_version=model_version,
                            selected=len(tasks), started_at=_now())
        recorder = Recorder(LabelStudioSink(self.client, project_id), report, threading.Event(), on_task=on_task)
        Pipeline(backend, config, model_version, recorder, _image_loader(self.runtime, config),
                 batch_size=4 if on_gpu else 1, workers=2).run(tasks)
        logger.info("project %s: background predictions of %d deferred tasks: %d posted, %d failed in %.1f s",
                    project_id, len(tasks), report.done, len(report.failed), report.seconds)


_BACKGROUND: "weakref.WeakKeyDictionary[Runtime, BackgroundPredictions]" = weakref.WeakKeyDictionary()
_BACKGROUND_LOCK = threading.Lock()


def background_for(runtime: Runtime, create: bool = True) -> BackgroundPredictions | None:
    with _BACKGROUND_LOCK:
        worker = _BACKGROUND.get(runtime)
        if worker is None and create:
            worker = _BACKGROUND[runtime] = BackgroundPredictions(runtime)
        return worker


def background_claims(runtime: Runtime, project_id: int | None, model_version: str) -> frozenset[int]:
    """Task ids a background run of this process predicts (or just posted) for this project and version."""
    worker = background_for(runtime, create=False)
    if worker is None or project_id is None:
        return frozenset()
    return worker.claimed(project_id, model_version)


def defer_to_background(backend: DINOvBackend, tasks: list[dict], model_version: str) -> list[list]:
    """DINOvBackend.defer_tasks: [] for each task (Label Studio stores nothing for it), the tasks themselves
    predicted in the background and posted through the API. Without LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY
    they are only left for the next run."""
    settings = backend.runtime.settings
    if backend.project_id is None or not (settings.label_studio_url and settings.label_studio_api_key):
        logger.warning("%d tasks left without prediction: predicting them in the background needs "
                       "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY; the next \"Retrieve predictions\" asks again",
                       len(tasks))
        return [[] for _ in tasks]
    queued = background_for(backend.runtime).submit(backend.project_id, backend.label_config, tasks, model_version)
    logger.info("project %s: %d tasks queued for background prediction (%d already were)", backend.project_id,
                queued, len(tasks) - queued)
    return [[] for _ in tasks]


# --- command line -----------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m labelstudio_backend.bulk",
        description="Pre-annotate a whole Label Studio project (or a folder of images) with DINOv, from the "
                    "project's own annotations. LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, MODEL_DIR, "
                    "DINOV_CHECKPOINT, DEVICE and the prediction settings come from the environment, as for "
                    "the server.")
    source = parser.add_argument_group("what to predict")
    source.add_argument("--project", type=int, help="Label Studio project id")
    source.add_argument("--images", type=Path, help="a folder of images to predict without Label Studio")
    source.add_argument("--references", type=Path,
                        help="with --images: a Label Studio JSON export whose annotations are the examples")
    source.add_argument("--reference-images", action="append", default=[],
                        help="folder holding the export's images (default: --images and the export's folder); "
                             "repeatable")
    source.add_argument("--url-prefix", default="",
                        help="with --images: prefix of the image paths written to the output tasks, e.g. "
                             "'/data/local-files/?d=photos/'")
    source.add_argument("--label-config", type=Path,
                        help="labeling config XML file (default: the project's; with --images: derived from "
                             "the export)")
    source.add_argument("--extra-params", help="per-project settings as JSON, e.g. '{\"score_threshold\": 0.5}' "
                                               "(default: what the server's /setup saved in MODEL_DIR)")
    select = parser.add_argument_group("which tasks")
    select.add_argument("--only-unlabeled", action="store_true", help="skip tasks that have an annotation")
    select.add_argument("--task-ids", help="task ids or ranges, e.g. 100-2000,2500 (inclusive)")
    select.add_argument("--refresh-references", action="store_true",
                        help="pin the newest references instead of those the job started with")
    run = parser.add_argument_group("how")
    run.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    run.add_argument("--workers", type=int, default=4, help="threads fetching images ahead (default 4)")
    run.add_argument("--page-size", type=int, default=100, help="tasks per Label Studio API page (default 100)")
    run.add_argument("--out", type=Path, help="write predictions to this JSON file instead of posting them")
    run.add_argument("--report", type=Path,
                     help="report file (default: MODEL_DIR/bulk/<job>.report.json)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = parser.add_argument_group("Ray")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run on Ray: no address starts a local instance (or joins RAY_ADDRESS); 'auto' joins "
                          "the cluster this machine belongs to; ray://host:10001 connects a Ray client")
    ray.add_argument("--replicas", type=int,
                     help="model replicas (default: one per GPU of the cluster; 1 without GPUs)")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs reserved per model replica")
    return parser


def options_from_args(args: argparse.Namespace) -> BulkOptions:
    extra = None
    if args.extra_params:
        try:
            extra = json.loads(args.extra_params)
        except ValueError as e:
            raise BulkError(f"--extra-params is not JSON ({e}); e.g. '{{\"score_threshold\": 0.5}}'") from None
    config = None
    if args.label_config:
        try:
            config = args.label_config.read_text()
        except OSError as e:
            raise BulkError(f"--label-config {args.label_config}: {e}") from None
    return BulkOptions(
        project=args.project, images=args.images, references=args.references,
        reference_images=tuple(args.reference_images), url_prefix=args.url_prefix, label_config=config,
        extra_params=extra, only_unlabeled=args.only_unlabeled,
        task_ids=parse_task_ids(args.task_ids) if args.task_ids else None,
        refresh_references=args.refresh_references, batch_size=args.batch_size, workers=args.workers,
        page_size=args.page_size, out=args.out, report=args.report, progress=not args.no_progress, ray=args.ray,
        replicas=args.replicas, cpus_per_replica=args.cpus_per_replica)


class _StopOnSigint:
    """First Ctrl-C: finish the current batch, write, report. Second: stop at once."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        logger.warning("Ctrl-C: stopping after the current batch (Ctrl-C again to stop at once)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def main(argv: list[str] | None = None, model_factory: Callable[[Settings], Predictor] | None = None) -> int:
    """Exit status: 0 all selected tasks done, 1 some failed, 2 bad input, 130 stopped by Ctrl-C."""
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        print(f"error: invalid setting: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    try:
        options = options_from_args(args)
        from tqdm.contrib.logging import logging_redirect_tqdm

        with _StopOnSigint(stop), logging_redirect_tqdm():
            report = run_bulk(options, settings, model_factory=model_factory, stop=stop)
    except (BulkError, SettingsError, LabelStudioError, ModelUnavailable, ValueError) as e:
        logger.error("%s", e)
        return 2
    except KeyboardInterrupt:
        logger.error("stopped at once; predictions written so far are kept, run the command again to continue")
        return 130
    print(report.summary())
    if report.interrupted:
        return 130
    return 1 if report.failed or report.stopped_because else 0


if __name__ == "__main__":
    from labelstudio_backend.bulk import main as _main  # the module under its own name, not __main__

    sys.exit(_main())
