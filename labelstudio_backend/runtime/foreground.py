"""What keeps background model work behind the annotators' requests: the requests in flight, and encodings of one
image shared between whoever asks for it at the same time.

    with runtime.foreground.request():       # around a /predict (serving/backend.py)
        ...
    runtime.foreground.wait_quiet(0.5, settle_s=1.0)   # background work: True once no request has been in
                                                       # flight for settle_s

    shared = SharedWork()
    shared.run(key, compute)                 # a second caller of the same key waits for the first one's result

The encode-ahead (serving/encode_ahead.py) waits for a quiet moment before each image it encodes, and an annotator
who opens a task while that task's image is being encoded ahead gets that encoding instead of starting another.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any


class Foreground:
    """Counts the requests being answered, so that background work can wait for none."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._in_flight = 0
        self._last_end = float("-inf")  # when the latest request ended

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
                self._last_end = self._clock()
                if self._in_flight == 0:
                    self._cond.notify_all()

    def wait_quiet(self, timeout: float, settle_s: float = 0.0) -> bool:
        """Wait up to `timeout` seconds until no request is in flight and none ended in the last `settle_s`
        seconds (an annotator who just opened a task tends to click next); whether that is so."""
        deadline = self._clock() + timeout
        with self._cond:
            while True:
                now = self._clock()
                settled_in = self._last_end + settle_s - now if self._in_flight == 0 else None
                if settled_in is not None and settled_in <= 0:
                    return True
                if now >= deadline:
                    return False
                self._cond.wait(deadline - now if settled_in is None else min(deadline - now, settled_in))


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
