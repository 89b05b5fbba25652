"""Task images: resolve Label Studio's URL forms, fetch them safely, decode them.

URL forms (task["data"][<Image value>]):

- ``/data/upload/<project>/<file>`` (``upload/...`` too) and Label Studio's other media paths
  (labelstudio/media.py): fetched from LABEL_STUDIO_URL with the API key; any other path is refused, and the
  token goes to media paths only, on every hop (a task image "/api/projects/" never reads the API);
- ``/data/local-files/?d=<path>``: read from LOCAL_FILES_DOCUMENT_ROOT when it is set (never outside
  it), otherwise fetched from Label Studio like an upload;
- ``s3://``, ``gs://``, ``azure-blob://``: Label Studio presigns them at
  ``/tasks/<task id>/presign/?fileuri=<base64>`` and either redirects to the storage's presigned URL
  or proxies the file;
- ``http(s)://...``: Label Studio's own origin, or a host of ALLOWED_HOSTS.

So that a crafted task cannot make the backend reach internal services, which URLs may be fetched is
url_policy's decision and every download is safe_http.fetch through the Label Studio client's session:
parsed once, hosts judged by the addresses they reach, connected to the checked address, redirects
decided hop by hop (after Label Studio's redirect, public storage hosts too), one FETCH_TIMEOUT deadline
and MAX_IMAGE_BYTES for the whole download, the token only to Label Studio's origin. Decoding starts
only after the header's size passed MAX_IMAGE_PIXELS (``open_bounded``).

Authentication is labelstudio_client.LabelStudioClient's.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from labelstudio_backend.errors import LabelStudioError
from labelstudio_backend.fetching import local_files
from labelstudio_backend.fetching.labelstudio_client import LabelStudioClient
from labelstudio_backend.fetching.safe_http import FetchError, TooLarge, fetch
from labelstudio_backend.labelstudio.media import is_media_path
from labelstudio_backend.settings import Settings
from labelstudio_backend.url_policy import CheckedURL, Resolver, URLRefused, check_url

logger = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")


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

    client: the Label Studio client (default: one from the settings); every download goes through its
    session and policy. session, resolver: for the default client (tests mount fakes on a session, or
    inject a resolver: (host, port) -> addresses).
    """

    def __init__(self, settings: Settings, session: requests.Session | None = None,
                 client: LabelStudioClient | None = None, resolver: Resolver | None = None):
        self.settings = settings
        self.client = client or LabelStudioClient.from_settings(settings, session=session, resolver=resolver)
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
            checked = self._checked(url)
            kind = "label_studio" if checked.origin == self.client.policy.label_studio else "external"
            if kind == "external":
                try:
                    self.client.policy.precheck(checked)  # the name rules now; the addresses when fetching
                except URLRefused as e:
                    raise ImageHostError(str(e)) from None
            return Source(kind, checked.url, cache_key=checked.url)
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
                return Source("local", path, cache_key=url)
        if not is_media_path(urlparse(url).path):
            raise ImageHostError(f"{url[:200]!r} is not one of Label Studio's media paths (/data/upload/..., "
                                 "/data/local-files/?d=..., /storage-data/uploaded/, /tasks/<id>/resolve/); "
                                 "Label Studio's other paths are never fetched for an image")
        return Source("label_studio", self._ls_absolute(url, url), cache_key=self.ls_url + url)

    def decode(self, data: bytes, url: str = "") -> np.ndarray:
        """Image bytes -> RGB uint8 [H, W, 3], upright (EXIF orientation applied), within MAX_IMAGE_PIXELS."""
        image = open_bounded(data, max_pixels=self.settings.max_image_pixels,
                             max_bytes=self.settings.max_image_bytes, what=url)
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
        return self._checked(self.ls_url + path).url

    @staticmethod
    def _checked(url: str) -> CheckedURL:
        try:
            return check_url(url)
        except URLRefused as e:
            raise ImageHostError(str(e)) from None

    def _local_files_path(self, url: str) -> str | None:
        """The path under LOCAL_FILES_DOCUMENT_ROOT that `url` names (None when no root is set). Checked here for
        a clear early refusal; the read (local_files.read_under_root) checks again what it really opened."""
        root = self.settings.local_files_root
        if root is None:
            return None
        values = parse_qs(urlparse(url).query, keep_blank_values=True).get("d")
        relative = values[-1] if values else ""
        if not relative:
            raise ImageError(f"{url}: a /data/local-files/ URL needs ?d=<path>")
        try:
            parts = local_files.relative_parts(relative)
        except local_files.OutsideRoot:
            raise ImageHostError(f"{url}: the path leaves LOCAL_FILES_DOCUMENT_ROOT; only files under it are read") \
                from None
        real_root = os.path.realpath(root)
        if os.path.commonpath([real_root, os.path.realpath(os.path.join(real_root, *parts))]) != real_root:
            raise ImageHostError(f"{url}: the path leaves LOCAL_FILES_DOCUMENT_ROOT; only files under it are read")
        return "/".join(parts)

    def _read_local(self, relative: str, url: str) -> bytes:
        limit, root = self.settings.max_image_bytes, self.settings.local_files_root
        if root is None:
            raise ImageHostError(f"{url}: a local file, but LOCAL_FILES_DOCUMENT_ROOT is not set")
        try:  # never more than the limit, even if the file grows meanwhile
            data = local_files.read_under_root(root, relative, limit)
        except local_files.OutsideRoot as e:
            raise ImageHostError(f"{url}: {e}") from None
        except local_files.NotReadable as e:
            raise ImageError(f"{url}: {e}") from None
        check_bytes(len(data), limit, url)
        return data

    # downloading

    def _download(self, source: Source, original: str) -> bytes:
        """The body at source.location, through safe_http.fetch (see the module docstring)."""
        try:
            try:
                return self._fetch(source.location)
            except FetchError as e:
                if not (e.status == 401 and self.client.uses_personal_access_token
                        and self.client.is_label_studio_url(e.url or "")):
                    raise
                self.client.invalidate()  # the access token expired or was revoked early: renew once
                return self._fetch(source.location)
        except URLRefused as e:
            raise ImageHostError(str(e)) from None
        except TooLarge as e:
            raise ImageTooLargeError(f"{e} (MAX_IMAGE_BYTES={self.settings.max_image_bytes}); downscale the image "
                                     "or raise MAX_IMAGE_BYTES") from None
        except LabelStudioError as e:  # the token is missing or refused, or Label Studio is unreachable
            if e.status in (401, 403) or not self.client.api_key:
                raise ImageAuthError(str(e)) from None
            raise ImageError(str(e)) from None
        except FetchError as e:
            if e.status in (401, 403) and self.client.is_label_studio_url(e.url or ""):
                raise ImageAuthError(
                    f"{original}: Label Studio answered {e.status}; the token in LABEL_STUDIO_API_KEY is wrong, revoked "
                    "or from another instance (legacy tokens must be enabled in the organization), or its user has "
                    "no access to this project") from None
            raise ImageError(str(e)) from None

    def _fetch(self, url: str) -> bytes:
        return fetch(self.client.session, url, policy=self.client.policy, timeout=self.settings.fetch_timeout,
                     max_bytes=self.settings.max_image_bytes, label_studio_headers=self.client.auth_headers,
                     verify=self.settings.verify_ssl, token_for=self.client.is_media_url)

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


