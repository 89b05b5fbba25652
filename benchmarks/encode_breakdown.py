"""Where one image encoding's time goes: process CPU time per module, and the deformable sampling inside it.

    OMP_NUM_THREADS=1 python benchmarks/encode_breakdown.py                 # Swin-T, random weights, 640x853

Times (medians of --repeats, after one warm-up) the backbone, the pixel decoder, its deformable encoder
(``transformer``), the FPN's stride-4 layers (``adapter_1``, ``layer_1``, ``mask_features``) and its upsampling
(``F.interpolate``), and, summed over the encoder's layers, the deformable sampling (``ms_deform_attn._sample``)
and the ``embedding_bag`` inside it. To compare revisions, run this file from a ``git archive`` of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch


def main() -> None:
    from dinov.config import PRESETS
    from dinov.modeling import ms_deform_attn
    from dinov.modeling.dinov import build_dinov
    from dinov.transforms import padded_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="swin_t", choices=sorted(PRESETS))
    parser.add_argument("--size", default="640x853", help="HEIGHTxWIDTH of the (already resized) input")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_dinov(PRESETS[args.preset]()).eval()
    height, width = (int(v) for v in args.size.split("x"))
    # built here, not with dinov.tools.bench.random_image, so that this file runs in older revisions too
    ph, pw = padded_size(height, width, model.size_divisibility)
    image = torch.zeros(1, 3, ph, pw)
    image[..., :height, :width] = torch.randn(1, 3, height, width)

    spent: dict[str, float] = defaultdict(float)

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        def run(*a, **k):  # type: ignore[no-untyped-def]
            start = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.process_time() - start
        return run

    pixel_decoder = model.sem_seg_head.pixel_decoder
    modules = {"backbone": model.backbone, "pixel decoder": pixel_decoder,
               "pixel decoder: deformable encoder": pixel_decoder.transformer}
    modules.update({f"pixel decoder: FPN {name}": getattr(pixel_decoder, name)
                    for name in ("adapter_1", "layer_1", "mask_features") if hasattr(pixel_decoder, name)})
    for name, module in modules.items():
        module.forward = timed(name, module.forward)  # type: ignore[method-assign]
    ms_deform_attn._sample = timed("deformable sampling (all layers)", ms_deform_attn._sample)
    # the sampling reads torch.nn.functional.embedding_bag at call time
    torch.nn.functional.embedding_bag = timed("  of it embedding_bag", torch.nn.functional.embedding_bag)
    # the FPN's upsampling of the coarser level (the only F.interpolate of an encoding)
    torch.nn.functional.interpolate = timed("pixel decoder: FPN upsampling", torch.nn.functional.interpolate)

    rounds: dict[str, list[float]] = defaultdict(list)
    with torch.inference_mode():
        model.encode(image)
        for _ in range(args.repeats):
            spent.clear()
            start = time.process_time()
            model.encode(image)
            rounds["encode"].append(time.process_time() - start)
            for name, seconds in spent.items():
                rounds[name].append(seconds)
    print(f"{args.preset} {height}x{width}, {torch.get_num_threads()} thread(s), CPU s, median of {args.repeats}")
    order = ["encode", *modules, "pixel decoder: FPN upsampling", "deformable sampling (all layers)",
             "  of it embedding_bag"]
    for name in order:
        print(f"{name:40s} {statistics.median(rounds[name]):7.3f}")

if __name__ == "__main__":
    main()
