"""Label Studio regions <-> masks, checked against label_studio_sdk.converter.brush and known geometry."""

import math

import numpy as np
import pytest
from label_studio_sdk.converter import brush

from labelstudio_backend.labelstudio.label_config import Control
from labelstudio_backend.labelstudio.regions import (
    RegionError,
    decode_rle,
    encode_rle,
    is_positive,
    mask_to_regions,
    rectangle_corners,
    region_label,
    region_to_mask,
    region_to_prompt,
)

BRUSH = Control("mask", "brushlabels", ("cat", "dog"), False)
POLYGON = Control("poly", "polygonlabels", ("cat", "dog"), False)
RECTANGLE = Control("box", "rectanglelabels", ("cat", "dog"), False)


def blobs(height=60, width=80, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), bool)
    mask[5:20, 10:35] = True
    yy, xx = np.mgrid[:height, :width]
    mask |= (yy - 40) ** 2 + (xx - 55) ** 2 < 12 ** 2
    mask |= rng.random((height, width)) < 0.02  # isolated pixels: many short runs
    return mask


def region(kind, value, width=200, height=100, **extra):
    return {"id": "r1", "type": kind, "value": value, "original_width": width, "original_height": height,
            "from_name": "x", "to_name": "img", **extra}


# --- RLE --------------------------------------------------------------------------------------------------

def test_encode_matches_the_sdk_decoder():
    mask = blobs()
    flat = brush.decode_rle(encode_rle(mask))
    canvas = np.asarray(flat).reshape(60, 80, 4)
    assert np.array_equal(canvas[:, :, 3] == 255, mask)
    assert np.array_equal(canvas[:, :, 3] == 0, ~mask)


def _sdk_mask_rle(mask: np.ndarray) -> list[int]:
    return [int(v) for v in brush.mask2rle(mask.astype(np.uint8) * 255)]


def test_encode_equals_the_sdk_encoder_byte_for_byte_on_300_random_masks():
    rng = np.random.default_rng(22)
    for i in range(300):
        height, width = (int(v) for v in rng.integers(1, 150, 2))
        kind = i % 5
        if kind == 0:  # noise of any density: many runs of every length
            mask = rng.random((height, width)) < rng.random()
        elif kind == 1:  # a few rectangles
            mask = np.zeros((height, width), bool)
            for _ in range(int(rng.integers(1, 4))):
                y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
                mask[y0 : y0 + int(rng.integers(1, 60)), x0 : x0 + int(rng.integers(1, 60))] = True
        elif kind == 2:  # all or nothing: one run
            mask = np.full((height, width), bool(i % 2))
        elif kind == 3:
            mask = blobs(height, width, seed=i)
        else:  # one pixel flipped
            mask = np.zeros((height, width), bool)
            mask.flat[int(rng.integers(0, mask.size))] = True
        assert encode_rle(mask) == _sdk_mask_rle(mask), (i, height, width)


