"""Why does the object query that overlaps an instance best carry the wrong class?

    python benchmarks/class_matching.py --checkpoint demo --scenes 10

For every true instance of held-out scenes (generic decoding against all 30 classes, 4 full-mask examples
per class from other scenes, as `dinov.eval.evaluate`), take the object query whose mask overlaps it best and
report: how often its highest class is right; when wrong, whether the wrong class shares the colour or the
kind; the rank of the right class; and the same with each class given by the target's OWN instances as
examples (same-image prompts, what training without cross-image examples sees).

For a model with the shape extension (dinov/modeling/shape_encoder.py) it also reports every row with the shape
term switched off at inference (its ``logit_scale`` set to 0): what the trained term contributes to the class.

    python benchmarks/class_matching.py --checkpoint demo --scenes 40 --pool 120     # the evaluation's scenes
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np
import torch

from dinov.data.scenes import COLOURS, generate_scene
from dinov.eval.evaluate import POOL_SEED, TARGET_SEED
from dinov.eval.example_pool import example_pool
from dinov.metrics import mask_iou
from dinov.predictor import DINOvPredictor


def diagnose(predictor: DINOvPredictor, num_scenes: int, pool_scenes: int, examples: int) -> dict:
    pool = example_pool(predictor, (generate_scene(POOL_SEED + i) for i in range(pool_scenes)))
    classes = sorted(pool)
    colours = len(COLOURS)
    counts: dict[str, Counter] = {"other images": Counter(), "same image": Counter()}
    for i in range(num_scenes):
        scene = generate_scene(TARGET_SEED + i)
        encoded = predictor.encode_image(scene.image)
        own = predictor.encode_prompts(encoded, scene.masks)
        banks = {"other images": [np.stack(pool[c][:examples]).mean(0) for c in classes]}
        same = []
        for c in classes:
            hits = own[scene.classes == c]
            same.append(hits.mean(0) if len(hits) else np.stack(pool[c][:examples]).mean(0))
        banks["same image"] = same
        for name, bank in banks.items():
            with torch.inference_mode():
                out = predictor.model.head.decode_generic(encoded.multi_scale_features, encoded.mask_features,
                                                          torch.from_numpy(np.stack(bank))[None])
            logits = out["pred_logits"][0]
            masks = np.stack([predictor._mask_to_original(m, encoded) for m in out["pred_masks"][0]])
            ious = mask_iou(masks, scene.masks)  # [Q, G]
            for g, truth in enumerate(scene.classes.tolist()):
                q = int(ious[:, g].argmax())
                c = counts[name]
                c["instances"] += 1
                c["best query IoU sum"] += float(ious[q, g])
                predicted = classes[int(logits[q].argmax())]
                rank = int((logits[q] > logits[q, classes.index(truth)]).sum())
                c["right rank sum"] += rank
                if predicted == truth:
                    c["right"] += 1
                elif predicted % colours == truth % colours:
                    c["wrong kind, same colour"] += 1
                elif predicted // colours == truth // colours:
                    c["wrong colour, same kind"] += 1
                else:
                    c["both wrong"] += 1
                c["score of right class sum"] += float(torch.sigmoid(logits[q, classes.index(truth)]))
    report = {}
    for name, c in counts.items():
        n = max(1, c["instances"])
        report[name] = {"instances": c["instances"], "best query IoU": c["best query IoU sum"] / n,
                        "class right": c["right"] / n, "same colour, other kind": c["wrong kind, same colour"] / n,
                        "same kind, other colour": c["wrong colour, same kind"] / n, "both wrong": c["both wrong"] / n,
                        "mean rank of the right class": c["right rank sum"] / n,
                        "mean score of the right class": c["score of right class sum"] / n}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--scenes", type=int, default=10)
    parser.add_argument("--pool", type=int, default=60)
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictor = DINOvPredictor.from_checkpoint(args.checkpoint, device="cpu")
    report = diagnose(predictor, args.scenes, args.pool, args.examples)
    shape_encoder = predictor.model.head.shape_encoder
    if shape_encoder is not None:
        # ablation at inference: the same trained model, class logits from content matching alone
        with torch.no_grad():
            scale = float(shape_encoder.logit_scale)
            shape_encoder.logit_scale.fill_(0.0)
        without = diagnose(predictor, args.scenes, args.pool, args.examples)
        report = {**{f"{name}, shape term x{scale:.2f}": row for name, row in report.items()},
                  **{f"{name}, shape term off": row for name, row in without.items()}}
    keys = list(next(iter(report.values())))
    print("| prompts | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, row in report.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
