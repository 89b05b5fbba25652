"""Image limits hold before decoding: a decompression bomb is refused from its header, without a memory spike."""

from __future__ import annotations

import functools
import io
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from labelstudio_backend.fetching.images import ImageError, ImageTooLargeError, open_bounded

LIMITS = dict(max_pixels=64_000_000, max_bytes=64 << 20)


@functools.lru_cache(maxsize=4)
def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A 1-bit greyscale PNG of width x height zeros: a few hundred kB that decode to width*height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_normal_image_opens():
    image = open_bounded(png(8, 6), what="a.png", **LIMITS)
    assert image.size == (8, 6)


def test_the_pixel_limit_is_ours_not_pillows():
    with pytest.raises(ImageTooLargeError, match="8x6 = 48 pixels, above MAX_IMAGE_PIXELS=47"):
        open_bounded(png(8, 6), what="a.png", max_pixels=47, max_bytes=1 << 20)


def test_the_byte_limit():
    data = png(8, 6)
    with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_BYTES"):
        open_bounded(data, what="a.png", max_pixels=1000, max_bytes=len(data) - 1)


@pytest.mark.parametrize("data, message", [
    (b"not an image", "not an image"),
    (b"", "not an image"),
    (png(8, 6)[:40], "cannot be read|not an image"),
])
def test_what_is_not_an_image_says_so(data, message):
    with pytest.raises(ImageError, match=message):
        open_bounded(data, what="x", **LIMITS)


def test_a_decompression_bomb_is_refused_from_its_header():
    data = bomb_png()
    assert len(data) < 1 << 20
    with pytest.raises(ImageTooLargeError, match="30000x30000|decompression|pixels"):
        open_bounded(data, what="bomb.png", **LIMITS)
    with pytest.raises(ImageTooLargeError, match="10000x10000"):  # below Pillow's own bomb limit, above ours
        open_bounded(bomb_png(10000, 10000), what="bomb.png", **LIMITS)


def test_no_memory_spike_on_a_bomb(tmp_path):
    """In a fresh process, refusing the bomb keeps the peak memory near the interpreter's own."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    script = (
        "import resource, sys\n"
        "from labelstudio_backend.fetching.images import open_bounded, ImageTooLargeError\n"
        f"data = open({str(path)!r}, 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    open_bounded(data, max_pixels=64_000_000, max_bytes=64 << 20, what='bomb')\n"
        "except ImageTooLargeError:\n"
        "    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    growth_kib = int(result.stdout.strip())
    assert growth_kib < 50 * 1024, f"peak memory grew by {growth_kib} KiB"  # decoding would take >100 MiB
