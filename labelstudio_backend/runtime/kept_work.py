"""Draining work that is kept in the store across restarts (webhook events, deferred predictions).

    done = drain_kept(lock_path, next_batch, run_batch, retry=schedule, retry_after_s=30.0)

One process at a time drains (a file lock in MODEL_DIR), so gunicorn workers never do the same work twice or out of
order. Batches are taken until none is left; a batch whose work could not be settled now (Label Studio down, the
store busy) ends the drain and schedules `retry` after a pause, so that a failing dependency is not hammered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from dinov.file_lock import exclusive

Item = TypeVar("Item")


def drain_kept(lock_path: Path, next_batch: Callable[[], Sequence[Item]],
               run_batch: Callable[[Sequence[Item]], tuple[int, bool]], retry: Callable[[], None],
               retry_after_s: float, stop: threading.Event | None = None,
               on_start: Callable[[], object] | None = None) -> int:
    """Run every kept batch under the lock; returns how many items were done.

    run_batch(batch) -> (items done, whether to stop and try again after retry_after_s). on_start runs once the
    lock is held (e.g. pruning what is no longer kept); stop ends the drain after the current batch.
    """
    done = 0
    with exclusive(lock_path):
        if on_start is not None:
            on_start()
        while stop is None or not stop.is_set():
            batch = next_batch()
            if not batch:
                break
            count, try_later = run_batch(batch)
            done += count
            if try_later:
                call_later(retry_after_s, retry)
                break
    return done


def call_later(seconds: float, fn: Callable[[], None]) -> None:
    """Run fn after `seconds` on a daemon timer (the process may stop meanwhile: kept work is resumed at start)."""
    timer = threading.Timer(seconds, fn)
    timer.daemon = True
    timer.start()
