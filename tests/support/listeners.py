"""Real sockets for network-rule tests: a listener that records every connection, and a small HTTP server.

A test that says "nothing reached the internal service" must be able to fail, so the internal service is
a real socket on a loopback address that records each connection it accepts (even one that sends nothing).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

Reply = Callable[["Received"], "bytes | Iterable[bytes]"]


@dataclass
class Received:
    """One accepted connection: what the peer sent (up to the end of the request head, or 2 s)."""

    data: bytes = b""
    server_name: str | None = None  # TLS SNI, when the listener speaks TLS

    @property
    def request_line(self) -> str:
        return self.data.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def headers(self) -> dict[str, str]:
        lines = self.data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
        return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines) if k}


def http_reply(status: int = 200, body: bytes = b"ok", headers: dict[str, str] | None = None) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class RecordingListener:
    """A TCP server on `host` that records every connection and answers with reply(received)."""

    host: str = "127.0.0.1"
    port: int = 0
    reply: Reply | None = None
    tls: ssl.SSLContext | None = None
    connections: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.host, self.port))
        self.port = self._sock.getsockname()[1]
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            received = Received()
            with self._lock:
                self.connections.append(received)  # recorded before anything is read: a bare connect counts
            threading.Thread(target=self._handle, args=(conn, received), daemon=True).start()

    def _handle(self, conn: socket.socket, received: Received) -> None:
        try:
            conn.settimeout(2.0)
            if self.tls is not None:
                def remember(sslsock, name, _context):
                    received.server_name = name
                self.tls.sni_callback = remember
                conn = self.tls.wrap_socket(conn, server_side=True)
            while b"\r\n\r\n" not in received.data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received.data += chunk
            answer = self.reply(received) if self.reply else http_reply()
            for chunk in [answer] if isinstance(answer, bytes) else answer:
                conn.sendall(chunk)
        except (OSError, ssl.SSLError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(2)

    def __enter__(self) -> RecordingListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def routes(table: dict[str, bytes | Callable[[Received], bytes | Iterable[bytes]]]) -> Reply:
    """A reply function answering by request path (query ignored); 404 for the rest."""

    def reply(received: Received) -> bytes | Iterable[bytes]:
        parts = received.request_line.split(" ")
        path = parts[1].split("?", 1)[0] if len(parts) > 1 else ""
        answer = table.get(path)
        if answer is None:
            return http_reply(404, b"not found")
        return answer(received) if callable(answer) else answer

    return reply


def drip(head: bytes, byte: bytes = b"x", interval: float = 0.2, count: int = 100) -> Iterable[bytes]:
    """A response head, then one byte every `interval` seconds: each read is quick, the whole is slow."""
    yield head
    for _ in range(count):
        time.sleep(interval)
        yield byte


def tls_server_context(hostname: str, directory) -> tuple[ssl.SSLContext, str]:
    """A server TLS context with a certificate for `hostname`, signed by a fresh CA; returns (context, CA file)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = (f"{directory}/{name}" for name in ("ca.pem", "cert.pem", "key.pem"))
    with open(ca_file, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(cert_file, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, ca_file
