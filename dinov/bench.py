"""Latency and memory of the DINOv stages, with random weights.

    python -m dinov.bench --preset swin_t --size 640x853 --device cpu

Prints the median over `--repeats` runs (after one warm-up) of: image encoding (backbone +
pixel decoder), prompt encoding (one mask), generic decoding (`--classes` classes) and
referring decoding (the 20x20 grid x 6 granularities, one prompt, with the official filter), and the peak memory
(resident set size on CPU, allocated memory on CUDA).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from contextlib import nullcontext

import torch

from dinov import postprocess
from dinov.config import PRESETS
from dinov.modeling.dinov import build_dinov
from dinov.predictor import point_grid_boxes
from dinov.transforms import padded_size


def _timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: allocator, kernels, lazy initialisation
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def referring(model, multi_scale, mask_features, content, grid):
    """Referring as the predictor runs it: decode the grid, then the official filter, computing masks
    only for the proposals that survive NMS."""
    out = model.head.decode_referring(multi_scale, mask_features, content, grid, with_masks=False)
    return postprocess.filter_referring(
        pred_boxes=out["pred_boxes"][0], pred_ious=out["pred_ious"][0], pred_match_score=out["pred_match_score"][0],
        mask_embed=out["mask_embed"][0], mask_features=mask_features[0], nms_threshold=model.nms_threshold,
    )


def run(preset: str, height: int, width: int, device: str, repeats: int, classes: int, dtype: str,
        baseline: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_dinov(PRESETS[preset]()).to(dev).eval()
    ph, pw = padded_size(height, width, model.size_divisibility)
    image = torch.zeros(1, 3, ph, pw, device=dev)
    image[..., :height, :width] = torch.randn(1, 3, height, width, device=dev)
    prompt = torch.zeros(1, ph, pw, device=dev)
    prompt[0, height // 3 : height // 2, width // 3 : width // 2] = 1.0
    autocast = (torch.autocast(device_type="cuda", dtype=getattr(torch, dtype))
                if dev.type == "cuda" and dtype != "float32" else nullcontext())
    head = model.head
    with torch.inference_mode(), autocast:
        multi_scale, mask_features = model.encode(image)
        content = head.encode_prompts(multi_scale, prompt)
        bank = content.label.repeat(1, classes, 1)
        grid = point_grid_boxes(model.points_per_side, (ph, pw)).to(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        results = {
            "encode_image_s": _timed(lambda: model.encode(image), repeats, dev),
            "encode_prompt_s": _timed(lambda: head.encode_prompts(multi_scale, prompt), repeats, dev),
            "decode_generic_s": _timed(lambda: head.decode_generic(multi_scale, mask_features, bank), repeats, dev),
            "decode_referring_s": _timed(lambda: referring(model, multi_scale, mask_features, content, grid),
                                         repeats, dev),
        }
        if baseline:
            # The official computation: dense masked self-attention over all 2400 referring queries and
            # the masks of all of them.
            results["decode_referring_dense_s"] = _timed(
                lambda: head.decode_referring(multi_scale, mask_features, content, grid, dense_attention=True),
                repeats, dev,
            )
    if dev.type == "cuda":
        results["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        results["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DINOv stage latencies with random weights")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="swin_t")
    parser.add_argument("--size", default="640x853", help="HEIGHTxWIDTH of the (already resized) input")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=1, help="classes in the generic bank")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="autocast dtype on CUDA (CPU always runs float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--baseline", action="store_true",
                        help="also time referring with the official dense 2400x2400 masked attention")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.lower().split("x"))
    results = run(args.preset, height, width, args.device, args.repeats, args.classes, args.dtype, args.baseline)
    print(f"preset={args.preset} size={height}x{width} device={args.device} dtype={args.dtype if args.device != 'cpu' else 'float32'} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}")
    for key, value in results.items():
        print(f"{key:22s} {value:10.3f}")


if __name__ == "__main__":
    main()
