"""How far is referring (one example from another image) from what its proposals allow?

    OMP_NUM_THREADS=1 python benchmarks/referring_oracle.py --checkpoint demo --scenes 20

For each class present in a held-out scene (one example of it from the example pool, as `dinov.eval.evaluate`),
the IoU with the best instance of the class of: the proposal referring chooses; the best of the proposals that
survive the official filter (an oracle choice: the most any re-ranking of them can reach); and the best region
generic decoding returns for that class with the same single example of every present class.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np
import torch


def main() -> None:
    from dinov import postprocess
    from dinov.data.scenes import generate_scene
    from dinov.eval.evaluate import POOL_SEED, TARGET_SEED
    from dinov.eval.example_pool import example_pool
    from dinov.metrics import iou
    from dinov.predictor import DINOvPredictor, PromptContent, point_grid_boxes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--pool", type=int, default=120)
    args = parser.parse_args()
    torch.set_num_threads(1)
    predictor = DINOvPredictor.from_checkpoint(args.checkpoint, device="cpu")
    head = predictor.model.head
    pool = example_pool(predictor, (generate_scene(POOL_SEED + i) for i in range(args.pool)))
    rng = np.random.default_rng(0)
    chosen, oracle, generic, survivors = [], [], [], []
    for i in range(args.scenes):
        scene = generate_scene(TARGET_SEED + i)
        encoded = predictor.encode_image(scene.image)
        present = sorted(set(scene.classes.tolist()))
        examples = np.stack([pool[c][int(rng.integers(0, len(pool[c])))] for c in present])
        answers = predictor.segment_referring(encoded, examples)
        with torch.inference_mode():
            content = PromptContent.from_labels(head.split_class_embeddings(torch.from_numpy(examples))[0][None])
            grid = point_grid_boxes(predictor.model.points_per_side, encoded.padded_size)
            out = head.decode_referring(encoded.multi_scale_features, encoded.mask_features, content, grid,
                                        with_masks=False)
            kept = postprocess.filter_referring(
                out["pred_boxes"][0], out["pred_ious"][0], out["pred_match_score"][0], mask_embed=out["mask_embed"][0],
                mask_features=encoded.mask_features[0], nms_threshold=predictor.model.nms_threshold).kept_index
            logits = torch.einsum("qc,chw->qhw", out["mask_embed"][0][kept], encoded.mask_features[0])
        masks = [predictor._mask_to_original(m, encoded) for m in logits]
        found = predictor.segment_generic(encoded, [e[None] for e in examples])
        for k, c in enumerate(present):
            truths = scene.masks[scene.classes == c]
            chosen.append(max(iou(answers[k].mask, t) for t in truths) if answers[k] else 0.0)
            oracle.append(max((iou(m, t) for m in masks for t in truths), default=0.0))
            generic.append(max((iou(x.mask, t) for x in found if x.class_index == k for t in truths), default=0.0))
            survivors.append(len(masks))
    print(f"{args.checkpoint}: {len(chosen)} examples on {args.scenes} scenes, {np.mean(survivors):.1f} proposals survive")
    print(f"mean IoU: referring's choice {np.mean(chosen):.3f}, best survivor (oracle) {np.mean(oracle):.3f}, "
          f"generic decoding with the same examples {np.mean(generic):.3f}")


if __name__ == "__main__":
    main()
