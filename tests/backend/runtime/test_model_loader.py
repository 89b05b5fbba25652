"""Model loading with retries and back-off (labelstudio_backend/runtime/model_loader.py)."""

from __future__ import annotations

import threading
import time

from labelstudio_backend.runtime.model_loader import Backoff, ModelLoader


class Flaky:
    """Fails the first `failures` calls with an OSError, then returns a model."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(f"checkpoint not readable (call {self.calls})")
        return "the model"


def test_backoff_grows_to_its_maximum():
    backoff = Backoff(initial=5, factor=2, maximum=60)
    assert [backoff.delay(n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def test_a_failed_load_is_retried_until_it_works():
    load = Flaky(failures=2)
    loader = ModelLoader(load, "loading DINOV_CHECKPOINT=x", Backoff(initial=0.01, factor=2, maximum=0.05))
    assert loader.status().state == "not started" and not loader.status().usable
    assert loader.run() == "the model"
    status = loader.status()
    assert load.calls == 3 and status.attempts == 3 and status.usable and status.reason is None
    assert status.loaded_in_s is not None
    assert loader.run() == "the model" and load.calls == 3  # loaded: not loaded again
    assert loader.wait(0) == "the model"


def test_status_says_why_and_when_the_next_attempt_is():
    loader = ModelLoader(Flaky(failures=100), "loading DINOV_CHECKPOINT=/missing.pth on DEVICE=cpu",
                         Backoff(initial=30))
    thread = threading.Thread(target=loader.run)
    thread.start()
    deadline = time.monotonic() + 5
    while loader.status().state != "waiting to retry" and time.monotonic() < deadline:
        time.sleep(0.01)
    status = loader.status()
    assert status.state == "waiting to retry" and status.attempts == 1
    assert "loading DINOV_CHECKPOINT=/missing.pth on DEVICE=cpu failed: checkpoint not readable" in status.reason
    assert "next attempt in 30 s" in status.reason or "next attempt in 29 s" in status.reason
    began = time.monotonic()
    assert loader.wait(10) is None  # no waiting for a load that is backing off
    assert time.monotonic() - began < 1
    loader.close()  # ends the back-off wait at once
    thread.join(2)
    assert not thread.is_alive()
    assert loader.status().state == "closed" and "shutting down" in loader.status().reason


def test_wait_returns_the_model_once_another_thread_loaded_it():
    release = threading.Event()

    def slow_load() -> str:
        release.wait(5)
        return "loaded"

    loader = ModelLoader(slow_load, "loading")
    thread = threading.Thread(target=loader.run)
    thread.start()
    assert loader.wait(0.05) is None  # still loading
    assert loader.status().state == "loading" and loader.status().reason == "the model is loading"
    release.set()
    assert loader.wait(5) == "loaded"
    thread.join(2)


def test_an_unexpected_error_is_retried_too(caplog):
    calls = []

    def load() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: out of memory")
        return "ok"

    loader = ModelLoader(load, "loading swinT", Backoff(initial=0.01))
    assert loader.run() == "ok"
    assert "loading swinT failed: CUDA error: out of memory; attempt 1" in caplog.text
