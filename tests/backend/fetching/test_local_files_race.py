"""Local files without a check-then-open window (issue 20, item 5).

A second process keeps swapping a directory under LOCAL_FILES_DOCUMENT_ROOT for a symlink that leads out of it,
as fast as it can, while the loader reads through it. Before, the path was
resolved and checked, then opened: about 1 read in 300 returned the file outside. Now what was opened is checked,
so every read gives the inside file or a refusal, never the outside one.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from labelstudio_backend.fetching import local_files
from labelstudio_backend.fetching.images import ImageError, ImageLoader
from labelstudio_backend.settings import Settings

INSIDE, OUTSIDE = b"inside-image", b"SECRET-outside-the-root"
TRIES = 10000

SWAPPER = textwrap.dedent("""
    import os, sys
    root, outside, stop = sys.argv[1:4]
    sub, hold = os.path.join(root, "sub"), os.path.join(root, ".hold")
    open(stop + ".ready", "w").close()
    while not os.path.exists(stop):
        os.rename(sub, hold)          # the real directory goes aside ...
        os.symlink(outside, sub)      # ... and a symlink out of the root takes its name
        for _ in range(100):
            pass
        os.unlink(sub)
        os.rename(hold, sub)          # then the real directory comes back
        for _ in range(100):
            pass
""")


@pytest.fixture
def swapping(tmp_path):
    """root/sub is a real directory (with a.png) that another process keeps swapping for a symlink to outside/."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.png").write_bytes(INSIDE)
    (outside / "a.png").write_bytes(OUTSIDE)
    stop = tmp_path / "stop"
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(root), str(outside), str(stop)])
    try:
        for _ in range(3000):  # until it swaps (at most 30 s)
            if (tmp_path / "stop.ready").exists() or swapper.poll() is not None:
                break
            time.sleep(0.01)
        assert (tmp_path / "stop.ready").exists(), "the swapping process did not start"
        yield root
    finally:
        stop.touch()
        try:
            swapper.wait(timeout=10)
        except subprocess.TimeoutExpired:
            swapper.kill()
            swapper.wait(timeout=10)


def read_many(read) -> tuple[int, int, int]:
    inside = refused = escaped = 0
    for _ in range(TRIES):
        try:
            data = read()
        except (ValueError, OSError):
            refused += 1
            continue
        if data.startswith(OUTSIDE):
            escaped += 1
        elif data.startswith(INSIDE):
            inside += 1
    return inside, refused, escaped


def test_the_loader_never_reads_outside_the_root_while_a_symlink_is_swapped(swapping, tmp_path):
    loader = ImageLoader(Settings(model_dir=tmp_path / "model", local_files_root=swapping))
    inside, refused, escaped = read_many(lambda: loader.fetch("/data/local-files/?d=sub/a.png"))
    assert escaped == 0, f"{escaped} of {TRIES} reads returned the file outside the root"
    assert inside > 0


def test_reading_beneath_the_root_follows_no_symlink(swapping):
    inside, refused, escaped = read_many(lambda: local_files.read_beneath(swapping, "sub/a.png", 1000))
    assert escaped == 0 and inside > 0


def test_read_verified_refuses_a_symlink_out_and_reads_at_most_the_limit(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(OUTSIDE)
    (root / "out.png").symlink_to(tmp_path / "secret.png")
    (root / "big.png").write_bytes(b"x" * 5000)
    with pytest.raises(local_files.OutsideRoot):
        local_files.read_verified(root, "out.png", 1000)
    assert len(local_files.read_verified(root, "big.png", 1000)) == 1001
    with pytest.raises(local_files.OutsideRoot):
        local_files.relative_parts("../secret.png")


def test_a_fifo_named_like_an_image_does_not_block(tmp_path):
    import os

    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "pipe.png")
    loader = ImageLoader(Settings(model_dir=tmp_path / "model", local_files_root=root))
    with pytest.raises(ImageError, match="not a regular file"):
        loader.fetch("/data/local-files/?d=pipe.png")
