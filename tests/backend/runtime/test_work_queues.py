"""Named bounded work queues (labelstudio_backend/runtime/work_queues.py): order, de-duplication, bounds, Retry-After,
failures, shutdown, and that one queue's slow job does not hold up another queue."""

from __future__ import annotations

import threading
import time

import pytest

from labelstudio_backend.runtime.work_queues import QueueClosed, QueueFull, QueueSpec, WorkQueue, WorkQueues


def blocker() -> tuple[threading.Event, threading.Event, callable]:
    """A job that signals when it starts and waits until released."""
    started, release = threading.Event(), threading.Event()

    def job(value=None):
        started.set()
        assert release.wait(10), "the test never released the job"
        return value

    return started, release, job


def test_jobs_run_in_order_and_give_their_results():
    queue = WorkQueue("t", workers=1, max_pending=10)
    seen: list[int] = []
    futures = [queue.submit(None, lambda i=i: seen.append(i) or i * 10) for i in range(5)]
    assert [f.result(5) for f in futures] == [0, 10, 20, 30, 40]
    assert seen == [0, 1, 2, 3, 4]
    assert queue.stats()["done"] == 5
    queue.shutdown()


def test_pending_work_with_the_same_key_is_queued_once():
    queue = WorkQueue("sync", workers=1, max_pending=10)
    started, release, job = blocker()
    first = queue.submit(("sync", 1), job, "busy")
    assert started.wait(5)
    calls: list[int] = []
    a = queue.submit(("sync", 3), lambda: calls.append(3) or "three")
    b = queue.submit(("sync", 3), lambda: calls.append(-1) or "other")
    assert a is b  # the pending job's future
    running_again = queue.submit(("sync", 1), lambda: "again")  # the running key is queued again
    assert running_again is not first
    assert queue.stats()["deduplicated"] == 1 and queue.stats()["pending"] == 2
    release.set()
    assert (a.result(5), running_again.result(5), first.result(5)) == ("three", "again", "busy")
    assert calls == [3]
    queue.shutdown()


def test_a_full_queue_refuses_with_a_retry_after():
    queue = WorkQueue("estimates", workers=1, max_pending=2)
    started, release, job = blocker()
    queue.submit("running", job)
    assert started.wait(5)
    queue.submit("a", lambda: None)
    queue.submit("b", lambda: None)
    with pytest.raises(QueueFull) as info:
        queue.submit("c", lambda: None)
    assert info.value.queue == "estimates" and info.value.pending == 2
    assert 1 <= info.value.retry_after <= 300
    assert "estimates queue is full" in str(info.value) and "try again in" in str(info.value)
    queue.submit("a", lambda: None)  # a duplicate of pending work is no new work: accepted when full
    assert queue.stats()["rejected"] == 1
    release.set()
    assert queue.wait_idle(5)
    queue.submit("c", lambda: None).result(5)  # room again
    queue.shutdown()


def test_retry_after_follows_the_recent_job_durations():
    now = [0.0]
    queue = WorkQueue("slow", workers=1, max_pending=1, clock=lambda: now[0])

    def job():
        now[0] += 40.0  # each job takes 40 s of the fake clock

    queue.submit(None, job).result(5)
    started, release, blocking = blocker()
    queue.submit("running", blocking)
    assert started.wait(5)
    queue.submit("waiting", lambda: None)
    with pytest.raises(QueueFull) as info:
        queue.submit("more", lambda: None)
    assert info.value.retry_after == 80  # one running and one waiting, 40 s each
    release.set()
    queue.shutdown()


def test_a_failing_job_is_reported_and_the_queue_goes_on(caplog):
    queue = WorkQueue("webhooks", workers=1, max_pending=10)

    def boom():
        raise ValueError("bad payload")

    failed = queue.submit(("event", 1), boom)
    ok = queue.submit(("event", 2), lambda: "fine")
    with pytest.raises(ValueError, match="bad payload"):
        failed.result(5)
    assert ok.result(5) == "fine"
    stats = queue.stats()
    assert stats["failed"] == 1 and stats["done"] == 1
    assert "('event', 1)" in stats["last_error"] and "bad payload" in stats["last_error"]
    assert "webhooks queue: job ('event', 1) failed" in caplog.text
    queue.shutdown()


def test_queues_are_independent():
    """A job stuck in the sync queue (Label Studio not answering) does not hold up webhooks."""
    queues = WorkQueues({"sync": QueueSpec(1, 4), "webhooks": QueueSpec(1, 4)})
    started, release, job = blocker()
    queues["sync"].submit(("sync", 1), job)
    assert started.wait(5)
    assert queues["webhooks"].submit("drain", lambda: "processed").result(2) == "processed"
    stats = queues.stats()
    assert stats["sync"]["running"] == 1 and stats["webhooks"]["done"] == 1
    assert stats["sync"]["longest_running_s"] >= 0
    with pytest.raises(KeyError, match="the queues are sync, webhooks"):
        queues["model"]
    release.set()
    assert queues.wait_idle(5)
    queues.shutdown()


def test_several_workers_run_jobs_side_by_side():
    queue = WorkQueue("predictions", workers=3, max_pending=10)
    barrier = threading.Barrier(3, timeout=5)
    futures = [queue.submit(None, barrier.wait) for _ in range(3)]  # deadlocks unless all three run at once
    assert sorted(f.result(5) for f in futures) == [0, 1, 2]
    queue.shutdown()


def test_shutdown_cancels_pending_waits_for_running_and_refuses_new_work():
    queue = WorkQueue("sync", workers=1, max_pending=10)
    started, release, job = blocker()
    running = queue.submit("running", job, "finished")
    assert started.wait(5)
    pending = queue.submit("pending", lambda: "never")
    threading.Timer(0.2, release.set).start()
    began = time.monotonic()
    queue.shutdown(timeout=5)
    assert time.monotonic() - began < 4
    assert running.result(0) == "finished"
    assert pending.cancelled()
    assert queue.stats()["cancelled"] == 1 and queue.stats()["closed"]
    with pytest.raises(QueueClosed):
        queue.submit("late", lambda: None)


def test_shutdown_does_not_wait_forever_for_a_stuck_job():
    queue = WorkQueue("sync", workers=1, max_pending=10)
    started, release, job = blocker()
    queue.submit("stuck", job)
    assert started.wait(5)
    began = time.monotonic()
    queue.shutdown(timeout=0.3)
    assert time.monotonic() - began < 2
    release.set()


def test_workers_start_with_the_first_job():
    """No thread before the first job: a queue built before gunicorn forks would lose its threads."""
    before = threading.active_count()
    queue = WorkQueue("model", workers=2, max_pending=2)
    assert threading.active_count() == before
    queue.submit(None, lambda: None).result(5)
    assert any(t.name.startswith("dinov-model-") for t in threading.enumerate())
    queue.shutdown()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="max_pending"):
        WorkQueue("x", workers=1, max_pending=0)
