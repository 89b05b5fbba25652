"""The bulk pipeline: fetch images ahead, encode a batch in one model call, segment each task with the backend's
own pre-annotation, and write each batch's predictions while the model works on the next one.

    Pipeline(backend, config, model_version, Recorder(sink, report, stop), load_image).run(tasks)

A task whose image or prediction fails is reported and gets no prediction (a rerun tries it again); the others
go on. Setting `stop` (Ctrl-C) stops after the current batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from labelstudio_backend.errors import BulkError, LabelStudioError, ModelUnavailable
from labelstudio_backend.labelstudio.label_config import ParsedConfig
from labelstudio_backend.labelstudio.payload import task_id_of, task_key
from labelstudio_backend.runtime.runtime import Runtime, ServedModel
from labelstudio_backend.serving.backend import DINOvBackend
from labelstudio_backend.serving.sinks import DONE, EXISTS, FAILED, Outcome, Sink

logger = logging.getLogger(__name__)

MAX_WRITE_FAILURES = 3          # consecutive failed writes (Label Studio down) before a job stops


@dataclass(frozen=True)
class TaskResult:
    """One task's prediction, or None and the reason there is none."""

    prediction: dict | None
    reason: str = ""


def encode_batch(model: ServedModel, images: Sequence[np.ndarray]) -> list[Any]:
    """Encoded images in one model call when the predictor can batch; one image failing does not fail the
    others (they are encoded one by one then). A failed image's entry is its exception."""
    predictor = model.load_model()
    batched = getattr(predictor, "encode_images", None)
    if batched is not None and len(images) > 1:
        try:
            return list(batched(list(images), batch_size=len(images)))
        except ModelUnavailable:
            raise
        except Exception as e:
            logger.info("encoding a batch of %d failed (%s); encoding its images one by one", len(images), e)
    encoded: list[Any] = []
    for image in images:
        try:
            encoded.append(predictor.encode_image(image))
        except ModelUnavailable:
            raise
        except Exception as e:
            encoded.append(e)
    return encoded


def segment_batch(backend: DINOvBackend, config: ParsedConfig, model_version: str,
                  items: Sequence[tuple[dict, np.ndarray]]) -> list[TaskResult]:
    """A TaskResult per (task, RGB image [H, W, 3] uint8): encoded as a batch, segmented one by one."""
    model = backend.model
    encoded = encode_batch(model, [image for _, image in items]) if items else []
    labels = config.output_labels
    results: list[TaskResult] = []
    for (task, _), enc in zip(items, encoded):
        if isinstance(enc, Exception):
            results.append(TaskResult(None, failure_reason(enc)))
            continue
        try:
            model.remember_encoded(config.image_url(task), enc)  # preannotate finds it there
            results.append(TaskResult(backend.preannotate(task, config, labels, model_version)))
        except ModelUnavailable:
            raise
        except Exception as e:  # this task only
            logger.debug("task %s failed", task.get("id"), exc_info=True)
            results.append(TaskResult(None, failure_reason(e)))
    return results


def failure_reason(error: BaseException) -> str:
    """The reason a task failed, as the report shows it (a ValueError's message says it all)."""
    text = str(error).strip() or "no message"
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


@dataclass
class BulkReport:
    """What a job did; printed as a summary and written as JSON."""

    job: str = ""
    mode: str = "label_studio"
    project: int | None = None
    model_version: str = ""
    model: str = "base"  # or "project": the project's fine-tuned model
    checkpoint: str = ""  # the checkpoint id of the model that predicted
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
                 f"model_version {self.model_version} ({self.model} model {self.checkpoint}); {self.seconds:.1f} s, "
                 f"{self.images_per_second:.2f} images/s"]
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
                 on_task: Callable[[dict, Outcome], None] | None = None):
        self.sink, self.report, self.stop, self.progress = sink, report, stop, progress
        self.on_task = on_task or (lambda task, outcome: None)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulk-writer")
        self._write: Future | None = None
        self._write_failures = 0
        self._lock = threading.Lock()  # the writer thread counts too

    def failed(self, task: dict, reason: str) -> None:
        self._count(task, Outcome(FAILED, reason))

    def write(self, writes: list[tuple[dict, dict]]) -> None:
        self._wait()
        if self.report.stopped_because:  # writing stopped working: keep these for the next run
            for task, _ in writes:
                self._count(task, Outcome(FAILED, f"not written: {self.report.stopped_because}"))
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
            outcomes = [Outcome(FAILED, f"writing the prediction failed: {e}")] * len(writes)
            logger.error("writing %d predictions failed: %s", len(writes), e)
            if self._write_failures >= MAX_WRITE_FAILURES:
                self.report.stopped_because = f"{MAX_WRITE_FAILURES} writes in a row failed; last: {e}"
                self.stop.set()
        for (task, prediction), outcome in zip(writes, outcomes):
            self._count(task, outcome, prediction)

    def _count(self, task: dict, outcome: Outcome, prediction: dict | None = None) -> None:
        status, reason = outcome.status, outcome.reason
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
        self.on_task(task, outcome)


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
                        recorder.failed(task, failure_reason(e))
                results = segment_batch(self.backend, self.config, self.version, items)
                predicted += len(items)
                writes = []
                for (task, _), result in zip(items, results):
                    if result.prediction is None:
                        recorder.failed(task, result.reason)
                    else:
                        writes.append((task, result.prediction))
                recorder.write(writes)
            unfinished = bool(pending)
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            recorder.finish()
        finish_report(recorder.report, predicted, time.perf_counter() - started, unfinished)
        return recorder.report


def image_loader(runtime: Runtime, config: ParsedConfig) -> Callable[[dict], np.ndarray]:
    """load(task) -> the task's RGB image, through the runtime's image source."""
    def load(task: dict) -> np.ndarray:
        return runtime.images.load(config.image_url(task), task_id_of(task.get("id")))
    return load


class _NoBar:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar over `total` images (a context manager giving None when disabled)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="predicting", dynamic_ncols=True, smoothing=0.05)
