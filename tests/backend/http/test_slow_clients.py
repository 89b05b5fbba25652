"""Slow clients cannot starve the server (issue 20, item 2): the shipped serving (gunicorn.conf.py's worker class,
_wsgi:app) on real sockets on 127.0.0.1.

The backend runs under gunicorn with 2 threads; 8 connections drip a header line every 0.3 s (as a slowloris
does), then 8 more send their headers and drip a body. Before, the first 2 of them took both threads and /health
timed out for as long as they lasted; now the worker's event loop reads them without a thread, /health answers
throughout, and the slow ones are answered 408 and closed once REQUEST_HEAD_TIMEOUT_S / REQUEST_BODY_TIMEOUT_S
have passed. A chunked body over MAX_REQUEST_BYTES is a 413. Every socket has a timeout; the server is stopped
at the end whatever happens.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SLOW = 8          # slow connections per kind: 4x the worker's threads
ANSWER_S = 10.0   # a generous bound for /health's answer on a loaded machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, raw: bytes, timeout: float = ANSWER_S) -> bytes:
    """Send `raw`, return the status line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        data = b""
        while b"\r\n" not in data:
            piece = s.recv(4096)
            if not piece:
                break
            data += piece
    return data.split(b"\r\n", 1)[0]


def health(port: int) -> bytes:
    return request(port, b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    env = {**os.environ, "MODEL_DIR": str(tmp_path_factory.mktemp("model_dir")), "DINOV_CHECKPOINT": "demo",
           "DEVICE": "cpu", "REQUEST_HEAD_TIMEOUT_S": "4", "REQUEST_BODY_TIMEOUT_S": "8",
           "MAX_REQUEST_BYTES": "100000", "LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""}
    log = tmp_path_factory.mktemp("log") / "gunicorn.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
             "--workers", "1", "--threads", "2", "--timeout", "0", "--no-control-socket", "_wsgi:app"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if health(port).startswith(b"HTTP/1.1"):
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield port, log
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def slow_connections(port: int, head: bytes, drip: bytes, stop: threading.Event) -> tuple[list, threading.Thread]:
    """SLOW connections that sent `head` and then send `drip` every 0.3 s until stopped or closed by the server."""
    conns = []
    for _ in range(SLOW):
        s = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_S)
        s.sendall(head)
        conns.append(s)

    def dripping():
        for k in range(200):  # at most 60 s
            if stop.is_set():
                return
            for s in conns:
                try:
                    s.sendall(drip.replace(b"{k}", str(k).encode()))
                except OSError:
                    pass
            time.sleep(0.3)

    thread = threading.Thread(target=dripping, daemon=True)
    thread.start()
    return conns, thread


def closed_with(conn: socket.socket) -> bytes:
    """What the server said before it closed the connection (b"" if nothing)."""
    conn.settimeout(ANSWER_S * 2)
    data = b""
    try:
        while True:
            piece = conn.recv(4096)
            if not piece:
                break
            data += piece
    except OSError:
        pass
    conn.close()
    return data.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("kind", ["headers", "body"])
def test_health_answers_while_slow_clients_trickle_and_they_are_cut_off(server, kind):
    port, log = server
    if kind == "headers":
        head, drip = b"GET /health HTTP/1.1\r\nHost: t\r\n", b"X-Drip-{k}: y\r\n"
    else:
        head = (b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 50000\r\n\r\n{\"tasks\": [")
        drip = b" "
    stop = threading.Event()
    conns, thread = slow_connections(port, head, drip, stop)
    try:
        for _ in range(5):  # while they trickle
            assert health(port).startswith(b"HTTP/1.1 "), "no answer from /health"
            time.sleep(0.5)
        answers = [closed_with(c) for c in conns]  # within the timeouts, the server answers 408 and closes
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers
    finally:
        stop.set()
        thread.join(timeout=5)
        for c in conns:
            c.close()
    assert health(port).startswith(b"HTTP/1.1 ")


def test_a_chunked_body_over_max_request_bytes_is_a_413(server):
    port, _ = server
    chunk = b"x" * 50000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)) + b"0\r\n\r\n"
    head = b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert request(port, head + body).startswith(b"HTTP/1.1 413")
    small = b'{"tasks": []}'
    ok = head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small)
    assert request(port, ok).startswith(b"HTTP/1.1 400")  # read whole, and answered by the app: no tasks


def test_the_worker_tells_a_complete_request_from_one_still_arriving():
    from labelstudio_backend.http.serve import _Arriving, request_complete

    def state(*parts: bytes, limit: int = 1000) -> str:
        arriving = _Arriving(conn=None, now=0.0)
        result = "wait"
        for part in parts:
            arriving.buf += part
            result = request_complete(arriving, limit)
        return result

    assert state(b"GET / HTTP/1.1\r\nHost: t\r\n") == "wait"
    assert state(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n") == "ready"
    assert state(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc") == "wait"
    assert state(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc", b"de") == "ready"
    assert state(b"POST / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n") == "ready"  # the app answers 413 unread
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert state(chunked, b"3\r\nabc\r\n") == "wait"
    assert state(chunked, b"3\r\nabc\r\n", b"0\r\n\r\n") == "ready"
    assert state(chunked, b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n") == "ready"
    assert state(chunked, b"%x\r\n" % 70000 + b"x" * 70000 + b"\r\n", limit=100) == "too large"
    assert state(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n") == "ready"
    assert state(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 20000) == "ready"  # the parser refuses the head
