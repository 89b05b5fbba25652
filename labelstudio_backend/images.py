"""Task images: resolve Label Studio's URL forms, fetch them safely, decode them.

URL forms (task["data"][<Image value>]):

- ``/data/upload/<project>/<file>`` and any other path starting with ``/`` (``upload/...`` too):
  fetched from LABEL_STUDIO_URL with the API key;
- ``/data/local-files/?d=<path>``: read from LOCAL_FILES_DOCUMENT_ROOT when it is set (never outside
  it), otherwise fetched from Label Studio like an upload;
- ``s3://``, ``gs://``, ``azure-blob://``: Label Studio presigns them at
  ``/tasks/<task id>/presign/?fileuri=<base64>`` and either redirects to the storage's presigned URL
  or proxies the file;
- ``http(s)://...``: Label Studio's own host, or a host of ALLOWED_HOSTS.

So that a crafted task cannot make the backend reach internal services, every other host is refused,
and hosts matched by a wildcard of ALLOWED_HOSTS must resolve to public addresses. Redirects are
followed by hand: Label Studio may redirect anywhere (it hands out presigned storage URLs), other
hosts only to allowed hosts; the API key never leaves Label Studio's origin.

Authentication and the "is this Label Studio" decision are labelstudio_client.LabelStudioClient's.
"""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import logging
import os
import posixpath
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urljoin, urlparse

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from labelstudio_backend.errors import LabelStudioError
from labelstudio_backend.labelstudio_client import LabelStudioClient
from labelstudio_backend.settings import Settings

logger = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
MAX_REDIRECTS = 5


class ImageError(ValueError):
    """A task image cannot be used; the message says what is wrong and what to set or fix."""


class ImageAuthError(ImageError):
    """Label Studio refused the API key (or none is set)."""


class ImageHostError(ImageError):
    """The image URL points to a host the backend may not fetch from."""


class ImageTooLargeError(ImageError):
    """The image is above MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS."""


@dataclass(frozen=True)
class Source:
    """Where an image URL leads: a local file, or an HTTP URL (with the cache key to store it under)."""
    kind: str                  # "local" | "label_studio" | "presign" | "external"
    location: str              # a file path or an absolute URL
    cache_key: str


# --- the loader ------------------------------------------------------------------------------------------

