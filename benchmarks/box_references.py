"""Is a box reference better used as the filled box or first segmented into the object's mask?

    python benchmarks/box_references.py --checkpoint demo --pool 60 --targets 30

Annotators often draw boxes. A filled box is half background, so the backend first turns a box (or a
keypoint) reference into the object's mask by interactive segmentation on its own image, keeps it inside
the box and falls back to the filled box when the segmentation covers little of it. This measures the
filled box, the raw segmentation and the backend's rule on generated scenes: each class's examples are the boxes of its
instances in the pool scenes (4 per class); generic segmentation of the target scenes is scored as in
dinov.eval.evaluate (mIoU, found, AP50).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np

from dinov.data.scenes import generate_scene
from dinov.eval.evaluate import POOL_SEED, TARGET_SEED
from dinov.metrics import InstanceEvaluator
from dinov.predictor import DINOvPredictor
from dinov.prompts import box_to_mask


def box_segmentation(mask: np.ndarray | None, filled_box: np.ndarray) -> np.ndarray:
    """The backend's rule for box references (labelstudio_backend.references.sources.box_reference_mask)."""
    from labelstudio_backend.references.sources import box_reference_mask

    return box_reference_mask(mask, filled_box)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--pool", type=int, default=60)
    parser.add_argument("--targets", type=int, default=30)
    parser.add_argument("--examples", type=int, default=4)
    args = parser.parse_args()
    predictor = DINOvPredictor.from_checkpoint(args.checkpoint, device="cpu")

    names = ("filled box", "segmented box", "segmented, kept inside the box")
    banks: dict[str, dict[int, list[np.ndarray]]] = {name: defaultdict(list) for name in names}
    for i in range(args.pool):
        scene = generate_scene(POOL_SEED + i)
        encoded = predictor.encode_image(scene.image)
        size = scene.image.shape[:2]
        filled = np.stack([box_to_mask((b[0], b[1], b[2] - 1, b[3] - 1), size) for b in scene.boxes])
        segmented, inside = [], []
        for box, fill in zip(scene.boxes, filled):
            best = predictor.segment_interactive(encoded, boxes=[box]).best
            segmented.append(best.mask if best is not None and best.mask.any() else fill)
            inside.append(box_segmentation(best.mask if best is not None else None, fill))
        for name, masks in zip(names, (filled, np.stack(segmented), np.stack(inside))):
            for c, e in zip(scene.classes.tolist(), predictor.encode_prompts(encoded, masks)):
                banks[name][c].append(e)

    evaluators = {name: InstanceEvaluator() for name in banks}
    for i in range(args.targets):
        scene = generate_scene(TARGET_SEED + i)
        encoded = predictor.encode_image(scene.image)
        for name, bank in banks.items():
            classes = sorted(bank)
            instances = predictor.segment_generic(encoded, [np.stack(bank[c][: args.examples]) for c in classes])
            masks = np.stack([x.mask for x in instances]) if instances else np.zeros((0, *scene.image.shape[:2]), bool)
            evaluators[name].add(masks, [x.score for x in instances], [classes[x.class_index] for x in instances],
                                 scene.masks, scene.classes)
    print(f"| references ({args.examples} per class) | mIoU | found | AP50 |")
    print("|---|---|---|---|")
    for name, evaluator in evaluators.items():
        s = evaluator.summary()
        print(f"| {name} | {s['miou']:.3f} | {s['found']:.3f} | {s['ap50']:.3f} |")


if __name__ == "__main__":
    main()
