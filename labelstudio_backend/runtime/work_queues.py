"""Named, bounded work queues: one per kind of background work.

Model loading, webhook processing, reference syncs, reference embedding, leave-one-out estimates and
background predictions each get a queue of their own, so that a slow Label Studio or an hour-long estimate
never stalls the processing of webhooks.

    queues = WorkQueues({"sync": QueueSpec(workers=1, max_pending=64), ...})
    future = queues["sync"].submit(("sync", 3), syncer, 3)   # the same key while pending: the same future
    queues.stats()                                           # for /health and /metrics
    queues.shutdown(timeout=5)

- A job is identified by a key: submitting a key that is still pending (queued, not yet started) returns the
  pending job's future instead of queueing the same work twice. A key that is running is queued again: the
  state it works on may have changed since it started (an annotation saved during a sync).
- At most `max_pending` jobs wait; one more raises QueueFull, which carries a Retry-After estimate (seconds)
  from the queue's recent job durations, so the HTTP layer can answer 503 with a Retry-After header.
- Worker threads start with the first job, in the process that submits it (never before gunicorn forks),
  and are daemons: a job stuck in a network call cannot keep a stopping worker process alive.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 300  # a caller told to wait longer than this would rather be told to come back later


class QueueFull(RuntimeError):
    """A work queue holds its maximum of pending jobs; try again after `retry_after` seconds."""

    def __init__(self, queue: str, pending: int, retry_after: int):
        super().__init__(f"the {queue} queue is full ({pending} jobs waiting); try again in {retry_after} s")
        self.queue = queue
        self.pending = pending
        self.retry_after = retry_after


class QueueClosed(RuntimeError):
    """The queue was shut down (the process is stopping); nothing new is accepted."""


@dataclass(frozen=True)
class QueueSpec:
    workers: int = 1
    max_pending: int = 100


@dataclass
class _Job:
    key: Hashable
    fn: Callable[..., Any]
    args: tuple
    future: Future
    queued_at: float
    started_at: float | None = None


class WorkQueue:
    """A FIFO of jobs run by `workers` threads, at most `max_pending` waiting, pending jobs de-duplicated by key."""

    def __init__(self, name: str, workers: int = 1, max_pending: int = 100,
                 clock: Callable[[], float] = time.monotonic):
        if workers < 1 or max_pending < 1:
            raise ValueError(f"queue {name}: workers and max_pending must be >= 1, got {workers}, {max_pending}")
        self.name = name
        self.workers = workers
        self.max_pending = max_pending
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: OrderedDict[Hashable, _Job] = OrderedDict()
        self._running: dict[int, _Job] = {}  # thread ident -> job
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._mean_seconds: float | None = None  # moving average of job durations, for Retry-After
        self._counts = {"submitted": 0, "deduplicated": 0, "rejected": 0, "done": 0, "failed": 0, "cancelled": 0}
        self._last_error: str | None = None

    def submit(self, key: Hashable | None, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue fn(*args) under `key` (None: never de-duplicated); the future gives its result.

        Raises QueueFull when max_pending jobs wait, QueueClosed after shutdown().
        """
        with self._cond:
            if self._closed:
                raise QueueClosed(f"the {self.name} queue is shut down")
            if key is not None and key in self._pending:
                self._counts["deduplicated"] += 1
                return self._pending[key].future
            if len(self._pending) >= self.max_pending:
                self._counts["rejected"] += 1
                raise QueueFull(self.name, len(self._pending), self._retry_after())
            job = _Job(key if key is not None else object(), fn, args, Future(), self._clock())
            self._pending[job.key] = job
            self._counts["submitted"] += 1
            self._start_workers()
            self._cond.notify()
            return job.future

    def pending_keys(self) -> list[Hashable]:
        with self._cond:
            return list(self._pending)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or running (tests, and draining before a shutdown)."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while self._pending or self._running:
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is None else min(remaining, 0.5))
        return True

    def stats(self) -> dict[str, Any]:
        """What /health and /metrics show of the queue."""
        now = self._clock()
        with self._cond:
            oldest = next(iter(self._pending.values()), None)
            longest = min((j.started_at for j in self._running.values() if j.started_at is not None), default=None)
            return {"workers": self.workers, "max_pending": self.max_pending, "pending": len(self._pending),
                    "running": len(self._running), **self._counts,
                    "oldest_pending_s": round(now - oldest.queued_at, 3) if oldest else 0.0,
                    "longest_running_s": round(now - longest, 3) if longest is not None else 0.0,
                    "mean_job_s": round(self._mean_seconds, 3) if self._mean_seconds is not None else None,
                    "last_error": self._last_error, "closed": self._closed}

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Accept nothing more, cancel what is pending, wait up to `timeout` for the running jobs."""
        with self._cond:
            self._closed = True
            cancelled = list(self._pending.values())
            self._pending.clear()
            self._counts["cancelled"] += len(cancelled)
            self._cond.notify_all()
        for job in cancelled:
            job.future.cancel()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread is threading.current_thread():
                continue
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # --- inside

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: the pending and running jobs at the recent mean duration."""
        mean = self._mean_seconds if self._mean_seconds is not None else 1.0
        ahead = (len(self._pending) + len(self._running)) / self.workers
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(mean * ahead))))

    def _start_workers(self) -> None:
        alive = [t for t in self._threads if t.is_alive()]
        for index in range(len(alive), self.workers):
            thread = threading.Thread(target=self._work, name=f"dinov-{self.name}-{index}", daemon=True)
            thread.start()
            alive.append(thread)
        self._threads = alive

    def _work(self) -> None:
        me = threading.get_ident()
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:  # closed and drained
                    return
                _, job = self._pending.popitem(last=False)
                job.started_at = self._clock()
                self._running[me] = job
            try:
                if job.future.set_running_or_notify_cancel():
                    self._run(job)
            finally:
                with self._cond:
                    del self._running[me]
                    self._cond.notify_all()

    def _run(self, job: _Job) -> None:
        started = self._clock()
        try:
            result = job.fn(*job.args)
        except BaseException as error:  # the future carries it; the log says which job failed
            logger.exception("%s queue: job %s failed", self.name, _describe(job.key))
            with self._cond:
                self._counts["failed"] += 1
                self._last_error = f"{_describe(job.key)}: {type(error).__name__}: {error}"[:500]
                self._record(self._clock() - started)
            job.future.set_exception(error)
            return
        with self._cond:
            self._counts["done"] += 1
            self._record(self._clock() - started)
        job.future.set_result(result)

    def _record(self, seconds: float) -> None:
        self._mean_seconds = seconds if self._mean_seconds is None else 0.8 * self._mean_seconds + 0.2 * seconds