class ImageLoader:
    """Resolve, fetch (with a bounded on-disk cache) and decode task images.

    session: the requests.Session for every download (tests mount fakes on it); client: the Label Studio
    client (default: one over the same session, from the settings); resolve_host(name) -> addresses.
    """

    def __init__(self, settings: Settings, session: requests.Session | None = None,
                 resolve_host: Callable[[str], list[str]] | None = None, client: LabelStudioClient | None = None):
        self.settings = settings
        self.session = session or (client.session if client is not None else requests.Session())
        self.client = client or LabelStudioClient.from_settings(settings, session=self.session)
        self.resolve_host = resolve_host or _resolve_host
        self.ls_url = self.client.base_url
        self.cache_dir = Path(settings.model_dir) / "image_cache"
        self._cache_lock = threading.Lock()

    # public API

    def load(self, url: str, task_id: int | None = None) -> np.ndarray:
        """The image at `url` as RGB uint8 [H, W, 3], EXIF orientation applied."""
        return self.decode(self.fetch(url, task_id), url)

    def fetch(self, url: str, task_id: int | None = None) -> bytes:
        """The raw bytes of the image at `url` (from the cache when it has them)."""
        source = self.resolve(url, task_id)
        if source.kind == "local":
            return self._read_local(source.location, url)
        cached = self._cache_get(source.cache_key)
        if cached is not None:
            return cached
        data = self._download(source, url)
        self._cache_put(source.cache_key, data)
        return data

    def resolve(self, url: str, task_id: int | None = None) -> Source:
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"task {task_id}: the image URL is empty")
        url = url.strip()
        scheme = url.split(":", 1)[0].lower() if "://" in url else ""
        if scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise ImageError(f"{url}: a cloud storage URI needs its task id to be presigned by Label Studio")
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()
            return Source("presign", self._ls_absolute(f"/tasks/{int(task_id)}/presign/?fileuri={fileuri}", url),
                          cache_key=f"cloud:{url}")
        if scheme in ("http", "https"):
            kind = "label_studio" if self._is_label_studio(url) else "external"
            if kind == "external":
                self._check_host(url)
            return Source(kind, url, cache_key=url)
        if scheme:
            raise ImageError(f"{url}: unsupported URL scheme {scheme!r}; use http(s), s3, gs, azure-blob or a "
                             "Label Studio path such as /data/upload/...")
        if url.startswith("upload/"):
            url = "/data/" + url
        if not url.startswith("/"):
            raise ImageError(f"{url!r} is neither a URL nor a Label Studio path (/data/upload/..., "
                             "/data/local-files/?d=...)")
        if url.startswith("/data/local-files"):
            path = self._local_files_path(url)
            if path is not None:
                return Source("local", str(path), cache_key=url)
        return Source("label_studio", self._ls_absolute(url, url), cache_key=self.ls_url + url)

    def decode(self, data: bytes, url: str = "") -> np.ndarray:
        """Image bytes -> RGB uint8 [H, W, 3], upright (EXIF orientation applied), within MAX_IMAGE_PIXELS."""
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(f"{url}: the file is not an image PIL can read ({len(data)} bytes)") from None
        width, height = image.size
        if width * height > self.settings.max_image_pixels:
            raise ImageTooLargeError(
                f"{url}: the image is {width}x{height} = {width * height} pixels, above MAX_IMAGE_PIXELS="
                f"{self.settings.max_image_pixels}; downscale it or raise MAX_IMAGE_PIXELS")
        try:
            image = ImageOps.exif_transpose(image)  # browsers show images upright, so do regions
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ImageError(f"{url}: the image cannot be decoded ({e})") from None

    # resolution helpers

    def _ls_absolute(self, path: str, original: str) -> str:
        if not self.ls_url:
            raise ImageError(f"{original}: LABEL_STUDIO_URL is not set, so Label Studio paths and cloud storage "
                             "URIs cannot be fetched; set it to Label Studio's URL as this backend reaches it")
        return self.ls_url + path

    def _is_label_studio(self, url: str) -> bool:
        return self.client.is_label_studio_url(url)

    def _local_files_path(self, url: str) -> Path | None:
        root = self.settings.local_files_root
        if root is None:
            return None
        values = parse_qs(urlparse(url).query, keep_blank_values=True).get("d")
        relative = values[-1] if values else ""
        if not relative:
            raise ImageError(f"{url}: a /data/local-files/ URL needs ?d=<path>")
        root = Path(os.path.realpath(root))
        path = Path(os.path.realpath(root / posixpath.normpath(relative).lstrip("/")))
        if os.path.commonpath([root, path]) != str(root):
            raise ImageHostError(f"{url}: the path leaves LOCAL_FILES_DOCUMENT_ROOT={root}; only files under it "
                                 "are read")
        return path

    def _read_local(self, path: str, url: str) -> bytes:
        try:
            size = os.path.getsize(path)
        except OSError:
            raise ImageError(f"{url}: no such file {path} under LOCAL_FILES_DOCUMENT_ROOT") from None
        self._check_size(size, url)
        with open(path, "rb") as f:
            return f.read()

    def _check_host(self, url: str) -> None:
        """Refuse hosts that are neither Label Studio nor allowed (wildcards: public addresses only)."""
        host = (urlparse(url).hostname or "").lower()
        if not host:
            raise ImageHostError(f"{url}: the URL has no host")
        named, wildcard, networks = False, False, []
        for entry in self.settings.allowed_hosts:
            entry = entry.lower()
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if entry == host:
                named = True
            elif entry == "*" or entry.startswith("*.") and (host.endswith(entry[1:]) or host == entry[2:]):
                wildcard = True
        if named:
            return
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None and any(literal in net for net in networks):
            return
        if not wildcard and not networks:
            raise ImageHostError(
                f"{url}: host {host!r} is not Label Studio (LABEL_STUDIO_URL={self.ls_url or 'unset'}) and not in "
                "ALLOWED_HOSTS; add it to ALLOWED_HOSTS if images may come from it")
        try:
            addresses = [literal] if literal else [ipaddress.ip_address(a) for a in self.resolve_host(host)]
        except (OSError, ValueError) as e:
            raise ImageError(f"{url}: cannot resolve host {host!r} ({e})") from None
        if networks and addresses and all(any(a in net for net in networks) for a in addresses):
            return
        if not wildcard:
            raise ImageHostError(f"{url}: host {host!r} is not in ALLOWED_HOSTS; add it if images may come from it")
        private = [str(a) for a in addresses if not a.is_global]
        if private or not addresses:
            raise ImageHostError(
                f"{url}: host {host!r} resolves to the internal address {', '.join(private) or 'none'}; task images "
                "may not point to internal services. If this host is trusted, add its name or network to ALLOWED_HOSTS")

    # downloading

    def _download(self, source: Source, original: str) -> bytes:
        url = source.location
        for _ in range(MAX_REDIRECTS + 1):
            on_label_studio = self._is_label_studio(url)
            response = self._get(url, with_auth=on_label_studio)
            if response.is_redirect or response.status_code in (301, 302, 303, 307, 308):
                target = response.headers.get("Location")
                response.close()
                if not target:
                    raise ImageError(f"{original}: {url} answered a redirect without Location")
                target = urljoin(url, target)
                if urlparse(target).scheme not in ("http", "https"):
                    raise ImageHostError(f"{original}: redirect to a non-HTTP URL {target!r}")
                # Label Studio is trusted to redirect to storage (presigned URLs); nobody else is.
                if not on_label_studio and not self._is_label_studio(target):
                    self._check_host(target)
                url = target
                continue
            return self._read_body(response, url, original, on_label_studio)
        raise ImageError(f"{original}: more than {MAX_REDIRECTS} redirects")

    def _get(self, url: str, with_auth: bool) -> requests.Response:
        """GET without following redirects; with_auth: through the Label Studio client (its token)."""
        options = dict(stream=True, timeout=self.settings.fetch_timeout, verify=self.settings.verify_ssl,
                       allow_redirects=False)
        try:
            if with_auth:
                return self.client.send("GET", url, **options)
            return self.session.get(url, **options)
        except LabelStudioError as e:  # the token is missing or refused, or Label Studio is unreachable
            if e.status in (401, 403) or not self.client.api_key:
                raise ImageAuthError(str(e)) from None
            raise ImageError(str(e)) from None
        except requests.exceptions.SSLError as e:
            raise ImageError(f"TLS error fetching {url} ({e}); fix the certificate or set VERIFY_SSL=false") from None
        except requests.RequestException as e:
            raise ImageError(f"cannot fetch {url} ({e.__class__.__name__}: {e})") from None

    def _read_body(self, response: requests.Response, url: str, original: str, from_label_studio: bool) -> bytes:
        with response:
            status = response.status_code
            if status == 401 and from_label_studio:
                raise ImageAuthError(
                    f"{original}: Label Studio answered 401 Unauthorized; the token in LABEL_STUDIO_API_KEY is "
                    "wrong, revoked or from another instance (legacy tokens must be enabled in the organization)")
            if status == 403 and from_label_studio:
                raise ImageAuthError(f"{original}: Label Studio answered 403 Forbidden; the user of "
                                     "LABEL_STUDIO_API_KEY has no access to this project")
            if status == 404:
                raise ImageError(f"{original}: not found (HTTP 404 from {_origin(url)})")
            if status != 200:
                raise ImageError(f"{original}: HTTP {status} from {_origin(url)}")
            length = response.headers.get("Content-Length")
            if length and length.isdigit():
                self._check_size(int(length), original)
            chunks, total = [], 0
            for chunk in response.iter_content(1 << 16):
                total += len(chunk)
                self._check_size(total, original)
                chunks.append(chunk)
            return b"".join(chunks)

    def _check_size(self, size: int, url: str) -> None:
        if size > self.settings.max_image_bytes:
            raise ImageTooLargeError(f"{url}: the file is larger than MAX_IMAGE_BYTES={self.settings.max_image_bytes} "
                                     "bytes; downscale it or raise MAX_IMAGE_BYTES")

    # the on-disk cache (bounded by IMAGE_CACHE_MB, least recently used files go first)

    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / hashlib.sha256(key.encode()).hexdigest()

    def _cache_get(self, key: str) -> bytes | None:
        path = self._cache_path(key)
        try:
            data = path.read_bytes()
            os.utime(path)
            return data
        except OSError:
            return None

    def _cache_put(self, key: str, data: bytes) -> None:
        limit = self.settings.image_cache_mb * 1024 * 1024
        if len(data) > limit:
            return
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._cache_path(key))
            with self._cache_lock:
                self._evict(limit)
        except OSError as e:
            logger.warning("image cache in %s is not writable (%s); continuing without it", self.cache_dir, e)

    def _evict(self, limit: int) -> None:
        entries = []
        for entry in os.scandir(self.cache_dir):
            if entry.is_file() and not entry.name.startswith(".tmp-"):
                stat = entry.stat()
                entries.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= limit:
                break
            try:
                os.remove(path)
                total -= size
            except OSError:
                pass


def _resolve_host(host: str) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})


def _origin(url: str) -> str:
    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.netloc}"
