"""Task image URLs: resolution, authentication, host restrictions, limits, EXIF, local files, cache."""

import base64
import io
import os
import time

import jwt
import numpy as np
import pytest
import requests
import requests_mock
from PIL import Image

from labelstudio_backend.fetching.images import (
    ImageAuthError,
    ImageError,
    ImageHostError,
    ImageLoader,
    ImageTooLargeError,
)
from labelstudio_backend.settings import Settings

LS = "http://ls.example:8080"


def png(width=6, height=4, color=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def make_loader(tmp_path, **overrides):
    """A loader whose HTTP is a requests_mock adapter: the URL rules of resolve() and fetch() apply, the address
    rules (which need real connections) are tested on real sockets in test_safe_http and test_hostile_urls."""
    values = dict(label_studio_url=LS, label_studio_api_key="legacy-token-123", model_dir=tmp_path)
    values.update(overrides)
    session = requests.Session()
    adapter = requests_mock.Adapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return ImageLoader(Settings(**values), session=session), adapter


# --- resolution -------------------------------------------------------------------------------------------

def test_url_forms_resolve(tmp_path):
    loader, _ = make_loader(tmp_path)
    assert loader.resolve("/data/upload/3/a.png").location == LS + "/data/upload/3/a.png"
    assert loader.resolve("upload/3/a.png").location == LS + "/data/upload/3/a.png"
    assert loader.resolve(LS + "/data/upload/3/a.png").kind == "label_studio"
    assert loader.resolve("/data/local-files/?d=imgs/a.png").location == LS + "/data/local-files/?d=imgs/a.png"
    source = loader.resolve("s3://bucket/dir/a.png", task_id=7)
    fileuri = base64.urlsafe_b64encode(b"s3://bucket/dir/a.png").decode()
    assert source.kind == "presign" and source.location == f"{LS}/tasks/7/presign/?fileuri={fileuri}"
    assert source.cache_key == "cloud:s3://bucket/dir/a.png"
    assert loader.resolve("azure-blob://container/a.png", task_id=1).kind == "presign"
    assert loader.resolve("gs://b/a.png", task_id=1).kind == "presign"


@pytest.mark.parametrize("url, error, message", [
    ("s3://bucket/a.png", ImageError, "task id"),
    ("ftp://host/a.png", ImageError, "unsupported URL scheme"),
    ("a.png", ImageError, "neither a URL nor a Label Studio path"),
    ("", ImageError, "empty"),
    ("http://cdn.example.com/a.png", ImageHostError, "not in ALLOWED_HOSTS"),
    ("http://169.254.169.254/latest/meta-data", ImageHostError, "not Label Studio"),
    ("http://ls.example:9999/data/upload/1/a.png", ImageHostError, "not Label Studio"),  # another port
])
def test_refused_urls(tmp_path, url, error, message):
    loader, _ = make_loader(tmp_path)
    with pytest.raises(error, match=message):
        loader.resolve(url)


def test_label_studio_paths_need_its_url(tmp_path):
    loader, _ = make_loader(tmp_path, label_studio_url="")
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL is not set"):
        loader.resolve("/data/upload/1/a.png")


def test_allowed_hosts(tmp_path):
    loader, _ = make_loader(tmp_path, allowed_hosts=("cdn.example.com", "*.example.com", "10.1.0.0/16"))
    for url in ("http://cdn.example.com/a.png", "https://img.example.com/b.png", "http://10.1.2.3/c.png"):
        assert loader.resolve(url).kind == "external"
    loader, _ = make_loader(tmp_path, allowed_hosts=("cdn.example.com",))
    with pytest.raises(ImageHostError, match="not in ALLOWED_HOSTS"):
        loader.resolve("http://img.example.com/a.png")
    # which addresses a wildcard or network admits is decided when connecting: test_safe_http, test_hostile_urls


# --- fetching and authentication ---------------------------------------------------------------------------

def test_upload_with_legacy_token(tmp_path):
    loader, adapter = make_loader(tmp_path)
    adapter.register_uri("GET", LS + "/data/upload/3/a.png", content=png(color=(0, 255, 0)),
                         request_headers={"Authorization": "Token legacy-token-123"})
    image = loader.load("/data/upload/3/a.png", task_id=1)
    assert image.shape == (4, 6, 3) and image.dtype == np.uint8
    assert (image == (0, 255, 0)).all()


def _jwt(kind, exp):
    return jwt.encode({"token_type": kind, "exp": int(exp)}, "a-test-signing-key-of-32-bytes!!", algorithm="HS256")


def test_personal_access_token_is_exchanged_and_renewed(tmp_path):
    refresh = _jwt("refresh", time.time() + 3600)
    first, second = _jwt("access", time.time() + 300), _jwt("access", time.time() + 600)
    loader, adapter = make_loader(tmp_path, label_studio_api_key=refresh)
    exchange = adapter.register_uri("POST", LS + "/api/token/refresh/",
                                    [{"json": {"access": first}}, {"json": {"access": second}}])

    def answer(request, context):
        if request.headers.get("Authorization") == f"Bearer {second}":
            return png()
        context.status_code = 401  # the first access token was revoked early
        return b""

    adapter.register_uri("GET", LS + "/data/upload/3/a.png", content=answer)
    assert loader.load("/data/upload/3/a.png").shape == (4, 6, 3)
    assert exchange.call_count == 2
    assert exchange.request_history[0].json() == {"refresh": refresh}


def test_refused_personal_access_token_names_the_variable(tmp_path):
    loader, adapter = make_loader(tmp_path, label_studio_api_key=_jwt("refresh", time.time() + 60))
    adapter.register_uri("POST", LS + "/api/token/refresh/", status_code=401, json={"detail": "invalid"})
    with pytest.raises(ImageAuthError, match="personal access token in LABEL_STUDIO_API_KEY"):
        loader.fetch("/data/upload/1/a.png")


def test_bad_legacy_token_names_the_variable(tmp_path):
    loader, adapter = make_loader(tmp_path)
    adapter.register_uri("GET", LS + "/data/upload/1/a.png", status_code=401)
    with pytest.raises(ImageAuthError, match="401.*LABEL_STUDIO_API_KEY"):
        loader.fetch("/data/upload/1/a.png")
    adapter.register_uri("GET", LS + "/data/upload/1/b.png", status_code=403)
    with pytest.raises(ImageAuthError, match="403"):
        loader.fetch("/data/upload/1/b.png")


def test_missing_token(tmp_path):
    loader, _ = make_loader(tmp_path, label_studio_api_key="")
    with pytest.raises(ImageAuthError, match="LABEL_STUDIO_API_KEY is not set"):
        loader.fetch("/data/upload/1/a.png")


def test_presigned_redirect_is_followed_without_the_token(tmp_path):
    loader, adapter = make_loader(tmp_path)
    fileuri = base64.urlsafe_b64encode(b"s3://bucket/a.png").decode()
    presigned = "https://bucket.s3.amazonaws.com/a.png?X-Amz-Signature=abc"
    adapter.register_uri("GET", f"{LS}/tasks/9/presign/?fileuri={fileuri}", status_code=303,
                         headers={"Location": presigned}, request_headers={"Authorization": "Token legacy-token-123"})
    storage = adapter.register_uri("GET", presigned, content=png(width=3, height=2))
    assert loader.load("s3://bucket/a.png", task_id=9).shape == (2, 3, 3)
    assert "Authorization" not in storage.last_request.headers
    # the bytes are cached under the cloud URI, not the short-lived presigned URL
    assert loader.fetch("s3://bucket/a.png", task_id=9) == png(width=3, height=2)
    assert storage.call_count == 1


def test_http_errors_are_image_errors(tmp_path):
    loader, adapter = make_loader(tmp_path)
    adapter.register_uri("GET", LS + "/data/upload/1/gone.png", status_code=404)
    with pytest.raises(ImageError, match="not found"):
        loader.fetch("/data/upload/1/gone.png")
    adapter.register_uri("GET", LS + "/data/upload/1/text.png", content=b"<html>login</html>")
    with pytest.raises(ImageError, match="not an image"):
        loader.load("/data/upload/1/text.png")
    adapter.register_uri("GET", LS + "/data/upload/1/down.png", exc=requests.exceptions.ConnectTimeout)
    with pytest.raises(ImageError, match="no answer within FETCH_TIMEOUT"):
        loader.fetch("/data/upload/1/down.png")
    adapter.register_uri("GET", LS + "/data/upload/1/refused.png", exc=requests.exceptions.ConnectionError)
    with pytest.raises(ImageError, match="cannot fetch"):
        loader.fetch("/data/upload/1/refused.png")


# --- limits, EXIF, local files, cache -------------------------------------------------------------------------

def test_size_limits(tmp_path):
    loader, adapter = make_loader(tmp_path, max_image_bytes=1000)
    adapter.register_uri("GET", LS + "/data/upload/1/big.png", content=os.urandom(5000))
    with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_BYTES=1000"):
        loader.fetch("/data/upload/1/big.png")
    loader, adapter = make_loader(tmp_path, max_image_pixels=100)
    adapter.register_uri("GET", LS + "/data/upload/1/wide.png", content=png(width=20, height=10))
    with pytest.raises(ImageTooLargeError, match="20x10 = 200 pixels"):
        loader.load("/data/upload/1/wide.png")


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 255, 255)  # stored: left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    loader, adapter = make_loader(tmp_path)
    adapter.register_uri("GET", LS + "/data/upload/1/phone.jpg", content=buffer.getvalue())
    upright = loader.load("/data/upload/1/phone.jpg")
    assert upright.shape == (40, 20, 3)
    assert upright[:15].mean() > 200 and upright[25:].mean() < 50  # the white half is now on top