class WorkQueues:
    """The process's queues by name: queues["sync"].submit(...)."""

    def __init__(self, specs: Mapping[str, QueueSpec], clock: Callable[[], float] = time.monotonic):
        self._queues = {name: WorkQueue(name, spec.workers, spec.max_pending, clock) for name, spec in specs.items()}

    def __getitem__(self, name: str) -> WorkQueue:
        try:
            return self._queues[name]
        except KeyError:
            raise KeyError(f"no work queue named {name!r}; the queues are {', '.join(self._queues)}") from None

    def __iter__(self) -> Iterator[WorkQueue]:
        return iter(self._queues.values())

    def stats(self) -> dict[str, dict[str, Any]]:
        return {name: queue.stats() for name, queue in self._queues.items()}

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every queue is idle at once (a job of one queue may submit to another)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for queue in self._queues.values():
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not queue.wait_idle(remaining):
                    return False
            if all(q.stats()["pending"] == 0 and q.stats()["running"] == 0 for q in self._queues.values()):
                return True

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Shut every queue down, sharing one deadline for the running jobs."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for queue in self._queues.values():
            queue.shutdown(None if deadline is None else max(0.0, deadline - time.monotonic()))


def _describe(key: Hashable) -> str:
    return "(no key)" if type(key) is object else repr(key)
