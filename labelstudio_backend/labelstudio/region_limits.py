"""How large a region may be, checked before it is decoded (issue 20, item 1: region bombs).

A brush RLE or a bitmask PNG of a few kB can declare a canvas of hundreds of millions of pixels; decoding it took
gigabytes. A region's canvas may have at most REGION_AREA_FACTOR times its task image's pixels (drawn on a copy
up to twice as large each way), and never more than MAX_IMAGE_PIXELS.
"""

from __future__ import annotations

DEFAULT_MAX_REGION_PIXELS = 64_000_000  # MAX_IMAGE_PIXELS's default: the cap when a caller passes none
REGION_AREA_FACTOR = 4        # a region's canvas may be up to 4x the task image's area (drawn on a 2x copy)


class RegionError(ValueError):
    """A region cannot be read; the message names it and says what is wrong."""


class RegionTooLarge(RegionError):
    """A region declares a canvas larger than its task image allows (a region bomb); refused before decoding."""


def region_pixel_limit(size: tuple[int, int] | None, max_pixels: int | None = None) -> int:
    """The most pixels a region's canvas may have on a task image of `size` = (height, width): REGION_AREA_FACTOR
    times the image's area, never above max_pixels (MAX_IMAGE_PIXELS; DEFAULT_MAX_REGION_PIXELS without one)."""
    cap = int(max_pixels) if max_pixels else DEFAULT_MAX_REGION_PIXELS
    if size is None:
        return cap
    height, width = size
    return max(1, min(cap, REGION_AREA_FACTOR * int(height) * int(width)))


def check_region_canvas(width: int, height: int, limit: int, rid: str = "?") -> None:
    """RegionTooLarge when a width x height canvas is above `limit` pixels (checked before anything is allocated)."""
    if width * height > limit:
        raise RegionTooLarge(f"region {rid} declares a {width}x{height} canvas ({width * height} pixels), above the "
                             f"{limit}-pixel limit of its task image (at most {REGION_AREA_FACTOR}x the image's area "
                             "and MAX_IMAGE_PIXELS); refused before decoding")
