"""Model loading that recovers: a failed load is tried again with exponential back-off until it succeeds.

A checkpoint download cut off, a GPU busy with another process, a file system not yet mounted: the load
fails now and works a minute later. Until it works, status() says why, so /health can answer 503 with the
reason (an orchestrator restarts or routes around the process) and requests that need the model get a 503
that says what is wrong and when the next attempt is.

    loader = ModelLoader(lambda: DINOvPredictor.from_checkpoint(...), "loading DINOV_CHECKPOINT=swinT on cuda")
    queues["model"].submit("load", loader.run)   # attempts until loaded or closed
    model = loader.wait(timeout=30)              # the model, or None: loader.status().reason says why
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
LoadState = Literal["not started", "loading", "ready", "waiting to retry", "closed"]


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt n + 1 after n failures: initial * factor ** (n - 1), at most `maximum` seconds."""

    initial: float = 5.0
    factor: float = 2.0
    maximum: float = 300.0

    def delay(self, failures: int) -> float:
        return min(self.maximum, self.initial * self.factor ** max(0, failures - 1))


@dataclass(frozen=True)
class LoadStatus:
    state: LoadState
    attempts: int
    error: str | None = None          # the last failure's message
    retry_in_s: float | None = None   # seconds until the next attempt, while waiting to retry
    loaded_in_s: float | None = None  # how long the successful attempt took

    @property
    def usable(self) -> bool:
        return self.state == "ready"

    @property
    def reason(self) -> str | None:
        """Why the model cannot be used now (None once it can)."""
        if self.state == "ready":
            return None
        if self.state == "waiting to retry":
            return f"{self.error} (attempt {self.attempts}; next attempt in {self.retry_in_s:.0f} s)"
        if self.state == "loading" and self.error:
            return f"the model is loading (attempt {self.attempts}; the last one failed: {self.error})"
        if self.state == "loading":
            return "the model is loading"
        if self.state == "closed":
            return "the backend is shutting down"
        return "the model has not started loading"


class ModelLoader(Generic[T]):
    """Runs `load` until it returns, waiting `backoff.delay(n)` after the n-th failure; thread-safe."""

    def __init__(self, load: Callable[[], T], describe: str, backoff: Backoff = Backoff(),
                 clock: Callable[[], float] = time.monotonic):
        self._load = load
        self.describe = describe
        self.backoff = backoff
        self._clock = clock
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._model: T | None = None
        self._state: LoadState = "not started"
        self._attempts = 0
        self._error: str | None = None
        self._retry_at: float | None = None
        self._loaded_in: float | None = None

    @property
    def model(self) -> T | None:
        return self._model

    def run(self) -> T | None:
        """Attempt the load until it succeeds (the model) or the loader is closed (None)."""
        while True:
            with self._cond:
                if self._model is not None or self._closed.is_set():
                    return self._model
                self._state, self._retry_at = "loading", None
                self._attempts += 1
                attempt = self._attempts
                self._cond.notify_all()
            started = self._clock()
            try:
                model = self._load()
            except Exception as error:  # any failure is reported and retried, never raised as a trace
                delay = self.backoff.delay(attempt)
                message = f"{self.describe} failed: {error}"
                logger.error("%s; attempt %d, next attempt in %.0f s", message, attempt, delay,
                             exc_info=not isinstance(error, (ValueError, OSError)))
                with self._cond:
                    self._state, self._error, self._retry_at = "waiting to retry", message, self._clock() + delay
                    self._cond.notify_all()
                if self._closed.wait(delay):
                    return None
                continue
            with self._cond:
                self._model, self._state, self._loaded_in = model, "ready", self._clock() - started
                self._cond.notify_all()
            logger.info("%s: loaded in %.1f s (attempt %d)", self.describe, self._loaded_in, attempt)
            return model

    def wait(self, timeout: float | None) -> T | None:
        """The model once loaded; None at once while a failed load waits for its retry, or after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._model is None and self._state in ("not started", "loading") and not self._closed.is_set():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._model

    def status(self) -> LoadStatus:
        with self._cond:
            state: LoadState = "closed" if self._closed.is_set() and self._model is None else self._state
            retry_in = None if self._retry_at is None else max(0.0, self._retry_at - self._clock())
            return LoadStatus(state, self._attempts, self._error, retry_in, self._loaded_in)

    def close(self) -> None:
        """Stop retrying (the process is stopping); a load in progress finishes on its own."""
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
