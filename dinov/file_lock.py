"""An exclusive lock shared by every process on this machine that uses the same file (fcntl.flock).

    with exclusive(cache_dir / "model_swinT.pth.lock"):
        ...  # one process at a time downloads the checkpoint (dinov.download)
    with exclusive(model_dir / "webhooks.lock"):
        ...  # one gunicorn worker at a time applies the kept webhook events (labelstudio_backend.references.webhooks)

The kernel releases the lock when its holder exits, however it exits (SIGKILL included), so a crashed process
never leaves a stale lock behind. The lock file itself stays; it holds nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(path: Path, blocking: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold the lock of `path` for the block; yields True, or False when blocking=False and another holds it.

    on_wait() is called once when the lock is held elsewhere and this call is about to wait for it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                yield False
                return
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
