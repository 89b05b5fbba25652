"""The gunicorn worker the backend is served with: gthread that gives a connection a thread only once its whole
request has arrived (issue 20, item 2).

gunicorn's gthread hands a new connection to a thread as soon as its first byte arrives; the thread then blocks
reading the request line, the headers and the body. Eight connections that drip a header line now and then held
the eight threads, and /health timed out for as long as they lasted (basic auth does not help: it is checked
after the headers). Here the worker's event loop reads each request itself, without blocking and without a
thread, until it is complete:

- the request head (request line and headers) must arrive within REQUEST_HEAD_TIMEOUT_S (default 10 s), the
  whole request, body included, within REQUEST_BODY_TIMEOUT_S (default 60 s) of its first byte; a connection
  that is slower gets "408 Request Timeout" and is closed, having held no thread;
- a body (Content-Length or chunked) is buffered up to MAX_REQUEST_BYTES; a chunked body that grows beyond it
  gets "413" from the worker (a declared Content-Length above it goes straight to the app, which answers 413
  without reading it); all connections of a worker buffer at most MAX_BUFFERED_BYTES together, beyond which a
  new request gets "503" rather than memory;
- the complete request is handed to a thread with its bytes, so the thread never waits for the client.

Keep-alive connections go through the same reading for their next request. TLS and HTTP/2 prior knowledge are
left to gthread (the backend serves neither; a reverse proxy terminates TLS). gunicorn.conf.py selects the class.
It builds on gthread's internals of gunicorn 27 (TConn, the poller, the deferred-connection handling):
requirements.txt pins that major version.
"""

from __future__ import annotations

import errno
import os
import selectors
import time
from functools import partial
from typing import Any

from gunicorn import http
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

HEAD_TIMEOUT_S = float(os.environ.get("REQUEST_HEAD_TIMEOUT_S", "10"))
BODY_TIMEOUT_S = float(os.environ.get("REQUEST_BODY_TIMEOUT_S", "60"))
MAX_BUFFERED_BYTES = int(os.environ.get("MAX_BUFFERED_BYTES", str(512 * 1024 * 1024)))
MAX_HEAD_BYTES = 64 * 1024  # beyond this the parser refuses the headers anyway: handed on at once
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024


def _answer(status: str) -> bytes:
    return f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".encode("ascii")


class _Arriving:
    """A request being read by the event loop."""

    __slots__ = ("conn", "buf", "head_deadline", "deadline", "head_end", "length", "chunked", "scan")

    def __init__(self, conn: TConn, now: float):
        self.conn = conn
        self.buf = bytearray()
        self.head_deadline = now + HEAD_TIMEOUT_S
        self.deadline = now + BODY_TIMEOUT_S
        self.head_end: int | None = None
        self.length = 0            # the body's Content-Length
        self.chunked = False
        self.scan = 0              # where the next chunk-size line starts (chunked)

    def expired(self, now: float) -> bool:
        return now > (self.head_deadline if self.head_end is None else self.deadline)


def request_complete(arriving: _Arriving, max_body: int) -> str:
    """"wait", "ready" (hand it to a thread) or "too large" (a chunked body above max_body)."""
    buf = arriving.buf
    if arriving.head_end is None:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return "ready" if len(buf) > MAX_HEAD_BYTES else "wait"
        arriving.head_end = end + 4
        head = bytes(buf[:end]).decode("latin-1").lower().split("\r\n")[1:]
        fields: dict[str, list[str]] = {}
        for line in head:
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), []).append(value.strip())
        if "100-continue" in fields.get("expect", []):
            return "ready"  # the client waits for "100 Continue": gunicorn's thread sends it
        if any("chunked" in v for v in fields.get("transfer-encoding", [])):
            arriving.chunked = True
            arriving.scan = arriving.head_end
        else:
            lengths = fields.get("content-length", [])
            try:
                arriving.length = int(lengths[0]) if len(lengths) == 1 else 0
            except ValueError:
                return "ready"  # malformed: the parser answers 400
            if len(lengths) > 1 or arriving.length > max_body:
                return "ready"  # ambiguous (400), or declared too large: the app answers 413 unread
    if arriving.chunked:
        return _chunked(arriving, max_body)
    return "ready" if len(buf) - arriving.head_end >= arriving.length else "wait"


