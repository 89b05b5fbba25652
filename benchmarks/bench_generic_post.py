"""Generic segmentation with its post-processing: the previous predictor path against the current one.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_generic_post.py --preset swin_t --size 640x853 --threads 1

Both run on the same random-weight model, image features and class, taking turns (median of `--repeats` rounds),
and their instances are compared (count, masks pixel by pixel, boxes, scores). The previous path computed the
masks of every object query at stride 4, filtered them with `postprocess.filter_generic`, and upsampled each
kept mask over the whole image with `DINOvPredictor._mask_to_original`; the current one
(`DINOvPredictor.segment_generic`) thresholds and orders first, computes the masks of the returnable instances
only, and upsamples each only around its positive cells (`dinov.mask_upsampling.MaskResizer`).
`--original HxW` makes the original image differ from the model input (a second resize, as in the backend).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from dinov import postprocess
from dinov.config import PRESETS
from dinov.interactive import mask_box
from dinov.modeling.dinov import build_dinov
from dinov.predictor import DINOvPredictor, EncodedImage
from dinov.results import Instance
from dinov.tools.bench import random_image
from dinov.transforms import ResizeConfig


def previous_segment_generic(predictor: DINOvPredictor, encoded: EncodedImage, classes: list[np.ndarray],
                             max_instances: int = 100) -> list[Instance]:
    """The predictor's generic path before the change (official threshold rule), for comparison."""
    bank = predictor._class_bank(classes, 16)
    with torch.inference_mode():
        outputs = predictor.model.head.decode_generic(encoded.multi_scale_features, encoded.mask_features, bank[None])
        selection = postprocess.filter_generic(outputs["pred_logits"][0].float(), outputs["pred_masks"][0].float())
        order = torch.argsort(selection.scores, descending=True)[:max_instances]
        instances = []
        for i in order.tolist():
            mask = predictor._mask_to_original(selection.mask_logits[i], encoded)
            box = mask_box(mask)
            if box is not None:
                instances.append(Instance(mask, float(selection.scores[i]), int(selection.labels[i]), box))
        return instances


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="swin_t")
    parser.add_argument("--size", default="640x853", help="HEIGHTxWIDTH of the model input")
    parser.add_argument("--original", default=None, help="HEIGHTxWIDTH of the original image (default: --size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-instances", type=int, default=100)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    height, width = (int(v) for v in args.size.lower().split("x"))
    original = tuple(int(v) for v in (args.original or args.size).lower().split("x"))
    model = build_dinov(PRESETS[args.preset]()).eval()
    predictor = DINOvPredictor(model, resize=ResizeConfig(shortest_edge=None))
    image = random_image(height, width, model.size_divisibility)
    ph, pw = image.shape[-2:]
    with torch.inference_mode():
        multi_scale, mask_features = model.encode(image)
    encoded = EncodedImage(original, (height, width), (ph, pw), multi_scale, mask_features)
    prompt = np.zeros(original, bool)
    prompt[original[0] // 3 : original[0] // 2, original[1] // 3 : original[1] // 2] = True
    classes = [predictor.encode_prompts(encoded, prompt)]

    before = previous_segment_generic(predictor, encoded, classes, args.max_instances)
    after = predictor.segment_generic(encoded, classes, max_instances=args.max_instances)
    same_count = len(before) == len(after)
    pixel_diffs = sum(int((a.mask != b.mask).sum()) for a, b in zip(before, after))
    boxes_equal = same_count and all(a.box == b.box for a, b in zip(before, after))
    score_diff = max((abs(a.score - b.score) for a, b in zip(before, after)), default=0.0)

    times: dict[str, list[float]] = {"previous_s": [], "current_s": [], "previous_cpu_s": [], "current_cpu_s": []}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, fn in (("previous_s", lambda: previous_segment_generic(predictor, encoded, classes, args.max_instances)),
                         ("current_s", lambda: predictor.segment_generic(encoded, classes,
                                                                         max_instances=args.max_instances))):
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            # CPU time: what a shared machine's other work inflates least (one thread: ~ an idle wall clock)
            times[name.replace("_s", "_cpu_s")].append(time.process_time() - cpu)
    load.append(os.getloadavg()[0])
    report = {
        "preset": args.preset, "size": f"{height}x{width}", "original": f"{original[0]}x{original[1]}",
        "threads": args.threads, "repeats": args.repeats, "load_average_1min": [round(v, 2) for v in load],
        "instances": [len(before), len(after)], "same_count": same_count, "pixel_differences": pixel_diffs,
        "boxes_equal": boxes_equal, "max_score_difference": score_diff,
        **{name: statistics.median(values) for name, values in times.items()},
    }
    for key, value in report.items():
        print(f"{key:22s} {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
