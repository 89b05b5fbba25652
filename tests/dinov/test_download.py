import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dinov.download import (
    CHECKPOINT_FILES,
    LOCK_SUFFIX,
    PART_SUFFIX,
    CheckpointDownloadError,
    checkpoint_url,
    download_checkpoint,
)
from tests.support.paths import REPO_ROOT

NAME = "model_swinT.pth"
PAYLOAD = os.urandom(300 * 1024 + 17)


class FileServer:
    """127.0.0.1 server for a few files, with single-range support ("bytes=N-") and knobs for failures."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[dict[str, str]] = []  # headers of every GET, in order
        self.ignore_range = False
        self.cut_after: int | None = None  # send only this many body bytes of the next response, then drop
        self.chunk_delay = 0.0  # seconds between 16 KiB chunks of a body (a slow link)
        self.omit_length = False  # no Content-Length: the body ends when the connection closes
        self.announced_total: int | None = None  # the total a 206's Content-Range claims instead of the real one
        self.lie_length: int | None = None  # the Content-Length sent instead of the real one
        self.bytes_sent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                server.requests.append(dict(self.headers))
                data = server.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                range_header = self.headers.get("Range")
                if range_header and not server.ignore_range:
                    start = int(range_header.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    total = server.announced_total if server.announced_total is not None else len(data)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{total}")
                else:
                    self.send_response(200)
                body = data[start:]
                if not server.omit_length:
                    length = server.lie_length if server.lie_length is not None else len(body)
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                if server.cut_after is not None:
                    body, server.cut_after = body[: server.cut_after], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                try:
                    for i in range(0, len(body), 16 * 1024):
                        self.wfile.write(body[i : i + 16 * 1024])
                        self.wfile.flush()
                        server.bytes_sent += len(body[i : i + 16 * 1024])
                        time.sleep(server.chunk_delay)
                except (BrokenPipeError, ConnectionResetError):  # the client died
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with FileServer({NAME: PAYLOAD}) as s:
        yield s


def test_full_download(server, tmp_path):
    path = download_checkpoint(NAME, tmp_path / "cache", base_url=server.base_url, progress=False)
    assert path == tmp_path / "cache" / NAME
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "cache" / (NAME + PART_SUFFIX)).exists()
    assert len(server.requests) == 1 and "Range" not in server.requests[0]


def test_a_download_is_logged_while_it_runs_and_when_done(server, tmp_path, caplog):
    caplog.set_level("INFO", logger="dinov.download")
    download_checkpoint(NAME, tmp_path, base_url=server.base_url, progress=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "dinov.download"]
    assert len(messages) == 2
    assert messages[0].startswith(f"downloading the released checkpoint {NAME} from {server.base_url}")
    assert "once" in messages[0] and f"into {tmp_path / NAME}" in messages[1]
    caplog.clear()
    download_checkpoint(NAME, tmp_path, base_url=server.base_url, progress=False)  # present: nothing to say
    assert not [r for r in caplog.records if r.name == "dinov.download"]


def test_resume_from_part_file(server, tmp_path):
    part = tmp_path / (NAME + PART_SUFFIX)
    part.write_bytes(PAYLOAD[:123_456])
    path = download_checkpoint(NAME, tmp_path, base_url=server.base_url)
    assert [r.get("Range") for r in server.requests] == ["bytes=123456-"]
    assert path.read_bytes() == PAYLOAD
    assert not part.exists()


def test_interrupted_download_keeps_part_and_resumes(server, tmp_path):
    server.cut_after = 100_000
    with pytest.raises(CheckpointDownloadError) as info:
        download_checkpoint(NAME, tmp_path, base_url=server.base_url, progress=False)
    part = tmp_path / (NAME + PART_SUFFIX)
    assert not (tmp_path / NAME).exists()
    assert part.read_bytes() == PAYLOAD[: part.stat().st_size]
    assert 0 < part.stat().st_size <= 100_000
    assert "run again to resume" in str(info.value)

    kept = part.stat().st_size
    path = download_checkpoint(NAME, tmp_path, base_url=server.base_url, progress=False)
    assert server.requests[-1].get("Range") == f"bytes={kept}-"
    assert path.read_bytes() == PAYLOAD


def test_complete_part_file_is_finished_without_a_body(server, tmp_path):
    (tmp_path / (NAME + PART_SUFFIX)).write_bytes(PAYLOAD)
    path = download_checkpoint(NAME, tmp_path, base_url=server.base_url, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [r.get("Range") for r in server.requests] == [f"bytes={len(PAYLOAD)}-"]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.ignore_range = True
    (tmp_path / (NAME + PART_SUFFIX)).write_bytes(b"x" * 5000)
    path = download_checkpoint(NAME, tmp_path, base_url=server.base_url, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_present_file_is_not_downloaded_again(server, tmp_path):
    (tmp_path / NAME).write_bytes(b"already here")
    path = download_checkpoint(NAME, tmp_path, base_url=server.base_url, progress=False)
    assert path.read_bytes() == b"already here"
    assert server.requests == []


def test_offline_error_says_which_url_and_where_to_put_the_file(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/release"
    with pytest.raises(CheckpointDownloadError) as info:
        download_checkpoint(NAME, tmp_path, base_url=base_url, timeout=5, progress=False)
    msg = str(info.value)
    assert f"{base_url}/{NAME}" in msg
    assert str(tmp_path / NAME) in msg
    assert "offline" in msg
    assert not (tmp_path / NAME).exists()


def test_http_error_is_reported(tmp_path):
    with FileServer({}) as s:
        with pytest.raises(CheckpointDownloadError, match="404"):
            download_checkpoint(NAME, tmp_path, base_url=s.base_url, progress=False)
    assert not (tmp_path / NAME).exists()


def test_unknown_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="model_swinT.pth"):
        download_checkpoint("model_swinB.pth", tmp_path)


def test_official_urls():
    assert CHECKPOINT_FILES == ("model_swinT.pth", "model_swinL.pth")
    assert (
        checkpoint_url("model_swinL.pth")
        == "https://github.com/UX-Decoder/DINOv/releases/download/checkpoint/model_swinL.pth"
    )


# --- several processes, sizes ---------------------------------------------------------------------------

DOWNLOAD_IN_A_PROCESS = (
    "import sys; from dinov.download import download_checkpoint; "
    "print(download_checkpoint(sys.argv[1], sys.argv[2], base_url=sys.argv[3], progress=False))"
)


def downloader(cache: Path, base_url: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DOWNLOAD_IN_A_PROCESS, NAME, str(cache), base_url],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_processes_downloading_the_same_checkpoint_take_turns(server, tmp_path):
    """Three workers starting at once: one downloads, the others wait for the lock and use its file."""
    server.chunk_delay = 0.02  # about 0.4 s for the whole file
    procs = [downloader(tmp_path, server.base_url) for _ in range(3)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert {out.strip() for out, _ in outputs} == {str(tmp_path / NAME)}
    assert (tmp_path / NAME).read_bytes() == PAYLOAD
    assert len(server.requests) == 1 and server.bytes_sent == len(PAYLOAD)  # downloaded once, not appended to
    assert not (tmp_path / (NAME + PART_SUFFIX)).exists()


def test_a_killed_download_releases_the_lock_and_is_resumed(server, tmp_path):
    server.chunk_delay = 0.05
    first = downloader(tmp_path, server.base_url)
    part = tmp_path / (NAME + PART_SUFFIX)
    deadline = time.monotonic() + 30
    while (not part.exists() or part.stat().st_size < 64 * 1024) and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    kept = part.stat().st_size
    assert 0 < kept < len(PAYLOAD)
    server.chunk_delay = 0.0
    path = download_checkpoint(NAME, tmp_path, base_url=server.base_url, progress=False, timeout=10)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1].get("Range") == f"bytes={kept}-"
    assert (tmp_path / (NAME + LOCK_SUFFIX)).exists()  # the lock file stays; the lock itself died with the process


def test_a_range_answer_whose_sizes_disagree_is_refused(server, tmp_path):
    part = tmp_path / (NAME + PART_SUFFIX)
    part.write_bytes(PAYLOAD[:1000])
    server.lie_length = 10  # Content-Range says the rest of the file follows, Content-Length says 10 bytes
    with pytest.raises(CheckpointDownloadError, match="disagree"):
        download_checkpoint(NAME, tmp_path, base_url=server.base_url, progress=False)
    assert not (tmp_path / NAME).exists()


def test_more_bytes_than_announced_are_refused_and_the_part_dropped(server, tmp_path):
    part = tmp_path / (NAME + PART_SUFFIX)
    part.write_bytes(PAYLOAD[:1000])
    server.omit_length = True
    server.announced_total = 50_000  # Content-Range claims a smaller file than the bytes that follow
    with pytest.raises(CheckpointDownloadError, match="more than the 50000 bytes it announced"):
        download_checkpoint(NAME, tmp_path, base_url=server.base_url, progress=False)
    assert not part.exists() and not (tmp_path / NAME).exists()


def test_fewer_bytes_than_announced_keep_the_part_for_a_resume(server, tmp_path):
    part = tmp_path / (NAME + PART_SUFFIX)
    part.write_bytes(PAYLOAD[:1000])
    server.omit_length = True
    server.announced_total = len(PAYLOAD) + 500  # the body ends 500 bytes before the announced size
    with pytest.raises(CheckpointDownloadError, match=f"ended after {len(PAYLOAD)} of {len(PAYLOAD) + 500} bytes"):
        download_checkpoint(NAME, tmp_path, base_url=server.base_url, progress=False)
    assert part.stat().st_size == len(PAYLOAD) and not (tmp_path / NAME).exists()


def test_a_size_the_server_does_not_announce_is_accepted(server, tmp_path):
    server.omit_length = True
    path = download_checkpoint(NAME, tmp_path, base_url=server.base_url, progress=False)
    assert path.read_bytes() == PAYLOAD
