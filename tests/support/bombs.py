"""Small payloads that declare huge canvases: region bombs for the hostile tests (nothing large is allocated here)."""

from __future__ import annotations

import base64
import struct
import zlib


def rle_bomb(width: int, height: int) -> list[int]:
    """A valid Label Studio brush RLE of a width x height RGBA canvas, all 255, in runs of 65536 values (~40 kB for
    20000 x 10000)."""
    total = width * height * 4
    bits = [format(total, "032b"), format(8 - 1, "05b")] + [format(16 - 1, "04b")] * 4
    left = total
    while left:
        run = min(left, 1 << 16)
        bits.append("1" + "00" + format(run - 1, "016b") + format(255, "08b"))
        left -= run
    text = "".join(bits)
    text += "0" * (-len(text) % 8)
    return list(int(text, 2).to_bytes(len(text) // 8, "big"))


def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit greyscale PNG of width x height, every pixel white; its rows compressed in a stream (a few tens of kB
    for 13000 x 13000)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\xff" * ((width + 7) // 8)
    packer = zlib.compressobj(9)
    parts = [packer.compress(row) for _ in range(height)]
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def bitmask_region(png: bytes, label: str, rid: str = "bomb", size: tuple[int, int] = (64, 96)) -> dict:
    """A BitMaskLabels region of `png` on an image of size (height, width)."""
    return {"id": rid, "type": "bitmasklabels", "from_name": "tag", "to_name": "image", "original_width": size[1],
            "original_height": size[0], "value": {"imageDataURL": "data:image/png;base64," +
                                                  base64.b64encode(png).decode(), "bitmasklabels": [label]}}


def brush_region(rle: list[int], width: int, height: int, label: str, rid: str = "bomb") -> dict:
    """A BrushLabels region whose RLE declares a width x height canvas."""
    return {"id": rid, "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": width,
            "original_height": height, "value": {"format": "rle", "rle": rle, "brushlabels": [label]}}
