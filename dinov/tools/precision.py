"""How far bf16 autocast moves the predictor's masks from float32, on generated scenes.

    python -m dinov.tools.precision --checkpoint demo --device cpu --scenes 4

The same weights run twice on each scene (`dinov.data.scenes`), once in float32 and once under bf16 autocast
(CUDA, or the CPU where torch supports it), for the three things the backend asks: a click on each object
(the chosen candidate), generic segmentation with one object of the scene as the example (the union of the
instances), and referring with that example. Reported: the mean and the smallest mask IoU of each, and how many
agree (IoU >= AGREEING_IOU).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable

import numpy as np
import torch

from dinov.data.scenes import generate_scene
from dinov.predictor import DINOvPredictor
from dinov.results import Instance

AGREEING_IOU = 0.95  # two masks this close are the same answer up to rounding at the edge


def mask_iou(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """IoU of two bool masks; None (nothing found) counts as an empty mask; two empty masks agree fully."""
    if a is None and b is None:
        return 1.0
    if a is None or b is None:
        return 0.0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _union(instances: Iterable[Instance | None]) -> np.ndarray | None:
    masks = [i.mask for i in instances if i is not None]
    return np.logical_or.reduce(masks) if masks else None


def bf16_agreement(predictor: DINOvPredictor, scenes: int = 4, size: tuple[int, int] = (240, 320),
                   seed: int = 10_000_000) -> dict[str, dict[str, float]]:
    """Mask IoU of bf16 autocast against float32 on `scenes` generated scenes (held-out seeds by default)."""
    full = DINOvPredictor(predictor.model, device=predictor.device, resize=predictor.resize, autocast_dtype=None)
    half = DINOvPredictor(predictor.model, device=predictor.device, resize=predictor.resize, autocast_dtype=None)
    half.autocast_dtype = torch.bfloat16  # also on the CPU, where the predictor itself never uses it
    ious: dict[str, list[float]] = {"click": [], "generic": [], "referring": []}
    for index in range(scenes):
        scene = generate_scene(seed + index, size=size, num_objects=(3, 6))
        encoded = [p.encode_image(scene.image) for p in (full, half)]
        for mask in scene.masks:
            ys, xs = np.nonzero(mask)
            point = [[float(xs[len(xs) // 2]), float(ys[len(ys) // 2])]]
            best = [p.segment_interactive(e, points=point, point_labels=[1]).best for p, e in zip((full, half), encoded)]
            ious["click"].append(mask_iou(*(None if b is None else b.mask for b in best)))
        examples = [p.encode_prompts(e, scene.masks[:1]) for p, e in zip((full, half), encoded)]
        generic = [p.segment_generic(e, [x]) for p, e, x in zip((full, half), encoded, examples)]
        ious["generic"].append(mask_iou(_union(generic[0]), _union(generic[1])))
        referring = [p.segment_referring(e, x)[0] for p, e, x in zip((full, half), encoded, examples)]
        ious["referring"].append(mask_iou(*(None if r is None else r.mask for r in referring)))
    return {name: {"mean_iou": statistics.mean(values), "min_iou": min(values), "n": len(values),
                   "agreeing": sum(v >= AGREEING_IOU for v in values)}
            for name, values in ious.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--size", default="240x320", help="HEIGHTxWIDTH of the generated scenes")
    parser.add_argument("--model-dir", default=None, help="where swinT/swinL are downloaded")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    predictor = DINOvPredictor.from_checkpoint(args.checkpoint, device=args.device, cache_dir=args.model_dir)
    report = bf16_agreement(predictor, args.scenes, (height, width))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