def _chunked(arriving: _Arriving, max_body: int) -> str:
    buf, head_end = arriving.buf, arriving.head_end or 0
    if len(buf) - head_end > max_body + 64 * 1024:  # chunk framing included
        return "too large"
    while True:
        eol = buf.find(b"\r\n", arriving.scan)
        if eol < 0:
            return "wait"
        size_text = bytes(buf[arriving.scan:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return "ready"  # malformed: the parser answers 400
        if size == 0:  # the last chunk: then trailer fields, ended by an empty line
            if buf[eol + 2:eol + 4] == b"\r\n" or buf.find(b"\r\n\r\n", eol) >= 0:
                return "ready"
            return "wait"
        arriving.scan = eol + 2 + size + 2
        if arriving.scan > len(buf):
            return "wait"


class BufferingThreadWorker(ThreadWorker):
    """gthread whose event loop reads each request completely before a thread gets it (see the module)."""

    def init_process(self) -> None:
        self.arriving: dict[int, _Arriving] = {}
        self.buffered = 0
        try:
            from labelstudio_backend.settings import Settings

            self.max_body = Settings.from_env().max_request_bytes
        except Exception:  # the app reports a bad setting itself
            self.max_body = DEFAULT_MAX_REQUEST_BYTES
        super().init_process()

    def _threads_read(self, client: Any) -> bool:
        return bool(self.cfg.is_ssl) or negotiation.prior_knowledge_allowed(self.cfg, client)

    def accept(self, listener: Any) -> None:
        try:
            sock, client = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, sock, client, listener.getsockname())  # non-blocking from here
        if self._threads_read(client):
            sock.setblocking(True)
            self.enqueue_req(conn)
            return
        self._read_request(conn)

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        """A kept-alive connection's next request: read by the event loop too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        if conn.is_http2 or self._threads_read(conn.client):
            self.enqueue_req(conn)
            return
        self._read_request(conn)

    def _read_request(self, conn: TConn) -> None:
        arriving = _Arriving(conn, time.monotonic())
        conn.sock.setblocking(False)
        self.arriving[id(arriving)] = arriving
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, arriving))

    def _on_readable(self, arriving: _Arriving, sock: Any) -> None:
        try:
            data = sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._drop(arriving)
            return
        arriving.buf += data
        self.buffered += len(data)
        state = request_complete(arriving, self.max_body)
        if state == "too large":
            self._drop(arriving, _answer("413 Payload Too Large"))
        elif self.buffered > MAX_BUFFERED_BYTES and state == "wait":
            self._drop(arriving, _answer("503 Service Unavailable"))
        elif state == "ready":
            self._hand_on(arriving)

    def _forget(self, arriving: _Arriving) -> None:
        self.arriving.pop(id(arriving), None)
        self.buffered -= len(arriving.buf)
        try:
            self.poller.unregister(arriving.conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _hand_on(self, arriving: _Arriving) -> None:
        """The request is here: a thread parses it from the bytes read, and never waits for the client."""
        self._forget(arriving)
        conn = arriving.conn
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(arriving.buf))
        conn.data_ready = True
        self.enqueue_req(conn)

    def _drop(self, arriving: _Arriving, answer: bytes | None = None) -> None:
        self._forget(arriving)
        if answer:
            try:
                arriving.conn.sock.send(answer)
            except OSError:
                pass
        self.nr_conns -= 1
        arriving.conn.close()

    def murder_pending(self) -> None:
        """gthread's sweep, and the requests that take longer than their deadline: 408, closed."""
        super().murder_pending()
        now = time.monotonic()
        for arriving in [a for a in self.arriving.values() if a.expired(now)]:
            self._drop(arriving, _answer("408 Request Timeout"))
