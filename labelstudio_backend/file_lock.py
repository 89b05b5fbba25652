"""An exclusive lock shared by every process on this machine that uses the same file (fcntl.flock).

    with exclusive(model_dir / "webhooks.lock"):
        ...  # one gunicorn worker at a time applies the kept webhook events

The kernel releases the lock when its holder exits, however it exits (SIGKILL included), so a crashed worker never
leaves a stale lock behind. The lock file itself stays; it holds nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold the lock of `path` for the block; yields True, or False when blocking=False and another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
