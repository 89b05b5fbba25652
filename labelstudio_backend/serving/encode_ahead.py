"""Encode ahead: when an annotator opens a task, the tasks Label Studio will give them next are encoded and
pre-annotated in the background, so that opening one of them costs a cache hit instead of an encoding.

    runtime.ahead = EncodeAhead(runtime)                  # what create_app wires (ENCODE_AHEAD_TASKS > 0)
    ahead.task_opened(project_id, label_config, task)     # DINOvBackend.predict: one task, no context
    ahead.wait(timeout)                                   # tests: until nothing is being prepared

- Which tasks: Label Studio 1.23.2 opens a task and asks /predict for it (one task, no context). With the
  project's sampling "Sequential sampling", the labeling stream's next task is the first one, in the data
  manager's order (task id), that is not labeled and that the annotator has not annotated or skipped; the
  client's `next_tasks` asks for the first ENCODE_AHEAD_TASKS tasks after the opened one that nobody annotated
  or skipped. Other samplings (uniform, uncertainty) pick at random or by score: nothing is prepared for them
  (logged once per project at INFO). The project's sampling is read from its API and kept SAMPLING_TTL_S.
- At low priority: one worker (the "ahead" queue) prepares one image at a time, each after waiting until no
  request has been in flight for SETTLE_S (runtime.foreground: the click that follows an open comes first), so
  an annotator's request waits at most for the image already started; one opened while its own image is being
  encoded ahead shares that encoding (Runtime.encode_with).
- Bounded by the feature cache: at most FEATURE_CACHE_SIZE - 1 tasks ahead, so the opened task's features stay
  cached; predictions made ahead sit in runtime.predicted_ahead (as many as the feature cache holds) and are used
  only while nothing they depend on changed (DINOvBackend.ahead_key: a new annotation makes them stale, then the
  cached features still save the encoding).
- Cancelled: each open supersedes the project's earlier one; the worker checks before each task and stops
  preparing for an open that is no longer the latest (the newer open's job follows it in the queue).
- Failures (Label Studio down, a broken image, the model not loaded yet) are logged and never reach a request.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

from labelstudio_backend.errors import LabelStudioError, ModelUnavailable
from labelstudio_backend.fetching.labelstudio_client import SEQUENTIAL_SAMPLING, LabelStudioClient
from labelstudio_backend.labelstudio.payload import task_id_of
from labelstudio_backend.runtime.bounded import PROJECTS_MAX, BoundedSet, LRUCache
from labelstudio_backend.runtime.runtime import Runtime
from labelstudio_backend.serving.backend import DINOvBackend

logger = logging.getLogger(__name__)

SAMPLING_TTL_S = 300.0  # a project's sampling is read again from Label Studio after this long
QUIET_POLL_S = 0.5  # while requests are in flight, whether the open is still the latest is checked this often
SETTLE_S = 1.0  # background model work starts only once no request has been answered for this long


@dataclass(frozen=True)
class Opened:
    """The latest task opened in a project; `generation` tells two opens of the same task apart."""

    task_id: int
    label_config: str | None
    generation: int


class EncodeAhead:
    """The runtime's encode-ahead (see the module's docstring); `counts` adds up the outcomes, for tests and logs:
    kept (predicted), encoded (features only), had (prepared already), failed, superseded, not sequential."""

    def __init__(self, runtime: Runtime, client: LabelStudioClient | None = None):
        self.runtime = runtime
        self.client = client or getattr(runtime.images, "client", None) or LabelStudioClient.from_settings(
            runtime.settings)
        self._generations = itertools.count(1)
        self._latest: LRUCache[int, Opened] = LRUCache(PROJECTS_MAX)        # project -> its latest open
        self._sampling: LRUCache[int, str] = LRUCache(PROJECTS_MAX, ttl=SAMPLING_TTL_S)  # project -> sampling
        self._told: BoundedSet[tuple[int, str]] = BoundedSet(PROJECTS_MAX)  # (project, sampling) logged
        self.counts: Counter[str] = Counter()
        self.stop = threading.Event()

    @property
    def configured(self) -> bool:
        """Asking Label Studio for the next tasks needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY."""
        return bool(self.client.base_url and self.client.api_key)

    @property
    def tasks_ahead(self) -> int:
        """ENCODE_AHEAD_TASKS, at most what the feature cache holds besides the task just opened."""
        settings = self.runtime.settings
        return max(0, min(settings.encode_ahead_tasks, settings.feature_cache_size - 1))

    def task_opened(self, project_id: int, label_config: str | None, task: dict) -> None:
        """An annotator opened `task`: queue the preparation of the next tasks (superseding the project's
        earlier open). Returns at once; never raises for Label Studio or the queue."""
        task_id = task_id_of(task.get("id"))
        if task_id is None or self.tasks_ahead == 0 or not self.configured or self.stop.is_set():
            return
        self._latest.put(project_id, Opened(task_id, label_config, next(self._generations)))
        # one pending job per project: it prepares for whichever open is the latest when it starts
        self.runtime.try_submit("ahead", ("ahead", project_id), self.run, project_id)

    def close(self) -> None:
        """Stop before the next task (the process is stopping)."""
        self.stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or being prepared (tests)."""
        return self.runtime.queues["ahead"].wait_idle(timeout)

    # --- the worker

    def run(self, project_id: int) -> Counter[str]:
        """Prepare the tasks after the project's latest open, one at a time, until done or superseded."""
        outcomes: Counter[str] = Counter()
        opened = self._latest.get(project_id)
        if opened is None or not self._current(project_id, opened):
            return outcomes
        try:
            if not self._sequential(project_id):
                outcomes["not sequential"] += 1
                return self._add(outcomes)
            tasks = self.client.next_tasks(project_id, opened.task_id, self.tasks_ahead)
        except LabelStudioError as error:
            logger.warning("project %s: nothing encoded ahead of task %s: %s", project_id, opened.task_id, error)
            outcomes["failed"] += 1
            return self._add(outcomes)
        started = time.perf_counter()
        for position, task in enumerate(tasks):
            if not self._wait_turn(project_id, opened):
                outcomes["superseded"] += len(tasks) - position
                break
            try:
                backend = DINOvBackend(project_id, opened.label_config, runtime=self.runtime)
                outcomes[backend.prepare_ahead(task, backend.parsed_label_config)] += 1
            except ModelUnavailable as error:  # not loaded yet: the opens to come find it loaded
                logger.info("project %s: nothing encoded ahead, the model is not loaded: %s", project_id, error)
                outcomes["failed"] += len(tasks) - position
                break
            except Exception as error:  # a broken image, a config without the image: this task only
                expected = isinstance(error, (ValueError, OSError, LabelStudioError))
                logger.warning("project %s task %s: not encoded ahead: %s", project_id, task.get("id"), error,
                               exc_info=not expected)
                outcomes["failed"] += 1
        logger.info("project %s: after task %s opened, %d next tasks in %.1f s: %s", project_id, opened.task_id,
                    len(tasks), time.perf_counter() - started, dict(outcomes) or "none left")
        return self._add(outcomes)

    def _add(self, outcomes: Counter[str]) -> Counter[str]:
        self.counts.update(outcomes)
        return outcomes

    def _current(self, project_id: int, opened: Opened) -> bool:
        return not self.stop.is_set() and self._latest.get(project_id) == opened

    def _wait_turn(self, project_id: int, opened: Opened) -> bool:
        """Wait until no request is in flight (nor was for SETTLE_S); False once the open is superseded (or the
        process stops)."""
        while self._current(project_id, opened):
            if self.runtime.foreground.wait_quiet(QUIET_POLL_S, settle_s=SETTLE_S):
                return self._current(project_id, opened)
        return False

    def _sequential(self, project_id: int) -> bool:
        """Whether the project's sampling is Sequential sampling (read from Label Studio, kept SAMPLING_TTL_S)."""
        sampling = self._sampling.get(project_id)
        if sampling is None:
            project = self.client.project(project_id)
            sampling = str(project.get("sampling") or "") if isinstance(project, dict) else ""
            self._sampling.put(project_id, sampling)
        if sampling == SEQUENTIAL_SAMPLING:
            return True
        if (project_id, sampling) not in self._told:
            self._told.add((project_id, sampling))
            logger.info("project %s: sampling is %r, not %r: the next task is not known ahead, so nothing is "
                        "encoded ahead", project_id, sampling or "unknown", SEQUENTIAL_SAMPLING)
        return False