@pytest.mark.parametrize("shape", [(128, 128), (64, 256), (128, 257), (300, 700), (16384, 1), (16385, 1)])
def test_encode_equals_the_sdk_on_runs_longer_than_the_16_bit_field(shape):
    # canvas runs of 4 * H * W values: several 2**16-long tokens and a remainder
    full = np.ones(shape, bool)
    split = full.copy()
    split.flat[full.size // 2] = False
    for mask in (full, ~full, split, ~split):
        assert encode_rle(mask) == _sdk_mask_rle(mask)


def test_empty_mask_shape_is_refused():
    with pytest.raises(RegionError, match="at least one pixel"):
        encode_rle(np.zeros((0, 5), bool))


def test_decode_reads_sdk_encoded_masks():
    mask = blobs(seed=1)
    rle = brush.mask2rle(mask.astype(np.uint8) * 255)
    assert np.array_equal(decode_rle(rle, 80, 60), mask)


def test_decode_takes_the_alpha_channel_of_a_coloured_canvas():
    # Label Studio's editor paints the label colour in RGB; only alpha says where the mask is.
    mask = blobs(seed=2)
    canvas = np.zeros((60, 80, 4), np.uint8)
    canvas[mask] = (255, 0, 128, 255)
    canvas[~mask] = (255, 0, 128, 0)  # colour without alpha is not mask
    rle = brush.encode_rle(canvas.ravel().astype(int))
    assert np.array_equal(decode_rle(rle, 80, 60), mask)


@pytest.mark.parametrize("bad, message", [
    ("abc", "list"),
    ([1, 2, 3], "at least 7"),
    ([0, 0, 0, 16, 7, 300, 1, 1], r"\[0, 255\]"),
    ([0.5] * 10, r"\[0, 255\]"),
])
def test_malformed_rle_values(bad, message):
    with pytest.raises(RegionError, match=message):
        decode_rle(bad, 2, 2)


def test_rle_of_another_size_is_refused():
    rle = encode_rle(np.ones((10, 10), bool))
    with pytest.raises(RegionError, match="original_width/original_height do not match"):
        decode_rle(rle, 20, 10)


def test_truncated_rle_is_refused():
    rle = encode_rle(blobs())
    with pytest.raises(RegionError, match="malformed"):
        decode_rle(rle[: len(rle) // 2], 80, 60)


def test_brush_region_on_a_resized_copy_is_rescaled():
    mask = np.zeros((50, 100), bool)
    mask[10:30, 20:60] = True
    r = region("brushlabels", {"format": "rle", "rle": encode_rle(mask), "brushlabels": ["cat"]}, 100, 50)
    big = region_to_mask(r, (100, 200))
    assert big.shape == (100, 200)
    assert big.sum() == 4 * mask.sum()
    assert big[20:60, 40:120].all()


# --- regions -> pixels ------------------------------------------------------------------------------------

def test_rectangle_percent_to_pixels():
    r = region("rectanglelabels", {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0,
                                   "rectanglelabels": ["dog"]})
    prompt = region_to_prompt(r, (100, 200))
    assert prompt.label == "dog" and prompt.polygon is None
    assert prompt.box == pytest.approx((20, 20, 80, 60))
    mask = prompt.filled_mask((100, 200))
    assert mask.sum() == 60 * 40 and mask[20:60, 20:80].all()


def test_rectangle_rotates_clockwise_about_its_top_left_corner():
    corners = rectangle_corners(50, 20, 40, 10, 90)
    # 90 degrees clockwise on screen (y down): the width now points down, the height to the left
    assert corners == pytest.approx(np.array([[50, 20], [50, 60], [40, 60], [40, 20]]))
    r = region("rectanglelabels", {"x": 25, "y": 20, "width": 20, "height": 10, "rotation": 90})
    prompt = region_to_prompt(r, (100, 200))
    assert prompt.box == pytest.approx((40, 20, 50, 60))
    mask = prompt.filled_mask((100, 200))
    assert abs(int(mask.sum()) - 10 * 40) <= 2 * (10 + 40)  # within one pixel ring of the exact area
    assert mask[25:55, 42:48].all() and not mask[:, :38].any() and not mask[:, 52:].any()


def test_polygon_fills_exactly_the_pixels_inside():
    r = region("polygonlabels", {"points": [[10, 10], [30, 10], [30, 50], [10, 50]], "polygonlabels": ["cat"]})
    mask = region_to_mask(r, (100, 200))
    expected = np.zeros((100, 200), bool)
    expected[10:50, 20:60] = True
    assert np.array_equal(mask, expected)


def test_ellipse_area():
    r = region("ellipselabels", {"x": 50, "y": 50, "radiusX": 20, "radiusY": 30, "rotation": 30,
                                 "ellipselabels": ["cat"]})
    mask = region_to_mask(r, (100, 200))
    assert mask.sum() == pytest.approx(math.pi * 40 * 30, rel=0.03)
    assert mask[50, 100] and not mask[50, 150]


def test_keypoints_keep_their_sign():
    positive = region("keypointlabels", {"x": 25, "y": 50, "width": 1, "keypointlabels": ["cat"]})
    negative = dict(positive, is_positive=False)
    assert is_positive(positive) and not is_positive(negative)
    prompt = region_to_prompt(negative, (100, 200))
    assert prompt.point == pytest.approx((50, 50)) and prompt.positive is False
    disc = prompt.filled_mask((100, 200))
    assert disc[49, 49] and disc.sum() < 100


@pytest.mark.parametrize("bad, message", [
    ({"id": 7, "type": "choices", "value": {}}, "supported"),
    (region("polygonlabels", {"points": [[1, 1], [2, 2]]}), "at least 3"),
    (region("polygonlabels", {"points": "nope"}), r"\[x, y\]"),
    (region("rectanglelabels", {"x": 1, "y": 1, "width": -3, "height": 2}), "positive"),
    (region("rectanglelabels", {"x": "1", "y": 1, "width": 3, "height": 2}), "finite number"),
    (region("keypointlabels", {"x": float("nan"), "y": 1}), "finite number"),
    (region("keypointlabels", {"x": 1e9, "y": -1e9}), "outside the image"),
    (region("brushlabels", {"format": "png", "rle": []}), "rle"),
    ({"id": 1, "type": "brushlabels", "value": {"format": "rle", "rle": [0] * 8}}, "original_width"),
    (region("rectanglelabels", {"x": 1, "y": 1, "width": 1, "height": 1, "rectanglelabels": "cat"}), "list of label"),
])
def test_bad_regions_raise_region_error(bad, message):
    with pytest.raises(RegionError, match=message):
        region_label(bad)
        region_to_prompt(bad, (100, 200))


def test_region_error_is_a_value_error():
    assert issubclass(RegionError, ValueError)


# --- masks -> regions -------------------------------------------------------------------------------------

def test_brush_output_round_trips():
    mask = blobs(seed=3)
    (out,) = mask_to_regions(mask, "cat", BRUSH, "img", score=0.75)
    assert out["type"] == "brushlabels" and out["from_name"] == "mask" and out["to_name"] == "img"
    assert out["value"]["brushlabels"] == ["cat"] and out["score"] == 0.75
    assert (out["original_width"], out["original_height"]) == (80, 60)
    assert np.array_equal(region_to_mask(out, (60, 80)), mask)


def test_rectangle_output_is_the_mask_box():
    mask = np.zeros((50, 100), bool)
    mask[10:20, 30:70] = True
    (out,) = mask_to_regions(mask, "dog", RECTANGLE, "img", score=0.5)
    assert out["value"]["rectanglelabels"] == ["dog"]
    assert [out["value"][k] for k in ("x", "y", "width", "height")] == pytest.approx([30, 20, 40, 20])
    assert np.array_equal(region_to_mask(out, (50, 100)), mask)


def test_polygon_output_one_region_per_part_small_parts_dropped():
    mask = np.zeros((100, 120), bool)
    mask[10:40, 10:50] = True          # 1200 px
    yy, xx = np.mgrid[:100, :120]
    mask |= (yy - 70) ** 2 + (xx - 80) ** 2 < 20 ** 2  # ~1250 px
    mask[90:92, 5:7] = True            # 4 px: below min_area
    outs = mask_to_regions(mask, "cat", POLYGON, "img", score=0.9, polygon_tolerance=0.0, min_area=10)
    assert len(outs) == 2
    back = np.zeros_like(mask)
    for out in outs:
        assert out["type"] == "polygonlabels" and out["value"]["closed"] is True
        back |= region_to_mask(out, mask.shape)
    kept = mask.copy()
    kept[90:92, 5:7] = False
    assert np.array_equal(back, kept)


def test_polygon_simplification_keeps_the_shape_with_fewer_points():
    yy, xx = np.mgrid[:200, :200]
    disc = (yy - 100) ** 2 + (xx - 100) ** 2 < 70 ** 2
    exact = mask_to_regions(disc, "cat", POLYGON, "img", polygon_tolerance=0.0)[0]
    simple = mask_to_regions(disc, "cat", POLYGON, "img", polygon_tolerance=1.5)[0]
    assert len(simple["value"]["points"]) < len(exact["value"]["points"]) / 4
    back = region_to_mask(simple, disc.shape)
    iou = (back & disc).sum() / (back | disc).sum()
    assert iou > 0.97


def test_empty_mask_gives_no_region():
    assert mask_to_regions(np.zeros((5, 5), bool), "cat", BRUSH, "img") == []


def test_geometry_only_types_and_bitmasks():
    # a <Rectangle> + <Labels> config gives type "rectangle" without a label on the item itself
    r = region("rectangle", {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0})
    assert region_label(r) is None
    assert region_to_mask(r, (100, 200)).sum() == 60 * 40
    # BitMask regions: a PNG data URL whose alpha is the mask
    import base64
    import io

    from PIL import Image

    mask = blobs(seed=4)
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[mask] = (0, 200, 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    r = region("bitmasklabels", {"imageDataURL": url, "bitmasklabels": ["cat"]}, 80, 60)
    assert region_label(r) == "cat"
    assert np.array_equal(region_to_mask(r, (60, 80)), mask)
    with pytest.raises(RegionError, match="imageDataURL"):
        region_to_mask(region("bitmasklabels", {"imageDataURL": "data:image/png;base64,!!!"}), (60, 80))
