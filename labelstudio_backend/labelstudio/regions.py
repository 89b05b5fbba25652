"""Label Studio regions <-> masks and prompts.

Label Studio stores image regions in percent of the image (`x` of `original_width`, `y` of
`original_height`); a brush region is an RLE of the whole RGBA canvas (H*W*4 bytes, the mask is the
alpha channel) encoded with label_studio_sdk.converter.brush. Here a continuous position c (pixels,
c = percent * size / 100) covers pixel i when the pixel's centre i + 0.5 lies inside the shape; the
rasterisers of dinov.prompts take pixel-centre coordinates, hence the `- 0.5` shifts below.

Bad regions (missing fields, malformed RLE, sizes that do not match) raise RegionError with a
message that names the region.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from label_studio_sdk.converter import brush
from PIL import Image

from dinov import prompts
from labelstudio_backend.labelstudio.label_config import Control
from labelstudio_backend.labelstudio.region_limits import (  # noqa: F401  (RegionError is this module's too)
    REGION_AREA_FACTOR,
    RegionError,
    RegionTooLarge,
    check_region_canvas,
    region_pixel_limit,
)
from labelstudio_backend.labelstudio.region_types import REGION_TYPES

MAX_RLE_PIXELS = 200_000_000  # a canvas header above this is an attack or a corrupt region, not an image
MAX_POLYGON_POINTS = 100_000  # vertices of one polygon region
KEYPOINT_MIN_RADIUS = 3.0     # pixels of the disc a keypoint becomes when a mask is needed


# --- reading regions -------------------------------------------------------------------------------------

def region_type(region: dict) -> str:
    """The region's type as its "...labels" form (a <Brush> + <Labels> config gives type "brush")."""
    if not isinstance(region, dict):
        raise RegionError(f"a region must be a JSON object, got {type(region).__name__}")
    kind = str(region.get("type", "")).lower()
    if kind + "labels" in REGION_TYPES:
        kind += "labels"
    if kind not in REGION_TYPES:
        raise RegionError(f"region {_rid(region)} has type {region.get('type')!r}; supported: {', '.join(REGION_TYPES)}")
    if not isinstance(region.get("value"), dict):
        raise RegionError(f"region {_rid(region)} has no 'value' object")
    return kind


def region_label(region: dict) -> str | None:
    """The first label of a region (value[<type>][0]), or None for an unlabeled one."""
    kind = region_type(region)
    labels = region["value"].get(kind)
    if labels is None:
        return None
    if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
        raise RegionError(f"region {_rid(region)}: value[{kind!r}] must be a list of label names, got {labels!r}")
    return labels[0] if labels else None


def region_size(region: dict) -> tuple[int, int]:
    """(width, height) of the image the region was drawn on."""
    try:
        width, height = int(region["original_width"]), int(region["original_height"])
    except (KeyError, TypeError, ValueError):
        raise RegionError(f"region {_rid(region)} needs integer original_width and original_height") from None
    if width <= 0 or height <= 0:
        raise RegionError(f"region {_rid(region)} has original size {width}x{height}; both must be positive")
    return width, height


def is_positive(region: dict) -> bool:
    """False only for negative keypoints (Label Studio's smart keypoints with Alt held)."""
    flag = region.get("is_positive", region.get("value", {}).get("is_positive", True))
    return flag is not False and str(flag).lower() != "false"


# --- brush RLE ---------------------------------------------------------------------------------------------

def decode_rle(rle: Any, width: int, height: int, max_pixels: int = MAX_RLE_PIXELS) -> np.ndarray:
    """Label Studio brush RLE -> bool mask [height, width] (the alpha channel of the RGBA canvas); RegionTooLarge
    for a canvas above `max_pixels`, before anything is decoded."""
    check_region_canvas(width, height, max_pixels, "(brush)")
    if isinstance(rle, np.ndarray):
        rle = rle.tolist()
    if not isinstance(rle, list) or len(rle) < 7:
        raise RegionError("brush RLE must be a list of at least 7 byte values (a 7-byte header and runs)")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in rle):
        raise RegionError("brush RLE must contain integers in [0, 255] only")
    count = int.from_bytes(bytes(rle[:4]), "big")
    expected = width * height * 4
    if count != expected:
        raise RegionError(f"brush RLE encodes {count} values but a {width}x{height} RGBA canvas has {expected}; "
                          "the region's original_width/original_height do not match its RLE")
    if count > MAX_RLE_PIXELS * 4:
        raise RegionError(f"brush RLE canvas of {width}x{height} is larger than the {MAX_RLE_PIXELS}-pixel limit")
    try:
        flat = brush.decode_rle(bytes(rle))
    except (ValueError, IndexError) as e:
        raise RegionError(f"brush RLE is malformed (truncated or corrupt: {e})") from None
    return np.asarray(flat).reshape(height, width, 4)[:, :, 3] > 0