def test_local_files_only_under_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(png(width=5, height=5))
    (tmp_path / "secret.png").write_bytes(png())
    loader, adapter = make_loader(tmp_path, local_files_root=root)
    assert loader.load("/data/local-files/?d=sub/a.png").shape == (5, 5, 3)
    assert adapter.call_count == 0
    with pytest.raises(ImageHostError, match="leaves LOCAL_FILES_DOCUMENT_ROOT"):
        loader.fetch("/data/local-files/?d=../secret.png")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    with pytest.raises(ImageHostError, match="leaves LOCAL_FILES_DOCUMENT_ROOT"):
        loader.fetch("/data/local-files/?d=link.png")
    with pytest.raises(ImageError, match="no such file"):
        loader.fetch("/data/local-files/?d=sub/missing.png")


def test_cache_is_bounded(tmp_path):
    loader, adapter = make_loader(tmp_path, image_cache_mb=1)
    blobs = {name: os.urandom(400_000) for name in ("a", "b", "c")}
    for name, data in blobs.items():
        adapter.register_uri("GET", f"{LS}/data/upload/1/{name}.png", content=data)
    for name in ("a", "b", "c"):
        assert loader.fetch(f"/data/upload/1/{name}.png") == blobs[name]
        time.sleep(0.01)
    files = [p for p in (tmp_path / "image_cache").iterdir()]
    assert len(files) == 2 and sum(p.stat().st_size for p in files) <= 1024 * 1024
    assert adapter.call_count == 3
    loader.fetch("/data/upload/1/c.png")  # still cached
    assert adapter.call_count == 3
    loader.fetch("/data/upload/1/a.png")  # evicted first: fetched again
    assert adapter.call_count == 4