# --- size limits before decoding -------------------------------------------------------------------------


def check_bytes(size: int, max_bytes: int, what: str) -> None:
    if size > max_bytes:
        raise ImageTooLargeError(f"{what}: {size} bytes, above MAX_IMAGE_BYTES={max_bytes}; downscale the image "
                                 "or raise MAX_IMAGE_BYTES")


def open_bounded(data: bytes, *, max_pixels: int, max_bytes: int, what: str) -> Image.Image:
    """The image in `data`, opened lazily (its header only), within both limits; ImageError otherwise.

    A PNG of a few hundred kB can declare 30000 x 30000 pixels; decoding it takes gigabytes. Nothing is
    decoded here, and Pillow's own decompression-bomb refusal becomes an ImageTooLargeError.
    """
    check_bytes(len(data), max_bytes, what)
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice its limit; ours is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{what}: refused before decoding, {e}; downscale the image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what}: the file is not an image Pillow can read ({len(data)} bytes)") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or inconsistent headers
        raise ImageError(f"{what}: the image header cannot be read ({e})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{what}: {width}x{height} = {width * height} pixels, above MAX_IMAGE_PIXELS="
                                 f"{max_pixels}; refused before decoding. Downscale the image or raise "
                                 "MAX_IMAGE_PIXELS")
    return image
