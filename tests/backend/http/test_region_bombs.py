"""Region bombs (issue 20, item 1): a small region that declares a huge canvas is refused before it is decoded.

In /predict's context it is a 422 that says why; through a webhook it is a logged, skipped example. Each bomb runs
in a fresh process (tests/support/bomb_probe.py) whose peak memory growth over a warmed-up baseline is measured:
before the limits, a 37 kB bitmask took +2 GB and a 41 kB brush RLE +0.8 GB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from labelstudio_backend.labelstudio.regions import RegionTooLarge, decode_bitmask, region_pixel_limit, region_to_prompt
from tests.support.bombs import bitmask_region, brush_region, png_bomb, rle_bomb

ROOT = Path(__file__).resolve().parents[3]
MAX_GROWTH_MB = 400


def test_region_limit_follows_the_task_image_and_max_image_pixels():
    assert region_pixel_limit((100, 200)) == 4 * 100 * 200
    assert region_pixel_limit((10_000, 10_000), max_pixels=1_000_000) == 1_000_000


def test_brush_bomb_refused_before_decoding():
    region = brush_region(rle_bomb(20000, 10000), 20000, 10000, "Red")
    with pytest.raises(RegionTooLarge, match="20000x10000"):
        region_to_prompt(region, (64, 96))


def test_brush_drawn_on_a_twice_larger_copy_is_still_read():
    small = brush_region(rle_bomb(192, 128), 192, 128, "Red")
    prompt = region_to_prompt(small, (64, 96))
    assert prompt.mask.shape == (64, 96) and prompt.mask.all()


def test_bitmask_bomb_refused_and_pillows_own_refusal_caught():
    with pytest.raises(RegionTooLarge, match="13000x13000"):
        region_to_prompt(bitmask_region(png_bomb(13000, 13000), "Red"), (64, 96))
    # 14000 x 14000 is above twice Pillow's limit: its DecompressionBombError was a 500
    with pytest.raises(RegionTooLarge):
        decode_bitmask("data:image/png;base64," + __import__("base64").b64encode(png_bomb(14000, 14000)).decode())


def test_polygon_with_too_many_points_refused():
    points = np.random.default_rng(0).uniform(0, 100, (100_001, 2)).tolist()
    region = {"id": "p", "type": "polygonlabels", "value": {"points": points, "polygonlabels": ["Red"]}}
    with pytest.raises(ValueError, match="100001 points"):
        region_to_prompt(region, (64, 96))


def probe(kind: str, tmp_path: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "tests.support.bomb_probe", kind, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["predict-bitmask", "predict-brush"])
def test_region_bomb_in_predict_context_is_a_4xx_within_the_memory_bound(kind, tmp_path):
    found = probe(kind, tmp_path)
    assert found["status"] == 422
    assert found["growth_mb"] < MAX_GROWTH_MB, found
    assert found["after"] == 200


@pytest.mark.parametrize("kind", ["webhook-bitmask", "webhook-brush"])
def test_region_bomb_in_a_webhook_is_a_logged_skipped_region(kind, tmp_path):
    found = probe(kind, tmp_path)
    assert found["status"] == 200  # the event is kept; its bomb region is skipped when embedded
    assert found["growth_mb"] < MAX_GROWTH_MB, found
    assert found["after"] == 200
    assert any("canvas" in line for line in found["warnings"]), found


def test_training_data_skips_a_region_bomb_and_keeps_the_other_regions(caplog):
    from types import SimpleNamespace

    from labelstudio_backend.labelstudio.label_config import parse_label_config
    from labelstudio_backend.training.data import task_scene

    config = parse_label_config("""<View><Image name="image" value="$image"/>
      <PolygonLabels name="poly" toName="image"><Label value="A"/></PolygonLabels></View>""")
    polygon = {"to_name": "image", "from_name": "poly", "type": "polygonlabels",
               "value": {"points": [[10, 10], [90, 10], [90, 90]], "polygonlabels": ["A"]}}
    task = {"id": 4, "data": {"image": "http://x/a.png"}, "annotations": [{"id": 1, "result": [
        {**polygon, "original_width": 100_000, "original_height": 100_000},  # 10^10 pixels: 10 GB as a mask
        {**polygon, "original_width": 100, "original_height": 50},
    ]}]}
    image = np.zeros((50, 100, 3), np.uint8)
    scene = task_scene(task, config, SimpleNamespace(load=lambda url, task_id: image))
    assert scene.classes.tolist() == [0]
    assert "100000x100000" in caplog.text
