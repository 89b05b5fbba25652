"""dinov.eval.example_pool: every instance's prompt embedding, by class, as evaluation and fine-tuning build examples."""

from __future__ import annotations

import numpy as np

from dinov.data.scenes import Scene
from dinov.eval.example_pool import example_pool


class AreaPredictor:
    """Embeds a prompt as [its area, the number of images encoded so far]."""

    def __init__(self):
        self.encoded = 0

    def encode_image(self, image):
        self.encoded += 1
        return image

    def encode_prompts(self, encoded, masks):
        return np.array([[m.sum(), self.encoded] for m in masks], np.float32)


def scene(areas: list[int], classes: list[int]) -> Scene:
    masks = np.zeros((len(areas), 10, 10), bool)
    for mask, area in zip(masks, areas):
        mask.flat[:area] = True
    return Scene(image=np.zeros((10, 10, 3), np.uint8), masks=masks, classes=np.array(classes, np.int64),
                 boxes=np.zeros((len(areas), 4), np.float32))


def test_embeddings_by_class_in_scene_order_capped_and_empty_scenes_skipped():
    predictor = AreaPredictor()
    scenes = [scene([3, 5], [0, 1]), scene([], []), scene([7, 9, 11], [0, 0, 1])]
    pool = example_pool(predictor, scenes)
    assert {c: [e.tolist() for e in v] for c, v in pool.items()} == {
        0: [[3, 1], [7, 2], [9, 2]], 1: [[5, 1], [11, 2]]}
    assert predictor.encoded == 2  # the scene without instances is never encoded
    capped = example_pool(AreaPredictor(), scenes, max_per_class=1)
    assert {c: [e[0] for e in v] for c, v in capped.items()} == {0: [3], 1: [5]}
