"""Requests in flight and shared work (labelstudio_backend/runtime/foreground.py)."""

from __future__ import annotations

import threading
import time

import pytest

from labelstudio_backend.runtime.foreground import Foreground, SharedWork


def test_background_work_waits_for_no_request_and_a_moment_after_the_last():
    foreground = Foreground()
    assert foreground.wait_quiet(0.0)  # nothing ever in flight
    with foreground.request():
        assert foreground.in_flight == 1
        started = time.monotonic()
        assert not foreground.wait_quiet(0.2)
        assert time.monotonic() - started >= 0.2
    assert foreground.in_flight == 0
    assert not foreground.wait_quiet(0.05, settle_s=5.0)  # the request just ended
    started = time.monotonic()
    assert foreground.wait_quiet(5.0, settle_s=0.3)
    assert 0.2 <= time.monotonic() - started < 2.0


def test_a_request_ending_wakes_the_waiting_work():
    foreground = Foreground()
    release = threading.Event()

    def request():
        with foreground.request():
            release.wait(5)

    thread = threading.Thread(target=request)
    thread.start()
    while foreground.in_flight == 0:
        time.sleep(0.01)
    threading.Timer(0.2, release.set).start()
    started = time.monotonic()
    assert foreground.wait_quiet(5.0)
    assert time.monotonic() - started < 2.0
    thread.join()


def test_concurrent_callers_of_one_key_share_one_computation_and_its_error():
    shared = SharedWork()
    calls, gate = [], threading.Event()

    def compute():
        calls.append(1)
        gate.wait(5)
        return "encoded"

    results = []
    threads = [threading.Thread(target=lambda: results.append(shared.run("img", compute))) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    gate.set()
    for thread in threads:
        thread.join()
    assert results == ["encoded"] * 3 and len(calls) == 1
    assert shared.run("img", lambda: "again") == "again"  # nothing kept afterwards

    def broken():
        raise OSError("truncated image")

    with pytest.raises(OSError, match="truncated"):
        shared.run("bad", broken)
