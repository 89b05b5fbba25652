"""What the HTTP edge checks and tells before and after the routes (issue 20): request bodies without a
Content-Length counted against MAX_REQUEST_BYTES, refused credentials logged, and what /health shows a stranger.

    edge.install(app, settings)        # in create_app, once
    health_for(answer, authorized)     # /health's answer for this caller

Kept apart from the routes so that they stay one line each where they are used.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from labelstudio_backend.http.auth import AuthFailed, BasicAuth
from labelstudio_backend.settings import Settings

logger = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024


def install(app: Flask, settings: Settings) -> None:
    """Register the edge's request hooks on `app`; call it after the auth hook, so that a caller without the
    credentials is refused before its body is read."""
    limit = settings.max_request_bytes

    @app.before_request
    def _count_unsized_body() -> None:
        buffer_unsized_body(request.environ, limit)

    @app.after_request
    def _log_refusal(response: Response) -> Response:
        if response.status_code in (401, 403):
            # the path quoted (%r): a %0a in it cannot forge a log line
            logger.warning("%s %r -> %d for client %s", request.method, request.path[:300], response.status_code,
                           request.remote_addr or "?")
        return response


def buffer_unsized_body(environ: dict, limit: int) -> None:
    """A chunked body (no Content-Length) is read here, at most limit + 1 bytes: above `limit` it is a 413
    (RequestEntityTooLarge), as a sized body is; otherwise it is handed on with its length, so that the routes
    read it as any other body."""
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if environ.get("CONTENT_LENGTH") or not (chunked or environ.get("wsgi.input_terminated")):
        return
    stream = environ.get("wsgi.input")
    if stream is None:
        return
    data = bytearray()
    while len(data) <= limit:
        piece = stream.read(min(READ_CHUNK, limit + 1 - len(data)))
        if not piece:
            break
        data += piece
    if len(data) > limit:
        raise RequestEntityTooLarge()
    environ["wsgi.input"] = io.BytesIO(bytes(data))
    environ["CONTENT_LENGTH"] = str(len(data))
    environ.pop("wsgi.input_terminated", None)
    environ.pop("HTTP_TRANSFER_ENCODING", None)


def is_authorized(auth: BasicAuth | None, header: str | None) -> bool:
    """Whether the caller may see what every other endpoint shows: it showed the backend's credentials, or basic
    auth is off (then every endpoint is open to whoever reaches the port, and listening on 127.0.0.1 or behind a
    proxy is what protects it: README, Deploy safely)."""
    if auth is None:
        return True
    try:
        auth.check(header)
    except AuthFailed:
        return False
    return True


def health_for(answer: dict, authorized: bool, settings: Settings | None = None) -> dict:
    """/health for this caller: the whole report for a caller with the credentials (absolute paths of MODEL_DIR
    and LOCAL_FILES_DOCUMENT_ROOT named, not shown); for anyone else state only (status, the model's state, queue
    and webhook counts): no error texts (they can carry Label Studio's answers, task data, file paths), no
    checkpoint path. The log has the details."""
    if authorized:
        return hide_paths(answer, settings)
    model = answer.get("model") or {}
    public: dict[str, Any] = {"status": answer.get("status"), "model_class": answer.get("model_class"),
                              "model": {"loaded": model.get("loaded"), "state": model.get("state"),
                                        "attempts": model.get("attempts")}}
    if "webhooks" in answer:
        public["webhooks"] = {"pending": (answer["webhooks"] or {}).get("pending")}
    if isinstance(answer.get("background"), dict):
        public["background"] = {k: v for k, v in answer["background"].items() if isinstance(v, (int, float))}
    public["queues"] = {name: {k: v for k, v in stats.items() if k != "last_error" and
                               (v is None or isinstance(v, (bool, int, float)))}
                        for name, stats in (answer.get("queues") or {}).items()}
    if answer.get("reason"):
        public["reason"] = ("the model is not usable yet (state: %s); the backend's log says why"
                            % (model.get("state") or "unknown") if not model.get("loaded")
                            else "the backend cannot work now; its log says why")
    return public


def hide_paths(value: Any, settings: Settings | None) -> Any:
    """`value` (a JSON-like answer) with the absolute paths of MODEL_DIR and LOCAL_FILES_DOCUMENT_ROOT replaced by
    their setting's name."""
    if settings is None:
        return value
    names = [(str(path), name) for path, name in ((settings.local_files_root, "LOCAL_FILES_DOCUMENT_ROOT"),
                                                  (settings.model_dir, "MODEL_DIR")) if path]
    names += [(os.path.realpath(path), name) for path, name in names]
    names.sort(key=lambda item: -len(item[0]))

    def scrub(item: Any) -> Any:
        if isinstance(item, str):
            for path, name in names:
                if path not in ("", "/", "."):
                    item = item.replace(path, name)
            return item
        if isinstance(item, dict):
            return {k: scrub(v) for k, v in item.items()}
        if isinstance(item, list):
            return [scrub(v) for v in item]
        return item

    return scrub(value)
