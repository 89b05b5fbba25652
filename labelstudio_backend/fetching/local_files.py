"""Read a file under LOCAL_FILES_DOCUMENT_ROOT with no window between the check and the open (issue 20, item 5).

Resolving a path, checking it is under the root, then opening it leaves a window: a directory swapped for a
symlink in between sends the open outside the root. Here the check is made on what was opened:

- ``read_verified``: the file is opened (symlinks followed, as Label Studio follows them), then the real path of
  the open descriptor (Linux: /proc/self/fd/<fd>) must lie under the root's real path; whatever a swap did, the
  descriptor is the file that will be read. Symlinks that stay inside the root keep working.
- ``read_beneath``: where /proc is missing, each component is opened relative to its parent's descriptor
  (openat) with O_NOFOLLOW, so no symlink is followed at all.

Both open with O_NONBLOCK (a FIFO named like an image never blocks a thread) and read only regular files, at
most max_bytes + 1 bytes. Errors name the path relative to the root, never the root itself.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat

PROC_FD = "/proc/self/fd"
_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class OutsideRoot(ValueError):
    """The path leads out of the root (by '..' or a symlink, checked on the opened file)."""


class NotReadable(ValueError):
    """No such regular file under the root, or it cannot be read."""


def relative_parts(relative: str) -> list[str]:
    """The components of `relative` under the root; OutsideRoot for one that climbs out ('..' after normalising)."""
    normal = posixpath.normpath(relative.lstrip("/"))
    parts = [p for p in normal.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise OutsideRoot(f"{relative!r} leaves LOCAL_FILES_DOCUMENT_ROOT")
    return parts


def read_under_root(root: str | os.PathLike, relative: str, max_bytes: int) -> bytes:
    """The first max_bytes + 1 bytes of root/relative, read from a descriptor that is verifiably under `root`."""
    if os.path.isdir(PROC_FD):
        return read_verified(root, relative, max_bytes)
    return read_beneath(root, relative, max_bytes)


def read_verified(root: str | os.PathLike, relative: str, max_bytes: int) -> bytes:
    parts = relative_parts(relative)
    real_root = os.path.realpath(root)
    try:
        fd = os.open(os.path.join(real_root, *parts), _FLAGS)
    except OSError as e:
        raise NotReadable(_missing(relative, e)) from None
    try:
        opened = os.readlink(f"{PROC_FD}/{fd}")
        if os.path.commonpath([real_root, opened]) != real_root:
            raise OutsideRoot(f"{relative!r} leads out of LOCAL_FILES_DOCUMENT_ROOT (through a symlink); only "
                              "files under it are read")
        return _read_regular(fd, relative, max_bytes)
    finally:
        os.close(fd)


def read_beneath(root: str | os.PathLike, relative: str, max_bytes: int) -> bytes:
    parts = relative_parts(relative)
    try:
        fd = os.open(os.path.realpath(root), _FLAGS | _DIRECTORY)
    except OSError as e:
        raise NotReadable(f"LOCAL_FILES_DOCUMENT_ROOT cannot be opened ({e.strerror})") from None
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            try:
                child = os.open(part, _FLAGS | _NOFOLLOW | (0 if last else _DIRECTORY), dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR) or (e.errno == errno.EMLINK):
                    raise OutsideRoot(f"{relative!r}: a symlink under LOCAL_FILES_DOCUMENT_ROOT is not followed") \
                        from None
                raise NotReadable(_missing(relative, e)) from None
            os.close(fd)
            fd = child
        return _read_regular(fd, relative, max_bytes)
    finally:
        os.close(fd)


def _read_regular(fd: int, relative: str, max_bytes: int) -> bytes:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise NotReadable(f"{relative!r} under LOCAL_FILES_DOCUMENT_ROOT is not a regular file")
    os.set_blocking(fd, True)
    chunks, size = [], 0
    while size <= max_bytes:
        piece = os.read(fd, min(1 << 20, max_bytes + 1 - size))
        if not piece:
            break
        chunks.append(piece)
        size += len(piece)
    return b"".join(chunks)


def _missing(relative: str, error: OSError) -> str:
    return f"no such file {relative!r} under LOCAL_FILES_DOCUMENT_ROOT ({error.strerror})"
