"""Generated scenes: flat-coloured shapes on a noisy grey background, deterministic by seed.

Used to train and test DINOv without downloads. A class is a (kind, colour) pair: five kinds times
six colours give 30 classes, numbered kind-major (``class_id = kind_index * 6 + colour_index``), so
``class_names()[0] == "red circle"`` and ``class_names()[29] == "cyan ring"``.

Every object is an instance whose mask is its visible part (later objects hide earlier ones). Shapes
are rasterised by testing pixel centres, without anti-aliasing, so a mask is exactly the set of pixels
painted in the object's colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import numpy.typing as npt

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
NUM_CLASSES = len(KINDS) * len(COLOURS)
# Kinds that the 30 classes (and so the demo model's training) never use: drawn only by generate_extra_scene,
# for tests of what fine-tuning on a project's own labels adds.
EXTRA_KINDS: tuple[str, ...] = ("hexagon", "cross")
# and colours the 30 classes never use either: an orange hexagon, a white cross
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {"hexagon": (235, 140, 30), "cross": (240, 240, 240)}
CROSS_ARM = 1 / 3  # arm width of a cross, as a fraction of its extent
# Extra scenes are what a project's annotators outline: objects apart (flat shapes of one colour that overlap show
# no edge between them, so nobody could outline them separately) and large enough for a cross's arms to span a
# few cells of the demo model's stride-4 masks.
EXTRA_EXTENT = (0.20, 0.35)

MIN_SIZE, MAX_SIZE = 128, 512
MIN_EXTENT, MAX_EXTENT = 0.10, 0.35  # diameter or side, as a fraction of the shorter image side
MAX_COVER = 0.30  # a new object may lie over earlier ones with at most this fraction of its area
RING_INNER = 0.5  # inner / outer diameter of a ring
# inner / outer radius of a regular five-point star (pentagram): sin(18 deg) / sin(54 deg)
STAR_INNER = math.sin(math.radians(18)) / math.sin(math.radians(54))
BACKGROUND_MEAN, BACKGROUND_SIGMA = 128.0, 20.0
MAX_GRADIENT = 30.0  # the background gradient adds at most +-this much grey at the image corners


@dataclass
class Scene:
    """One image with its instances (also the sample format of the real-data loaders).

    image: uint8 [H, W, 3] RGB; masks: bool [N, H, W] (visible parts); classes: int64 [N];
    boxes: float32 [N, 4] (x0, y0, x1, y1) in pixels, the tight box of each mask (x1, y1 exclusive).
    """

    image: np.ndarray
    masks: np.ndarray
    classes: np.ndarray
    boxes: np.ndarray
    # bool [N]: whether instance i's mask is its outline (False: only its box is known, as a Label Studio
    # rectangle, and masks[i] is the filled box); None: every mask is an outline
    has_mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 [H, W, 3], got {self.image.dtype} {self.image.shape}")
        n = len(self.classes)
        if self.masks.shape != (n, *self.image.shape[:2]) or self.masks.dtype != bool:
            raise ValueError(
                f"masks must be bool [{n}, {self.image.shape[0]}, {self.image.shape[1]}], "
                f"got {self.masks.dtype} {self.masks.shape}"
            )
        if self.boxes.shape != (n, 4):
            raise ValueError(f"boxes must be [{n}, 4], got {self.boxes.shape}")

    @property
    def num_instances(self) -> int:
        return len(self.classes)


def class_names() -> list[str]:
    """The 30 class names in class-id order: "red circle", "green circle", ..., "cyan ring"."""
    return [f"{colour} {kind}" for kind in KINDS for colour in COLOUR_NAMES]


def class_id(kind: str, colour: str) -> int:
    if kind not in KINDS or colour not in COLOURS:
        raise ValueError(f"unknown shape {colour!r} {kind!r}; kinds are {KINDS}, colours are {COLOUR_NAMES}")
    return KINDS.index(kind) * len(COLOURS) + COLOUR_NAMES.index(colour)


def class_colour(class_index: int) -> tuple[int, int, int]:
    """The RGB fill colour of a class."""
    return COLOURS[COLOUR_NAMES[class_index % len(COLOURS)]]


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes (x0, y0, x1, y1), x1 and y1 exclusive, of bool masks [N, H, W]; zeros for empty masks."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if len(rows):
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def _polygon_mask(vertices: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of the points (xs, ys) against a closed polygon [K, 2]."""
    inside = np.zeros(np.broadcast(xs, ys).shape, dtype=bool)
    x0, y0 = vertices[:, 0], vertices[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for ax, ay, bx, by in zip(x0, y0, x1, y1):
        if ay == by:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (ay > ys) != (by > ys)
        x_at_y = ax + (ys - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (xs < x_at_y)
    return inside


def polygon_mask(vertices: npt.ArrayLike, size: tuple[int, int]) -> np.ndarray:
    """Bool [H, W] mask of a polygon given as [K, 2] (x, y) pixel coordinates (pixel (i, j) spans
    [j, j + 1) x [i, i + 1)): the pixels whose centre lies inside, by the even-odd rule."""
    vertices = np.asarray(vertices, dtype=np.float64).reshape(-1, 2)
    height, width = size
    mask = np.zeros((height, width), dtype=bool)
    if len(vertices) < 3:
        return mask
    x_lo = max(0, int(math.floor(vertices[:, 0].min())))
    x_hi = min(width, int(math.ceil(vertices[:, 0].max())) + 1)
    y_lo = max(0, int(math.floor(vertices[:, 1].min())))
    y_hi = min(height, int(math.ceil(vertices[:, 1].max())) + 1)
    if x_lo >= x_hi or y_lo >= y_hi:
        return mask
    xs = np.arange(x_lo, x_hi, dtype=np.float64)[None, :] + 0.5
    ys = np.arange(y_lo, y_hi, dtype=np.float64)[:, None] + 0.5
    mask[y_lo:y_hi, x_lo:x_hi] = _polygon_mask(vertices, xs, ys)
    return mask


def _star_vertices(radius: float, angle: float) -> np.ndarray:
    k = np.arange(10)
    r = np.where(k % 2 == 0, radius, radius * STAR_INNER)
    # the first tip points up (negative y) before rotation
    a = angle - math.pi / 2 + k * math.pi / 5
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _regular_polygon(num_sides: int, radius: float, angle: float) -> np.ndarray:
    a = angle - math.pi / 2 + np.arange(num_sides) * 2 * math.pi / num_sides
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def circumradius(kind: str, extent: float) -> float:
    """Radius of the smallest circle around the shape's centre containing a shape of this extent."""
    if kind in ("circle", "ring", "star"):
        return extent / 2
    if kind == "square":
        return extent / math.sqrt(2)
    if kind == "triangle":
        return extent / math.sqrt(3)  # equilateral, side = extent
    if kind == "hexagon":
        return extent / 2
    if kind == "cross":
        return extent / 2 * math.hypot(1, CROSS_ARM)
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def shape_mask(kind: str, center: tuple[float, float], extent: float, angle: float,
               size: tuple[int, int]) -> np.ndarray:
    """Bool [H, W] mask of a whole shape: pixel (row i, col j) is in when its centre (j+0.5, i+0.5) is.

    extent is the diameter (circle, ring, star tips) or the side (square, triangle), in pixels;
    angle is the rotation in radians.
    """
    height, width = size
    cx, cy = center
    r = circumradius(kind, extent)
    # only test pixels inside the shape's bounding square
    x_lo, x_hi = max(0, int(math.floor(cx - r))), min(width, int(math.ceil(cx + r)) + 1)
    y_lo, y_hi = max(0, int(math.floor(cy - r))), min(height, int(math.ceil(cy + r)) + 1)
    mask = np.zeros((height, width), dtype=bool)
    if x_lo >= x_hi or y_lo >= y_hi:
        return mask
    xs = np.arange(x_lo, x_hi, dtype=np.float64)[None, :] + 0.5 - cx
    ys = np.arange(y_lo, y_hi, dtype=np.float64)[:, None] + 0.5 - cy
    if kind in ("circle", "ring"):
        d2 = xs**2 + ys**2
        inside = d2 <= r**2
        if kind == "ring":
            inside &= d2 > (r * RING_INNER) ** 2
    elif kind == "star":
        inside = _polygon_mask(_star_vertices(r, angle), xs, ys)
    elif kind == "square":
        inside = _polygon_mask(_regular_polygon(4, r, angle + math.pi / 4), xs, ys)
    elif kind == "hexagon":
        inside = _polygon_mask(_regular_polygon(6, r, angle), xs, ys)
    elif kind == "cross":
        u = xs * math.cos(angle) + ys * math.sin(angle)
        v = -xs * math.sin(angle) + ys * math.cos(angle)
        half, arm = extent / 2, extent * CROSS_ARM / 2
        inside = ((np.abs(u) <= half) & (np.abs(v) <= arm)) | ((np.abs(v) <= half) & (np.abs(u) <= arm))
    else:
        inside = _polygon_mask(_regular_polygon(3, r, angle), xs, ys)
    mask[y_lo:y_hi, x_lo:x_hi] = inside
    return mask


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    grey = rng.normal(BACKGROUND_MEAN, BACKGROUND_SIGMA, size=(height, width))
    theta = rng.uniform(0, 2 * math.pi)
    amplitude = rng.uniform(0, MAX_GRADIENT)
    xs = np.arange(width)[None, :] + 0.5 - width / 2
    ys = np.arange(height)[:, None] + 0.5 - height / 2
    along = xs * math.cos(theta) + ys * math.sin(theta)
    grey = grey + amplitude * along / max(np.abs(along).max(), 1e-6)
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _resolve_size(rng: np.random.Generator, size: int | tuple[int, int] | None) -> tuple[int, int]:
    if size is None:
        return int(rng.integers(MIN_SIZE, MAX_SIZE + 1)), int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"size must be an int or (height, width) of at least 16 px, got {size!r}")
    return int(size[0]), int(size[1])


def _resolve_count(rng: np.random.Generator, num_objects: int | tuple[int, int] | None) -> int:
    if num_objects is None:
        num_objects = (1, 10)
    if isinstance(num_objects, (int, np.integer)):
        lo = hi = int(num_objects)
    else:
        lo, hi = (int(v) for v in num_objects)
    if lo < 0 or hi < lo:
        raise ValueError(f"num_objects must be an int >= 0 or a (min, max) range, got {num_objects!r}")
    return int(rng.integers(lo, hi + 1))


def place_objects(rng: np.random.Generator, size: tuple[int, int], labels: Sequence[int] | np.ndarray, *,
                  min_visible: float = 0.5, max_tries: int = 100, kinds: Sequence[str] | None = None,
                  extent: tuple[float, float] = (MIN_EXTENT, MAX_EXTENT),
                  max_cover: float = MAX_COVER) -> tuple[list[np.ndarray], list[int]]:
    """Place one object per label, in order; returns the whole shapes (bool [H, W]) and their labels.

    Each object's size (extent: its range as fractions of the shorter side), rotation and position are drawn until
    it lies over earlier objects with at most ``max_cover`` of its own area and leaves every earlier object at least
    ``min_visible`` of its area visible; an object that fails ``max_tries`` draws is left out. kinds: the kind of
    label i is kinds[i] (default: the kind of class id i).
    """
    height, width = size
    shorter = min(height, width)
    shapes: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    kept: list[int] = []
    occupied = np.zeros((height, width), dtype=bool)
    for label in labels:
        kind = kinds[int(label)] if kinds is not None else KINDS[int(label) // len(COLOURS)]
        for _ in range(max_tries):
            side = rng.uniform(*extent) * shorter
            angle = rng.uniform(0, 2 * math.pi)
            r = circumradius(kind, side)
            center = (rng.uniform(r, width - r), rng.uniform(r, height - r))
            mask = shape_mask(kind, center, side, angle, (height, width))
            area = int(mask.sum())
            if area == 0 or (mask & occupied).sum() > max_cover * area:
                continue
            if any((v & ~mask).sum() < min_visible * s.sum() for v, s in zip(visible, shapes)):
                continue
            for v in visible:
                v &= ~mask
            shapes.append(mask)
            visible.append(mask.copy())
            kept.append(int(label))
            occupied |= mask
            break
    return shapes, kept


def visible_parts(shapes: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Bool [N, H, W]: the part of each shape not hidden by the shapes drawn after it."""
    masks = np.zeros((len(shapes), *size), dtype=bool)
    hidden = np.zeros(size, dtype=bool)
    for i in range(len(shapes) - 1, -1, -1):
        masks[i] = shapes[i] & ~hidden
        hidden |= shapes[i]
    return masks


def generate_scene(seed: int, size: int | tuple[int, int] | None = None,
                   num_objects: int | tuple[int, int] | None = None, *,
                   classes: Sequence[int] | None = None, min_visible: float = 0.5,
                   max_tries: int = 100) -> Scene:
    """Draw the scene of ``seed`` (the same arguments always give the same scene).

    size: (height, width), an int for a square, or None for a random 128-512 px per side.
    num_objects: a count, an inclusive (min, max) range, or None for 1-10. Objects that cannot be
    placed within the overlap rules after ``max_tries`` draws are left out, so a crowded scene may
    hold fewer (never fewer than one when at least one is asked for).
    classes: the class ids objects are drawn from (default: all 30).
    min_visible: besides the rule that a new object may cover earlier ones with at most 30 % of its
    own area, it may not leave any earlier object with less than this fraction of that object's area
    visible, so that no instance vanishes.
    """
    rng = np.random.default_rng(seed)
    height, width = _resolve_size(rng, size)
    count = _resolve_count(rng, num_objects)
    pool = np.arange(NUM_CLASSES) if classes is None else np.asarray(classes, dtype=np.int64)
    if len(pool) == 0 or pool.min() < 0 or pool.max() >= NUM_CLASSES:
        raise ValueError(f"classes must be a non-empty list of ids in [0, {NUM_CLASSES}), got {classes!r}")

    image = _background(rng, height, width)
    labels = rng.choice(pool, size=count)
    shapes, kept = place_objects(rng, (height, width), labels, min_visible=min_visible, max_tries=max_tries)
    masks = visible_parts(shapes, (height, width))
    for mask, label in zip(masks, kept):
        image[mask] = class_colour(label)
    return Scene(image=image, masks=masks, classes=np.asarray(kept, dtype=np.int64),
                 boxes=masks_to_boxes(masks))


def generate_extra_scene(seed: int, size: int | tuple[int, int] | None = None,
                         num_objects: int | tuple[int, int] | None = (2, 6),
                         kinds: Sequence[str] = EXTRA_KINDS) -> Scene:
    """A scene of the extra kinds only (default: orange hexagons and white crosses), class i being kinds[i], never
    used by generate_scene: its background, with objects that do not overlap, each 0.2-0.35 of the shorter side."""
    unknown = set(kinds) - set(EXTRA_KINDS)
    if not kinds or unknown:
        raise ValueError(f"kinds must be some of {EXTRA_KINDS}, got {list(kinds)}")
    rng = np.random.default_rng(seed)
    height, width = _resolve_size(rng, size)
    count = _resolve_count(rng, num_objects)
    image = _background(rng, height, width)
    labels = rng.integers(0, len(kinds), size=count)
    shapes, kept = place_objects(rng, (height, width), labels, kinds=kinds, extent=EXTRA_EXTENT, max_cover=0.0)
    masks = visible_parts(shapes, (height, width))
    for mask, label in zip(masks, kept):
        image[mask] = EXTRA_COLOURS[kinds[label]]
    return Scene(image=image, masks=masks, classes=np.asarray(kept, dtype=np.int64), boxes=masks_to_boxes(masks))


class SceneDataset(Sequence[Scene]):
    """The scenes of a range (or list) of seeds; item i is ``generate_scene(seeds[i], ...)``.

    A plain sequence, so it also works as a map-style ``torch.utils.data.Dataset``.
    """

    def __init__(self, seeds: Sequence[int], size: int | tuple[int, int] | None = None,
                 num_objects: int | tuple[int, int] | None = None,
                 classes: Sequence[int] | None = None) -> None:
        self.seeds = seeds
        self.size = size
        self.num_objects = num_objects
        self.classes = classes

    @property
    def class_names(self) -> list[str]:
        return class_names()

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> Scene:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"scene index {index} out of range for {len(self)} seeds")
        return generate_scene(int(self.seeds[index]), self.size, self.num_objects, classes=self.classes)

    def __iter__(self) -> Iterator[Scene]:
        for i in range(len(self)):
            yield self[i]
