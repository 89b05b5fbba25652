"""Rasterise visual prompts (points, boxes, strokes, polygons, ellipses) into boolean masks.

DINOv's prompt encoder takes a mask: its content token attends only to features under the
mask. The official demo takes masks drawn with a brush (strokes of about 20 px on a 640-px
image) and boxes as filled rectangles. Here every geometry becomes a mask at the image's
original size, drawn with PIL without anti-aliasing:

- a point: a filled disc of `radius` pixels around it;
- a box: the filled rectangle (inclusive of its corner pixels);
- a stroke (scribble): the polyline drawn `width` pixels wide, with round joints;
- a polygon: filled, edges included;
- an ellipse: filled, optionally rotated about its centre.

Coordinates are (x, y) pixels of the original image, x to the right and y down.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from dinov.transforms import InputError


def _canvas(size: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    height, width = size
    if height <= 0 or width <= 0:
        raise InputError(f"mask size must be positive, got {size}")
    image = Image.new("1", (width, height), 0)
    return image, ImageDraw.Draw(image)


def _as_points(points: npt.ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or len(array) == 0:
        raise InputError(f"{name} must be a non-empty list of (x, y) pairs, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} contains NaN or infinite coordinates")
    return array


def points_to_mask(points: npt.ArrayLike, size: tuple[int, int], radius: float = 5.0) -> np.ndarray:
    """Discs of `radius` pixels around each (x, y) point."""
    array = _as_points(points, "points")
    image, draw = _canvas(size)
    for x, y in array:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=1)
    return np.array(image, dtype=bool)


def box_to_mask(box: Sequence[float] | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A filled (x0, y0, x1, y1) box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not x1 > x0 or not y1 > y0:
        raise InputError(f"box must have x1 > x0 and y1 > y0, got {tuple(box)}")
    image, draw = _canvas(size)
    draw.rectangle([x0, y0, x1, y1], fill=1)
    return np.array(image, dtype=bool)


def polygon_to_mask(vertices: npt.ArrayLike, size: tuple[int, int]) -> np.ndarray:
    """A filled polygon; at least three vertices."""
    array = _as_points(vertices, "polygon vertices")
    if len(array) < 3:
        raise InputError(f"a polygon needs at least 3 vertices, got {len(array)}")
    image, draw = _canvas(size)
    draw.polygon([tuple(p) for p in array], fill=1, outline=1)
    return np.array(image, dtype=bool)


def ellipse_to_mask(cx: float, cy: float, rx: float, ry: float, rotation_deg: float, size: tuple[int, int]) -> np.ndarray:
    """A filled ellipse with radii (rx, ry), rotated clockwise by `rotation_deg` about its centre."""
    if rx <= 0 or ry <= 0:
        raise InputError(f"ellipse radii must be positive, got rx={rx}, ry={ry}")
    angles = np.linspace(0.0, 2.0 * math.pi, 128, endpoint=False)
    theta = math.radians(rotation_deg)
    xs = rx * np.cos(angles)
    ys = ry * np.sin(angles)
    outline = np.stack([cx + xs * math.cos(theta) - ys * math.sin(theta),
                        cy + xs * math.sin(theta) + ys * math.cos(theta)], axis=1)
    return polygon_to_mask(outline, size)


def stroke_to_mask(polyline: npt.ArrayLike, size: tuple[int, int], width: float = 5.0) -> np.ndarray:
    """A polyline drawn `width` pixels wide; a single point becomes a disc."""
    array = _as_points(polyline, "stroke")
    if len(array) == 1:
        return points_to_mask(array, size, radius=width / 2)
    image, draw = _canvas(size)
    coords = [tuple(p) for p in array]
    draw.line(coords, fill=1, width=max(1, int(round(width))), joint="curve")
    radius = width / 2
    for x, y in (coords[0], coords[-1]):  # round caps, so short strokes are not clipped
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=1)
    return np.array(image, dtype=bool)
