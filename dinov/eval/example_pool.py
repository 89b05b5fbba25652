"""The example pool of in-context segmentation: the prompt embedding of every instance of some scenes, by class.

    pool = example_pool(predictor, scenes, max_per_class=16)      # {class id: [embedding, ...]}
    bank = [np.stack(pool[c][:4]) for c in sorted(pool)]            # what segment_generic takes

Evaluation, calibration, fine-tuning measures and benchmarks all build their class examples this way: each
instance's full mask encoded as a visual prompt on its own image.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import numpy as np

from dinov.data.scenes import Scene


def example_pool(predictor: Any, scenes: Iterable[Scene], max_per_class: int | None = None
                 ) -> dict[int, list[np.ndarray]]:
    """{class id: prompt embeddings of its instances, in scene order}, at most max_per_class each (None: all).
    `predictor` is a DINOvPredictor (encode_image, encode_prompts); scenes without instances are skipped."""
    pool: dict[int, list[np.ndarray]] = defaultdict(list)
    for scene in scenes:
        if len(scene.masks) == 0:
            continue
        encoded = predictor.encode_image(scene.image)
        for c, embedding in zip(scene.classes.tolist(), predictor.encode_prompts(encoded, scene.masks)):
            if max_per_class is None or len(pool[c]) < max_per_class:
                pool[c].append(embedding)
    return dict(pool)
