import math

import numpy as np
import pytest

from dinov.data.scenes import (
    COLOURS,
    KINDS,
    MAX_COVER,
    NUM_CLASSES,
    RING_INNER,
    SceneDataset,
    circumradius,
    class_colour,
    class_id,
    class_names,
    generate_scene,
    masks_to_boxes,
    place_objects,
    shape_mask,
    visible_parts,
)

SEEDS = range(40)


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(s) for s in SEEDS]


def test_class_names_are_the_30_kind_colour_pairs():
    names = class_names()
    assert len(names) == NUM_CLASSES == 30 and len(set(names)) == 30
    assert names[0] == "red circle" and names[29] == "cyan ring"
    for kind in KINDS:
        for colour in COLOURS:
            i = class_id(kind, colour)
            assert names[i] == f"{colour} {kind}"
            assert class_colour(i) == COLOURS[colour]
    assert COLOURS["magenta"] == (200, 50, 200) and COLOURS["cyan"] == (40, 200, 210)
    with pytest.raises(ValueError, match="unknown shape"):
        class_id("hexagon", "red")


def test_same_seed_same_scene_other_seed_other_scene():
    a, b, c = generate_scene(5), generate_scene(5), generate_scene(6)
    for field in ("image", "masks", "classes", "boxes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_sizes_counts_and_types_are_in_the_specified_ranges(scenes):
    counts = []
    for sc in scenes:
        h, w, _ = sc.image.shape
        assert 128 <= h <= 512 and 128 <= w <= 512
        assert sc.image.dtype == np.uint8 and sc.masks.dtype == bool
        assert 1 <= sc.num_instances <= 10
        assert sc.classes.min() >= 0 and sc.classes.max() < NUM_CLASSES
        counts.append(sc.num_instances)
    # the counts really vary over the whole range, not just a few values
    assert min(counts) <= 2 and max(counts) >= 9
    assert len({sc.image.shape for sc in scenes}) > 30


def test_masks_are_exactly_the_pixels_drawn_in_each_colour(scenes):
    colours = np.array([COLOURS[c] for c in COLOURS])
    for sc in scenes:
        union = np.zeros(sc.image.shape[:2], dtype=bool)
        for mask, label in zip(sc.masks, sc.classes):
            assert mask.sum() > 0
            assert not (mask & union).any(), "visible parts must not overlap"
            union |= mask
            assert (sc.image[mask] == class_colour(label)).all()
        # every pixel painted in an object colour belongs to some mask (and only there)
        painted = (sc.image[:, :, None, :] == colours[None, None]).all(-1).any(-1)
        np.testing.assert_array_equal(painted, union)
        # the background is grey: R == G == B everywhere outside the objects
        bg = sc.image[~union]
        assert (bg[:, 0] == bg[:, 1]).all() and (bg[:, 1] == bg[:, 2]).all()


def test_boxes_are_the_tight_boxes_of_the_masks(scenes):
    for sc in scenes[:10]:
        for mask, box in zip(sc.masks, sc.boxes):
            ys, xs = np.nonzero(mask)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert masks_to_boxes(np.zeros((1, 4, 4), bool)).tolist() == [[0, 0, 0, 0]]


def test_background_is_noisy_mid_grey():
    sc = generate_scene(0, size=256, num_objects=0)
    assert sc.num_instances == 0
    grey = sc.image[:, :, 0].astype(float)
    assert abs(grey.mean() - 128) < 5
    # the gradient adds a little spread on top of the noise (sigma 20)
    assert 18 < grey.std() < 26
    # neighbouring pixels are not smoothed: their difference has the spread of independent noise
    assert np.diff(grey, axis=1).std() == pytest.approx(20 * math.sqrt(2), rel=0.1)


@pytest.mark.parametrize("kind, expected_area", [
    ("circle", math.pi * 40**2),
    ("ring", math.pi * 40**2 * (1 - RING_INNER**2)),
    ("square", 80.0**2),
    ("triangle", math.sqrt(3) / 4 * 80**2),
    # a regular pentagram of outer radius R has area 10 * (1/2) * R * r * sin(36 deg)
    ("star", 10 * 0.5 * 40 * 40 * 0.381966 * math.sin(math.radians(36))),
])
def test_shape_areas_and_extent(kind, expected_area):
    for angle in (0.0, 0.7, 2.0):
        mask = shape_mask(kind, (100.3, 90.6), 80.0, angle, (200, 220))
        assert mask.sum() == pytest.approx(expected_area, rel=0.03)
        ys, xs = np.nonzero(mask)
        # the whole shape fits in the circle of its circumradius around the centre
        assert ((xs + 0.5 - 100.3) ** 2 + (ys + 0.5 - 90.6) ** 2).max() <= circumradius(kind, 80.0) ** 2 + 1e-6
    if kind in ("circle", "square"):
        axis_aligned = shape_mask(kind, (100.0, 90.0), 80.0, 0.0, (200, 220))
        ys, xs = np.nonzero(axis_aligned)
        assert xs.max() - xs.min() + 1 == 80 and ys.max() - ys.min() + 1 == 80
    if kind == "ring":
        assert not shape_mask(kind, (100.0, 90.0), 80.0, 0.0, (200, 220))[90, 100]  # the hole


def test_placement_obeys_the_overlap_rules():
    placed = 0
    for seed in range(15):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, NUM_CLASSES, size=10)
        size = (int(rng.integers(128, 513)), int(rng.integers(128, 513)))
        shapes, kept = place_objects(rng, size, labels)
        placed += len(shapes)
        visible = visible_parts(shapes, size)
        for i, shape in enumerate(shapes):
            shorter = min(size)
            earlier = np.zeros(size, bool)
            for s in shapes[:i]:
                earlier |= s
            assert (shape & earlier).sum() <= MAX_COVER * shape.sum()
            # no instance is hidden by more than half by the ones drawn later
            assert visible[i].sum() >= 0.5 * shape.sum()
            # extent 10-35 % of the shorter side: the area lies between a small triangle and a big square
            assert math.sqrt(3) / 4 * (0.1 * shorter) ** 2 * 0.9 <= shape.sum() <= (0.35 * shorter) ** 2 * 1.05
        assert all(kept[i] == labels[i] for i in range(len(kept))) or len(kept) < len(labels)
    assert placed >= 100  # almost every object finds a place


def test_later_objects_hide_earlier_ones():
    a = np.zeros((4, 4), bool)
    a[:, :3] = True
    b = np.zeros((4, 4), bool)
    b[:, 2:] = True
    vis = visible_parts([a, b], (4, 4))
    assert vis[0].sum() == 8 and vis[1].sum() == 8 and not vis[0][:, 2].any()


def test_dataset_and_arguments():
    ds = SceneDataset(range(100, 104), size=(160, 200), num_objects=(2, 3), classes=[0, 7])
    assert len(ds) == 4 and ds.class_names == class_names()
    items = list(ds)
    assert len(items) == 4
    for sc, seed in zip(items, range(100, 104)):
        assert sc.image.shape == (160, 200, 3)
        assert 1 <= sc.num_instances <= 3
        assert set(sc.classes.tolist()) <= {0, 7}
        np.testing.assert_array_equal(sc.image, generate_scene(seed, (160, 200), (2, 3), classes=[0, 7]).image)
    assert generate_scene(1, 128, 4).num_instances <= 4
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ValueError, match="num_objects"):
        generate_scene(0, num_objects=-1)
    with pytest.raises(ValueError, match="classes"):
        generate_scene(0, classes=[30])
    with pytest.raises(ValueError, match="size"):
        generate_scene(0, size=(8, 8))
