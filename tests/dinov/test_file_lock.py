"""The cross-process lock (dinov/file_lock.py): exclusive between processes, released by a SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from dinov.file_lock import exclusive

HOLD = "import sys, time; from pathlib import Path; from dinov.file_lock import exclusive\n" \
       "with exclusive(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)"


def test_another_process_holding_the_lock_excludes_us_until_it_is_killed(tmp_path):
    lock = tmp_path / "work.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with exclusive(lock, blocking=False) as got:
            assert got is False
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        began = time.monotonic()
        with exclusive(lock) as got:  # the kernel released it with the process
            assert got is True
        assert time.monotonic() - began < 2
    finally:
        holder.kill()
        holder.wait(10)


def test_the_lock_is_free_again_after_the_block(tmp_path):
    lock = tmp_path / "sub" / "work.lock"
    with exclusive(lock) as got:
        assert got
    with exclusive(lock, blocking=False) as again:
        assert again
