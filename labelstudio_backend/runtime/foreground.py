"""What keeps background model work behind the annotators' requests: the requests in flight, and encodings of one
image shared between whoever asks for it at the same time.

    with runtime.foreground.request():       # around a /predict (serving/backend.py)
        ...
    runtime.foreground.wait_quiet(0.5)       # background work: True once no request is in flight

    shared = SharedWork()
    shared.run(key, compute)                 # a second caller of the same key waits for the first one's result

The encode-ahead (serving/encode_ahead.py) waits for a quiet moment before each image it encodes, and an annotator
who opens a task while that task's image is being encoded ahead gets that encoding instead of starting another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any


class Foreground:
    """Counts the requests being answered, so that background work can wait for none."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    @contextmanager
    def request(self) -> Iterator[None]:
        with self._cond:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._cond.notify_all()

    def wait_quiet(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until no request is in flight; whether none is."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout)


class SharedWork:
    """Work by key that concurrent callers share: the first computes, the others wait for its result (or its
    exception). Nothing is kept afterwards (the caller caches results)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, Future] = {}

    def run(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            future = self._running.get(key)
            owner = future is None
            if future is None:
                future = self._running[key] = Future()
        if not owner:
            return future.result()
        try:
            result = compute()
        except BaseException as error:
            future.set_exception(error)
            raise
        else:
            future.set_result(result)
            return result
        finally:
            with self._lock:
                self._running.pop(key, None)
