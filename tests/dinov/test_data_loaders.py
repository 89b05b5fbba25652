import json
import math

import numpy as np
import pytest
from label_studio_sdk.converter import brush
from PIL import Image

from dinov.data import Scene, load_coco, load_labelstudio_export, write_coco, write_labelstudio_export
from dinov.data.coco import decode_rle_string, encode_rle_string, mask_to_rle, rle_to_mask
from dinov.data.labelstudio_export import find_image
from dinov.data.scenes import class_names, generate_scene

H, W = 50, 100  # the hand-made image: 100 px wide, 50 px high


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(s, size=(96, 128), num_objects=(2, 4)) for s in range(3)]


def _save_image(path, height=H, width=W, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def _region(type_, value, labels=None, rid="r", size=(H, W)):
    value = dict(value)
    if labels is not None:
        value[type_] = labels
    return {"id": rid, "type": type_, "from_name": "tag", "to_name": "image", "value": value,
            "original_height": size[0], "original_width": size[1]}


def _task(tid, image, results, **annotation):
    return {"id": tid, "data": {"image": image},
            "annotations": [{"id": tid, "was_cancelled": False, "result": results, **annotation}]}


# ---------------------------------------------------------------------------------------------
# Label Studio


def test_labelstudio_brush_export_round_trip(tmp_path, scenes):
    path = write_labelstudio_export(scenes, class_names(), tmp_path)
    ds = load_labelstudio_export(path, tmp_path / "images", class_names())
    assert len(ds) == 3 and ds.class_names == class_names()
    for original, loaded in zip(scenes, ds):
        np.testing.assert_array_equal(loaded.image, original.image)
        np.testing.assert_array_equal(loaded.masks, original.masks)
        np.testing.assert_array_equal(loaded.classes, original.classes)
        np.testing.assert_array_equal(loaded.boxes, original.boxes)
    # without class names the labels found become the classes, sorted by name
    default = load_labelstudio_export(path)  # images found next to the export
    found = sorted({class_names()[c] for s in scenes for c in s.classes})
    assert default.class_names == found
    assert [found[c] for c in default[0].classes] == [class_names()[c] for c in scenes[0].classes]


def test_labelstudio_rectangle_export_gives_box_masks(tmp_path, scenes):
    path = write_labelstudio_export(scenes[:1], class_names(), tmp_path, region="rectangle")
    sample = load_labelstudio_export(path, tmp_path / "images", class_names())[0]
    for mask, box in zip(sample.masks, scenes[0].boxes):
        x0, y0, x1, y1 = box.astype(int)
        expected = np.zeros_like(mask)
        expected[y0:y1, x0:x1] = True
        np.testing.assert_array_equal(mask, expected)


def test_labelstudio_region_kinds_by_hand(tmp_path):
    _save_image(tmp_path / "imgs" / "a.png")
    brush_mask = np.zeros((H, W), bool)
    brush_mask[2:7, 60:90] = True
    results = [
        _region("polygonlabels", {"points": [[10, 10], [50, 10], [50, 50], [10, 50]]}, ["cat"], "p"),
        _region("rectanglelabels", {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0}, ["dog"], "r"),
        # rotated 90 degrees clockwise about its top-left corner (10, 10): the top edge points down
        _region("rectanglelabels", {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 90}, ["dog"], "r90"),
        _region("ellipselabels", {"x": 50, "y": 50, "radiusX": 20, "radiusY": 20, "rotation": 0}, ["cat"], "e"),
        _region("brushlabels", {"format": "rle", "rle": brush.mask2rle(brush_mask.astype(np.uint8) * 255)},
                ["bird"], "b"),
        # geometry and label in separate results with the same id (a Labels tag beside a Polygon tag)
        _region("polygon", {"points": [[80, 60], [90, 60], [90, 80], [80, 80]]}, None, "sep"),
        {"id": "sep", "type": "labels", "value": {"labels": ["bird"]}, "from_name": "l", "to_name": "image"},
        # no label anywhere: left out; a choice: ignored
        _region("rectangle", {"x": 0, "y": 0, "width": 5, "height": 5}, None, "nolabel"),
        {"id": "c", "type": "choices", "value": {"choices": ["indoor"]}, "from_name": "c", "to_name": "image"},
    ]
    ds = load_labelstudio_export([_task(1, "/data/upload/7/0badcafe-a.png", results)], tmp_path / "imgs")
    assert ds.class_names == ["bird", "cat", "dog"] and ds.skipped_regions == 1
    s = ds[0]
    assert isinstance(s, Scene) and s.image.shape == (H, W, 3)
    assert [ds.class_names[c] for c in s.classes] == ["cat", "dog", "dog", "cat", "bird", "bird"]
    expected = np.zeros((6, H, W), bool)
    expected[0, 5:25, 10:50] = True    # polygon: x 10-50 % of 100, y 10-50 % of 50
    expected[1, 10:30, 10:40] = True   # rectangle: x 10 + 30 px, y 10 + 20 px
    expected[2, 10:40, 0:10] = True    # rotated: x from 10 - 20 (clipped at 0) to 10, y 10 to 10 + 30
    expected[4] = brush_mask
    expected[5, 30:40, 80:90] = True
    for i in (0, 1, 2, 4, 5):
        np.testing.assert_array_equal(s.masks[i], expected[i], err_msg=f"region {i}")
    # ellipse with radii 20 x 10 px around (50, 25)
    assert s.masks[3].sum() == pytest.approx(math.pi * 20 * 10, rel=0.03)
    assert s.masks[3][25, 50] and not s.masks[3][25, 71] and s.masks[3][25, 69]
    np.testing.assert_array_equal(s.boxes[1], [10, 10, 40, 30])


def test_labelstudio_annotation_choice_and_skipped_tasks(tmp_path):
    _save_image(tmp_path / "a.png")
    box = {"x": 0, "y": 0, "width": 10, "height": 10}
    first = {"id": 1, "was_cancelled": False, "result": [_region("rectanglelabels", box, ["old"])]}
    last = {"id": 2, "was_cancelled": False, "result": [_region("rectanglelabels", box, ["new"])]}
    cancelled = {"id": 3, "was_cancelled": True, "result": [_region("rectanglelabels", box, ["cancelled"])]}
    truth = {"id": 4, "ground_truth": True, "result": [_region("rectanglelabels", box, ["truth"])]}
    tasks = [
        {"id": 1, "data": {"image": "a.png"}, "annotations": [first, last, cancelled]},
        {"id": 2, "data": {"image": "a.png"}, "annotations": [truth, first]},
        {"id": 3, "data": {"image": "a.png"}, "annotations": [cancelled]},
        {"id": 4, "data": {"image": "a.png"}, "annotations": []},
        # an empty but submitted annotation: an image with no instances
        {"id": 5, "data": {"image": "a.png"}, "annotations": [{"id": 5, "result": []}]},
    ]
    ds = load_labelstudio_export(tasks, tmp_path)
    assert len(ds) == 3 and ds.skipped_tasks == [3, 4]
    assert ds.class_names == ["new", "truth"]
    assert ds[0].classes.tolist() == [0] and ds[1].classes.tolist() == [1]
    assert ds[2].num_instances == 0 and ds[2].masks.shape == (0, H, W)
    # a subset of the classes: the others are left out
    only = load_labelstudio_export(tasks, tmp_path, class_names=["truth"])
    assert only[0].num_instances == 0 and only[1].classes.tolist() == [0]
    with pytest.raises(ValueError, match="none of the classes"):
        load_labelstudio_export(tasks, tmp_path, class_names=["Truth"])


def test_labelstudio_masks_follow_the_image_file_size(tmp_path):
    # annotated on a 50 x 100 image, exported file is twice as large
    _save_image(tmp_path / "big.png", 2 * H, 2 * W)
    region = _region("rectanglelabels", {"x": 10, "y": 20, "width": 30, "height": 40}, ["dog"])
    s = load_labelstudio_export([_task(1, "big.png", [region])], tmp_path)[0]
    assert s.masks.shape == (1, 2 * H, 2 * W)
    assert s.masks[0].sum() == 4 * 30 * 20 and s.boxes[0].tolist() == [20, 20, 80, 60]


def test_image_references_resolve_to_local_files(tmp_path):
    _save_image(tmp_path / "imgs" / "sub" / "cat.png")
    _save_image(tmp_path / "imgs" / "1a2b3c4d-dog.png")
    root = tmp_path / "imgs"
    assert find_image("/data/upload/3/89abcdef-cat.png", root) == root / "sub" / "cat.png"
    assert find_image("/data/local-files/?d=photos/sub/cat.png", root) == root / "sub" / "cat.png"
    assert find_image("s3://bucket/x/cat.png", root) == root / "sub" / "cat.png"
    assert find_image("http://ls:8080/data/upload/3/1a2b3c4d-dog.png", root) == root / "1a2b3c4d-dog.png"
    assert find_image("dog.png", root) == root / "1a2b3c4d-dog.png"
    assert find_image(str(root / "sub" / "cat.png"), None) == root / "sub" / "cat.png"
    with pytest.raises(FileNotFoundError, match="bird.png"):
        find_image("/data/upload/3/bird.png", root)
    tasks = [_task(1, "/data/upload/1/bird.png", [])]
    with pytest.raises(FileNotFoundError, match="right folder"):
        load_labelstudio_export(tasks, root)[0]


def test_labelstudio_bad_input_is_explained(tmp_path):
    with pytest.raises(ValueError, match="list of tasks"):
        load_labelstudio_export([{"annotations": []}], tmp_path)
    with pytest.raises(ValueError, match="image_key"):
        load_labelstudio_export([{"id": 1, "data": {"a": "x.png", "b": "y.png"}, "annotations": [{"result": []}]}],
                                tmp_path)
    _save_image(tmp_path / "a.png")
    bad = _region("brushlabels", {"format": "rle", "rle": brush.mask2rle(np.zeros((5, 5), np.uint8))}, ["x"])
    with pytest.raises(ValueError, match="brush RLE holds 100 values"):
        load_labelstudio_export([_task(1, "a.png", [bad])], tmp_path)[0]


# ---------------------------------------------------------------------------------------------
# COCO


def test_coco_compressed_rle_matches_pycocotools():
    # pycocotools.mask.encode of this 7 x 9 mask gives b"6183K00000006MM"
    mask = np.zeros((7, 9), bool)
    mask[1:5, 2:7] = True
    mask[6, 0] = True
    mask[0, 8] = True
    np.testing.assert_array_equal(rle_to_mask({"size": [7, 9], "counts": "6183K00000006MM"}), mask)
    np.testing.assert_array_equal(rle_to_mask({"size": [7, 9], "counts": b"6183K00000006MM"}), mask)
    assert mask_to_rle(mask, compressed=True)["counts"] == "6183K00000006MM"
    # uncompressed: column-major runs starting with 0s
    assert mask_to_rle(mask)["counts"][:4] == [6, 1, 8, 4]
    rng = np.random.default_rng(0)
    for _ in range(20):
        runs = rng.integers(0, 3000, size=rng.integers(1, 30)).tolist()
        assert decode_rle_string(encode_rle_string(runs)) == runs
        m = rng.random((rng.integers(1, 40), rng.integers(1, 40))) < rng.random()
        np.testing.assert_array_equal(rle_to_mask(mask_to_rle(m, compressed=True)), m)
        np.testing.assert_array_equal(rle_to_mask(mask_to_rle(m)), m)
    with pytest.raises(ValueError, match="truncated"):
        decode_rle_string("6183K0000000o")
    with pytest.raises(ValueError, match="add up"):
        rle_to_mask({"size": [7, 9], "counts": [6, 1, 8]})


def test_coco_annotations_by_hand(tmp_path):
    _save_image(tmp_path / "images" / "a.jpg")
    _save_image(tmp_path / "images" / "b.png", 30, 40)
    rle_mask = np.zeros((H, W), bool)
    rle_mask[40:45, 0:3] = True
    coco = {
        "images": [{"id": 10, "file_name": "a.jpg", "height": H, "width": W},
                   {"id": 11, "file_name": "b.png", "height": 30, "width": 40}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "iscrowd": 0,
             "segmentation": [[10, 5, 50, 5, 50, 25, 10, 25], [60.25, 0, 70, 0, 70, 9.75]]},
            {"id": 2, "image_id": 10, "category_id": 3, "iscrowd": 0, "segmentation": mask_to_rle(rle_mask)},
            {"id": 3, "image_id": 10, "category_id": 3, "iscrowd": 0,
             "segmentation": mask_to_rle(rle_mask[::-1].copy(), compressed=True)},
            {"id": 4, "image_id": 10, "category_id": 7, "iscrowd": 0, "bbox": [80, 30, 10, 5]},
            {"id": 5, "image_id": 10, "category_id": 7, "iscrowd": 1, "segmentation": mask_to_rle(rle_mask)},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    ds = load_coco(path, tmp_path / "images")
    assert len(ds) == 2 and ds.class_names == ["cat", "dog"]  # ordered by category id
    s = ds[0]
    assert s.classes.tolist() == [1, 0, 0, 1]
    expected = np.zeros((H, W), bool)
    expected[5:25, 10:50] = True
    triangle = np.zeros((H, W), bool)
    for y in range(10):
        for x in range(60, 70):
            # above the diagonal y = x - 60.25 (no pixel centre lies on an edge)
            triangle[y, x] = y + 0.5 < x + 0.5 - 60.25
    np.testing.assert_array_equal(s.masks[0], expected | triangle)
    np.testing.assert_array_equal(s.masks[1], rle_mask)
    np.testing.assert_array_equal(s.masks[2], rle_mask[::-1])
    assert s.masks[3].sum() == 50 and s.boxes[3].tolist() == [80, 30, 90, 35]
    assert ds[1].num_instances == 0 and ds[1].image.shape == (30, 40, 3)
    # crowd regions on request; a subset of classes in a chosen order
    assert len(load_coco(path, tmp_path / "images", include_crowd=True)[0].classes) == 5
    dogs = load_coco(path, tmp_path / "images", class_names=["dog"])[0]
    assert dogs.classes.tolist() == [0, 0]
    with pytest.raises(ValueError, match="not categories"):
        load_coco(path, tmp_path / "images", class_names=["horse"])


def test_coco_bad_input_is_explained(tmp_path):
    _save_image(tmp_path / "a.png")
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO instances file"):
        load_coco(path, tmp_path)
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}],
            "categories": [{"id": 1, "name": "x"}], "annotations": []}
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="annotations say"):
        load_coco(path, tmp_path)[0]
    coco["images"][0].update(height=H, width=W, file_name="missing.png")
    path.write_text(json.dumps(coco))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_coco(path, tmp_path)[0]


@pytest.mark.parametrize("segmentation", ["rle", "compressed_rle"])
def test_coco_round_trip(tmp_path, scenes, segmentation):
    path = write_coco(scenes, class_names(), tmp_path, segmentation=segmentation)
    ds = load_coco(path, tmp_path / "images")
    assert ds.class_names == class_names()
    for original, loaded in zip(scenes, ds):
        np.testing.assert_array_equal(loaded.image, original.image)
        np.testing.assert_array_equal(loaded.masks, original.masks)
        np.testing.assert_array_equal(loaded.classes, original.classes)
        np.testing.assert_array_equal(loaded.boxes, original.boxes)