def encode_rle(mask: np.ndarray) -> list[int]:
    """bool mask [H, W] -> Label Studio brush RLE (all four channels 255 where the mask is set).

    The same bytes as ``label_studio_sdk.converter.brush.mask2rle(mask * 255)`` (tests/test_regions.py checks
    it on hundreds of masks), computed with numpy on the runs of the mask instead of bit strings per pixel.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise RegionError(f"a mask must be 2-D [H, W], got shape {mask.shape}")
    if mask.size == 0:
        raise RegionError(f"a mask must have at least one pixel, got shape {mask.shape}")
    flat = mask.astype(bool, copy=False).ravel()
    # Runs of the pixel mask; each pixel is four equal canvas bytes (RGBA), so canvas runs are 4x as long.
    ends = np.append(np.flatnonzero(flat[1:] != flat[:-1]), flat.size - 1)
    lengths = np.diff(ends, prepend=-1) * 4
    values = np.where(flat[ends], 255, 0)
    return _brush_rle_bytes(values, lengths, flat.size * 4).tolist()


# Label Studio's brush RLE (label_studio_sdk.converter.brush.encode_rle, word size 8, run-length field sizes
# 3, 4, 8, 16 bits): a 32-bit value count, the word size - 1 in 5 bits, each field size - 1 in 4 bits, then per
# run a token: a 1-bit series flag, a 2-bit field-size index, length - 1 in that many bits and the 8-bit value
# (a run of one is a non-series token with a 3-bit zero length). Runs longer than 2**16 are cut into 2**16-long
# tokens and a remainder, all with the 16-bit field. The bit string is padded with 8 - (bits % 8) zeros: a whole extra zero byte when it
# already ends on a byte boundary, as the SDK does.
_RLE_HEADER_BITS = "{:032b}" + f"{8 - 1:05b}" + "".join(f"{size - 1:04b}" for size in (3, 4, 8, 16))
_RLE_LONG = 2**16


def _brush_rle_bytes(values: np.ndarray, lengths: np.ndarray, count: int) -> np.ndarray:
    """Label Studio brush RLE of runs (byte ``values`` [R], ``lengths`` [R] >= 1, ``count`` their sum) as uint8."""
    lengths = np.asarray(lengths, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    # Runs beyond the 16-bit field become several tokens: all but the last 2**16 long.
    pieces = np.where(lengths > 256, (lengths - 1) // _RLE_LONG + 1, 1)
    run_of = np.repeat(np.arange(len(lengths)), pieces)
    first = np.cumsum(pieces) - pieces  # token index of each run's first piece
    piece_index = np.arange(len(run_of)) - first[run_of]
    last_piece = piece_index == pieces[run_of] - 1
    tok_len = np.where(last_piece, lengths[run_of] - _RLE_LONG * piece_index, _RLE_LONG)
    tok_val = values[run_of]
    # Every token of a run longer than 256 is a 16-bit series token, even a short remainder.
    run_len = lengths[run_of]
    size_index = np.select([run_len <= 8, run_len <= 16, run_len <= 256], [0, 1, 2], 3)
    field_bits = np.array([3, 4, 8, 16], dtype=np.int64)[size_index]
    series = (run_len > 1).astype(np.int64)
    code = (((series << 2 | size_index) << field_bits | (tok_len - 1)) << 8) | tok_val
    nbits = 1 + 2 + field_bits + 8
    # Expand every token to its bits, most significant first.
    total = int(nbits.sum())
    starts = np.cumsum(nbits) - nbits
    owner = np.repeat(np.arange(len(code)), nbits)
    shift = (nbits[owner] - 1) - (np.arange(total) - starts[owner])
    bits = ((code[owner] >> shift) & 1).astype(np.uint8)
    header = np.frombuffer(_RLE_HEADER_BITS.format(count).encode(), dtype=np.uint8) - ord("0")
    stream = np.concatenate([header, bits])
    out = np.packbits(stream)  # zero-pads the last byte
    if stream.size % 8 == 0:
        out = np.append(out, np.uint8(0))
    return out


def decode_bitmask(data_url: Any, rid: str = "?", max_pixels: int = MAX_RLE_PIXELS) -> np.ndarray:
    """A BitMask region's imageDataURL (a PNG data URL) -> bool mask: alpha > 0, or any colour if opaque.
    The PNG's header size is checked against `max_pixels` before it is decoded (RegionTooLarge)."""
    prefix = "base64,"
    if not isinstance(data_url, str) or not data_url.startswith("data:image/") or prefix not in data_url:
        raise RegionError(f"bitmask region {rid} needs value.imageDataURL as a base64 'data:image/png' URL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit is the one that counts
            image = Image.open(io.BytesIO(base64.b64decode(data_url.split(prefix, 1)[1], validate=True)))
        check_region_canvas(image.width, image.height, max_pixels, rid)
        rgba = np.asarray(image.convert("RGBA"))
    except Image.DecompressionBombError as e:
        raise RegionTooLarge(f"bitmask region {rid}: refused before decoding ({e})") from None
    except (ValueError, OSError, binascii.Error) as e:
        if isinstance(e, RegionError):
            raise
        raise RegionError(f"bitmask region {rid}: imageDataURL is not a readable image ({e})") from None
    alpha = rgba[:, :, 3]
    return alpha > 0 if (alpha < 255).any() else rgba[:, :, :3].max(axis=2) > 0


# --- regions -> pixels -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RegionPrompt:
    """One region as a prompt, in pixels of the image it is applied to.

    Exactly one of mask (brush, polygon, ellipse), box (rectangle) and point (keypoint) is set;
    `polygon` holds the rectangle's corners when it is rotated.
    """
    type: str
    label: str | None
    positive: bool
    mask: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    radius: float = KEYPOINT_MIN_RADIUS
    polygon: np.ndarray | None = None

    def filled_mask(self, size: tuple[int, int]) -> np.ndarray:
        """The region's own area: the mask, the filled (rotated) box, or a disc around the point."""
        if self.mask is not None:
            return self.mask
        if self.polygon is not None:
            return fill_polygon(self.polygon, size)
        if self.box is not None:
            return _box_mask(self.box, size)
        assert self.point is not None
        return prompts.points_to_mask(np.array([self.point]) - 0.5, size, radius=self.radius)


def region_to_prompt(region: dict, size: tuple[int, int], max_pixels: int | None = None) -> RegionPrompt:
    """A Label Studio region -> RegionPrompt on an image of `size` = (height, width).

    A brush or bitmask canvas above region_pixel_limit(size, max_pixels) (max_pixels: MAX_IMAGE_PIXELS) raises
    RegionTooLarge before it is decoded."""
    kind = region_type(region)
    limit = region_pixel_limit(size, max_pixels)
    label = region_label(region)
    height, width = size
    value = region["value"]
    sx, sy = width / 100.0, height / 100.0
    rid = _rid(region)

    if kind == "brushlabels":
        if value.get("format", "rle") != "rle" or "rle" not in value:
            raise RegionError(f"brush region {rid} must have value.format 'rle' and value.rle")
        w0, h0 = region_size(region)
        check_region_canvas(w0, h0, limit, rid)
        mask = decode_rle(value["rle"], w0, h0, max_pixels=limit)
        if (h0, w0) != (height, width):  # drawn on a differently sized copy of the image
            mask = np.array(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
        return RegionPrompt(kind, label, True, mask=mask)

    if kind == "bitmasklabels":
        mask = decode_bitmask(value.get("imageDataURL"), rid, max_pixels=limit)
        if mask.shape != (height, width):
            mask = np.array(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
        return RegionPrompt(kind, label, True, mask=mask)

    if kind == "polygonlabels":
        points = _floats(value.get("points"), rid, "points", pairs=True)
        if not 3 <= len(points) <= MAX_POLYGON_POINTS:
            raise RegionError(f"polygon region {rid} has {len(points)} points; a polygon needs at least 3 and at most "
                              f"{MAX_POLYGON_POINTS}")
        vertices = points * np.array([sx, sy])
        return RegionPrompt(kind, label, True, mask=fill_polygon(vertices, size))

    if kind == "ellipselabels":
        cx, cy, rx, ry = (_number(value, k, rid) for k in ("x", "y", "radiusX", "radiusY"))
        if rx <= 0 or ry <= 0:
            raise RegionError(f"ellipse region {rid} has radii ({rx}, {ry}); both must be positive")
        rotation = _number(value, "rotation", rid, default=0.0)
        mask = prompts.ellipse_to_mask(cx * sx - 0.5, cy * sy - 0.5, rx * sx, ry * sy, rotation, size)
        return RegionPrompt(kind, label, True, mask=mask)

    if kind == "rectanglelabels":
        x, y, w, h = (_number(value, k, rid) for k in ("x", "y", "width", "height"))
        if w <= 0 or h <= 0:
            raise RegionError(f"rectangle region {rid} has width {w} and height {h}; both must be positive")
        rotation = _number(value, "rotation", rid, default=0.0)
        corners = rectangle_corners(x * sx, y * sy, w * sx, h * sy, rotation)
        x0, y0 = corners.min(axis=0)
        x1, y1 = corners.max(axis=0)
        box = (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))
        if not (box[2] > box[0] and box[3] > box[1]):
            raise RegionError(f"rectangle region {rid} lies outside the image")
        return RegionPrompt(kind, label, True, box=box, polygon=corners if rotation % 360 else None)

    # keypointlabels
    x, y = _number(value, "x", rid), _number(value, "y", rid)
    if not (0.0 <= x <= 100.0 and 0.0 <= y <= 100.0):  # percentages of the image, as Label Studio draws them
        raise RegionError(f"keypoint region {rid} at ({x}, {y}) % lies outside the image")
    radius = max(KEYPOINT_MIN_RADIUS, _number(value, "width", rid, default=0.0) * sx)
    return RegionPrompt(kind, label, is_positive(region), point=(x * sx, y * sy), radius=radius)


def region_to_mask(region: dict, size: tuple[int, int]) -> np.ndarray:
    """The area a region covers on an image of `size` (the filled geometry)."""
    return region_to_prompt(region, size).filled_mask(size)


def rectangle_corners(x: float, y: float, w: float, h: float, rotation_deg: float) -> np.ndarray:
    """Corners [4, 2] of a Label Studio rectangle: rotated clockwise about its top-left corner (x, y)."""
    theta = math.radians(rotation_deg)
    c, s = math.cos(theta), math.sin(theta)
    offsets = np.array([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]])
    rotated = offsets @ np.array([[c, s], [-s, c]])  # y points down, so this turns clockwise on screen
    return rotated + np.array([x, y])


# --- masks -> regions --------------------------------------------------------------------------------------

def mask_to_regions(mask: np.ndarray, label: str, control: Control, image_name: str, score: float | None = None,
                    polygon_tolerance: float = 1.5, min_area: int = 0) -> list[dict]:
    """One predicted mask -> Label Studio regions of `control`'s type.

    BrushLabels: one RLE region. RectangleLabels: the mask's bounding box. PolygonLabels: one
    polygon per connected part (outer contours, simplified by `polygon_tolerance` pixels), parts
    smaller than `min_area` pixels dropped. An empty mask gives no region.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise RegionError(f"a mask must be 2-D [H, W], got shape {mask.shape}")
    if not mask.any():
        return []
    height, width = mask.shape

    def region(value: dict, kind: str) -> dict:
        item = {"id": uuid.uuid4().hex[:10], "from_name": control.name, "to_name": image_name, "type": kind,
                "original_width": width, "original_height": height, "image_rotation": 0,
                "value": {**value, kind: [label]}}
        if score is not None:
            item["score"] = float(score)
        return item

    if control.type == "brushlabels":
        return [region({"format": "rle", "rle": encode_rle(mask)}, "brushlabels")]
    if control.type == "rectanglelabels":
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        return [region({"x": 100.0 * x0 / width, "y": 100.0 * y0 / height, "width": 100.0 * (x1 - x0) / width,
                        "height": 100.0 * (y1 - y0) / height, "rotation": 0}, "rectanglelabels")]
    if control.type == "polygonlabels":
        return [region({"points": points, "closed": True}, "polygonlabels")
                for points in mask_to_polygons(mask, polygon_tolerance, min_area)]
    raise RegionError(f"control {control.name!r} ({control.type}) cannot hold predicted masks")


def mask_to_polygons(mask: np.ndarray, tolerance: float = 1.5, min_area: int = 0) -> list[list[list[float]]]:
    """Outer contours of a mask as polygons in percent, largest first."""
    height, width = mask.shape
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    found = []
    for contour in contours:
        # Pixel count of the part, not the contour's area: a one-pixel-wide part has contour area 0.
        x, y, w, h = cv2.boundingRect(contour)
        part = np.zeros((h, w), np.uint8)
        cv2.drawContours(part, [contour - np.array([x, y])], -1, 1, thickness=cv2.FILLED)
        area = int((part.astype(bool) & mask[y:y + h, x:x + w]).sum())
        if area < max(min_area, 1):
            continue
        simplified = cv2.approxPolyDP(contour, tolerance, True) if tolerance > 0 else contour
        if len(simplified) < 3:
            simplified = contour if len(contour) >= 3 else _square_around(contour)
        vertices = simplified.reshape(-1, 2).astype(np.float64) + 0.5  # contour runs through pixel centres
        found.append((area, [[float(100.0 * vx / width), float(100.0 * vy / height)] for vx, vy in vertices]))
    found.sort(key=lambda item: -item[0])
    return [points for _, points in found]


def fill_polygon(vertices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside the closed polygon or on its edges (continuous coordinates).

    Scanline even-odd fill at each row's centre, done twice: once counting an edge that ends on the
    scanline at its lower end and once at its upper end; their union keeps the edges themselves, so
    a polygon traced through boundary pixel centres fills exactly those pixels.
    """
    height, width = size
    # percent -> pixel conversions leave 86.49999999 where 86.5 was meant: snap to 1e-6 px
    v = np.round(np.asarray(vertices, dtype=np.float64), 6)
    x0, y0 = v[:, 0], v[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    sloped = y0 != y1
    x0, y0, x1, y1 = x0[sloped], y0[sloped], x1[sloped], y1[sloped]
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    mask = np.zeros(size, dtype=bool)
    first = max(0, math.ceil(v[:, 1].min() - 0.5))
    last = min(height - 1, math.floor(v[:, 1].max() - 0.5))
    for row in range(first, last + 1):
        yc = row + 0.5
        for crossing in ((lo <= yc) & (yc < hi), (lo < yc) & (yc <= hi)):
            xs = np.sort(x0[crossing] + (yc - y0[crossing]) * (x1[crossing] - x0[crossing]) / (y1[crossing] - y0[crossing]))
            for xa, xb in zip(xs[0::2], xs[1::2]):
                c0, c1 = max(0, math.ceil(xa - 0.5)), min(width, math.floor(xb - 0.5) + 1)
                mask[row, c0:c1] = True
    return mask


# --- helpers -----------------------------------------------------------------------------------------------

def _box_mask(box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    height, width = size
    x0, y0, x1, y1 = box
    mask = np.zeros(size, dtype=bool)
    # pixel i is inside when its centre i + 0.5 is in [x0, x1]
    c0, c1 = max(0, math.ceil(x0 - 0.5)), min(width, math.floor(x1 - 0.5) + 1)
    r0, r1 = max(0, math.ceil(y0 - 0.5)), min(height, math.floor(y1 - 0.5) + 1)
    mask[r0:r1, c0:c1] = True
    return mask


def _square_around(contour: np.ndarray) -> np.ndarray:
    x, y = contour.reshape(-1, 2)[0]
    return np.array([[x - 0.5, y - 0.5], [x + 0.5, y - 0.5], [x + 0.5, y + 0.5], [x - 0.5, y + 0.5]])


def _number(value: dict, key: str, rid: str, default: float | None = None) -> float:
    raw = value.get(key, default)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise RegionError(f"region {rid}: value.{key} must be a finite number, got {raw!r}")
    return float(raw)


def _floats(raw: Any, rid: str, key: str, pairs: bool = False) -> np.ndarray:
    try:
        array = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise RegionError(f"region {rid}: value.{key} must be a list of [x, y] numbers") from None
    if pairs and (array.ndim != 2 or array.shape[1] != 2) or not np.all(np.isfinite(array)):
        raise RegionError(f"region {rid}: value.{key} must be a list of [x, y] numbers, got shape {array.shape}")
    return array


def _rid(region: Any) -> str:
    if isinstance(region, dict):
        return repr(region.get("id", "?"))
    return "?"
