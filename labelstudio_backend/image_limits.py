"""Image size limits enforced from the header, before a single pixel is decoded.

A PNG of a few hundred kB can declare 30000 x 30000 pixels; decoding it (and converting it to RGB) takes
gigabytes. ``open_bounded`` reads only the header (``Image.open`` is lazy), refuses images above the
pixel limit, and turns Pillow's own decompression-bomb refusal and unreadable headers into errors with a
message instead of an unexpected exception (a 500).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError


class ImageRejected(ValueError):
    """The bytes are not an image the backend will decode; the message says why and what to change."""


class ImageTooLarge(ImageRejected):
    """The image is above MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS."""


def check_bytes(size: int, max_bytes: int, what: str) -> None:
    if size > max_bytes:
        raise ImageTooLarge(f"{what}: {size} bytes, above MAX_IMAGE_BYTES={max_bytes}; downscale the image or "
                            "raise MAX_IMAGE_BYTES")


def open_bounded(data: bytes, *, max_pixels: int, max_bytes: int, what: str) -> Image.Image:
    """The image in `data`, opened lazily (header only), within both limits; ImageRejected otherwise."""
    check_bytes(len(data), max_bytes, what)
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice its limit; ours is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{what}: refused before decoding, {e}; downscale the image") from None
    except UnidentifiedImageError:
        raise ImageRejected(f"{what}: not an image Pillow can read ({len(data)} bytes)") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or inconsistent headers
        raise ImageRejected(f"{what}: the image header cannot be read ({e})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejected(f"{what}: the image declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(f"{what}: {width}x{height} = {width * height} pixels, above MAX_IMAGE_PIXELS="
                            f"{max_pixels}; refused before decoding. Downscale the image or raise MAX_IMAGE_PIXELS")
    return image
