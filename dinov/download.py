"""Download of the released DINOv checkpoints, resumable, safe to interrupt and safe to run in parallel.

The file is streamed into ``<cache_dir>/<name>.part``; an interrupted download continues from there with an HTTP
Range request, and only a complete file is renamed to ``<cache_dir>/<name>``.

- Processes that want the same checkpoint at once (gunicorn workers, a bulk job next to the server) take turns
  on an exclusive lock of ``<cache_dir>/<name>.lock`` (``flock``: the kernel releases it when its holder dies,
  so a killed download never blocks the next one); the second finds the file done and uses it.
- The file is checked against the size the server announced (``Content-Length`` of a 200, the total of
  ``Content-Range`` of a 206); a transfer that would pass it is refused and its part file removed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import requests
from tqdm import tqdm

from dinov.file_lock import exclusive

logger = logging.getLogger(__name__)

# GitHub release "checkpoint" of UX-Decoder/DINOv.
RELEASE_URL = "https://github.com/UX-Decoder/DINOv/releases/download/checkpoint"
CHECKPOINT_FILES = ("model_swinT.pth", "model_swinL.pth")
PART_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"
# Small enough that a dropped connection loses little of what was already received.
_CHUNK_BYTES = 64 * 1024

logger = logging.getLogger(__name__)


class CheckpointDownloadError(RuntimeError):
    """A checkpoint could not be downloaded; the message says how to get it by hand."""


def checkpoint_url(name: str, base_url: str = RELEASE_URL) -> str:
    return f"{base_url.rstrip('/')}/{name}"


def download_checkpoint(
    name: str,
    cache_dir: str | os.PathLike,
    base_url: str = RELEASE_URL,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Return the path of checkpoint ``name`` in ``cache_dir``, downloading it first if it is not there.

    ``name`` is one of :data:`CHECKPOINT_FILES`. A partial download left by an earlier attempt is resumed; a
    download running in another process is waited for. Raises :class:`CheckpointDownloadError` when the server
    cannot be reached, the transfer fails or its size is not the announced one (the message gives the URL and
    the local path to place the file at by hand).
    """
    if name not in CHECKPOINT_FILES:
        raise ValueError(f"unknown checkpoint {name!r}; the released ones are {', '.join(CHECKPOINT_FILES)}")
    cache_dir = Path(cache_dir)
    target = cache_dir / name
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    waiting = lambda: logger.info("another process is downloading %s; waiting for it", name)  # noqa: E731
    with exclusive(target.with_name(target.name + LOCK_SUFFIX), on_wait=waiting):
        if target.is_file():  # another process finished it while we waited for the lock
            return target
        return _download_locked(name, target, base_url, timeout, progress)


def _download_locked(name: str, target: Path, base_url: str, timeout: float, progress: bool) -> Path:
    part = target.with_name(target.name + PART_SUFFIX)
    url = checkpoint_url(name, base_url)

    # A log line, not only the progress bar: in a container the bar is lost, and a first start that downloads
    # hundreds of MB must not look like a hang.
    kept = part.stat().st_size if part.exists() else 0
    logger.warning("downloading the released checkpoint %s from %s into %s (once: later starts use the file)%s",
                   name, url, target.parent, f"; resuming after {kept} bytes" if kept else "")
    by_hand = f"download {url} by hand and put the file at {target}"
    try:
        total = _fetch_into(url, part, timeout, progress)
    except _SizeMismatch as err:
        part.unlink(missing_ok=True)  # not a prefix of the announced file: nothing worth resuming
        raise CheckpointDownloadError(f"download of {url} refused: {err}; run again, or {by_hand}") from None
    except requests.RequestException as err:
        kept = part.stat().st_size if part.exists() else 0
        resume = f" ({kept} bytes are kept in {part}; run again to resume)" if kept else ""
        offline = isinstance(err, (requests.ConnectionError, requests.Timeout))
        how = "If this machine is offline, download" if offline else "Or download"
        raise CheckpointDownloadError(
            f"could not download {url}: {err}{resume}.\n{how} {url} elsewhere and put the file at {target}"
        ) from err

    size = part.stat().st_size
    if total is None:
        logger.warning("the server did not announce the size of %s; %d bytes received, not checked", url, size)
    elif size != total:
        raise CheckpointDownloadError(
            f"download of {url} ended after {size} of {total} bytes; run again to resume from {part}, or {by_hand}"
        )
    os.replace(part, target)
    logger.warning("downloaded %s (%.0f MB) into %s", name, size / 2**20, target)
    return target


class _SizeMismatch(Exception):
    """The server's answer does not add up to the size it announced."""


def _fetch_into(url: str, part: Path, timeout: float, progress: bool) -> int | None:
    """Append the rest of ``url`` to ``part``; return the full size if the server told it."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == 416 and offset:
            # Nothing left after `offset`: the part file is already complete if the server's size agrees.
            total = _total_from_content_range(response.headers.get("Content-Range"))
            if total == offset:
                return total
            part.unlink()  # larger than the file on the server: not a prefix of it, start again
            return _fetch_into(url, part, timeout, progress)
        response.raise_for_status()

        length = _int_header(response.headers.get("Content-Length"))
        if response.status_code == 206:
            content_range = response.headers.get("Content-Range")
            start = _start_from_content_range(content_range)
            if start != offset:
                raise requests.HTTPError(f"server answered Range bytes={offset}- with bytes from {start}")
            mode = "ab"
            total = _total_from_content_range(content_range)
            if total is not None and length is not None and offset + length != total:
                raise _SizeMismatch(f"Content-Range {content_range} and Content-Length {length} disagree")
        else:
            # A plain 200 sends the whole file (the server ignored or did not get a Range): start over.
            offset, mode = 0, "wb"
            total = length

        bar = tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=url.rsplit("/", 1)[-1],
            disable=not progress,
        )
        written = offset
        with open(part, mode) as f, bar:
            for chunk in response.iter_content(chunk_size=_CHUNK_BYTES):
                written += len(chunk)
                if total is not None and written > total:
                    raise _SizeMismatch(f"the server sent more than the {total} bytes it announced")
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    return total


def _int_header(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _start_from_content_range(value: str | None) -> int | None:
    # "bytes 100-999/1000"
    if not value or not value.startswith("bytes ") or "-" not in value:
        return None
    try:
        return int(value[len("bytes ") :].split("-", 1)[0])
    except ValueError:
        return None


def _total_from_content_range(value: str | None) -> int | None:
    # "bytes 100-999/1000" or "bytes */1000"; the size may be "*" (unknown)
    if not value or "/" not in value:
        return None
    size = value.rsplit("/", 1)[1].strip()
    return int(size) if size.isdigit() else None
