"""Latency and memory of the DINOv stages, with random weights.

    python -m dinov.tools.bench --preset swin_t --size 640x853 --device cpu --threads 1

Prints the image encoding's arithmetic rate (`encode_gflops`: the encoding's multiply-add work, counted with
`torch.utils.flop_counter` on the plain layers, over its median time) and its share of the same run's SGEMM rate
(`sgemm_gflops`, `torch.mm` of two `--sgemm-size` square matrices, timed in the same rounds as the stages), a
ratio that carries across machines; `encode_image_plain_s` times the encoding with the inference fusions of
`dinov.modeling.fused` switched off (the plain layers), in the same rounds.

Prints the median over `--repeats` rounds (after one warm-up round; the stages take turns within a round, so
that a change in the machine's load hits all of them alike) of: image encoding (backbone + pixel decoder),
prompt encoding (one mask), generic segmentation as the predictor runs it (`--classes` classes, the official
score rule, at most `--max-instances` instances: decoding AND its post-processing, with the time of each
post-processing step), referring decoding (the 20x20 grid x 6 granularities, one prompt, with the official
filter), and the peak memory (resident set size on CPU, allocated memory on CUDA). `--batch N` encodes N images
at once (throughput figures for GPUs). `--json FILE` writes the figures with the settings and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from contextlib import nullcontext
from typing import Callable

import torch

from dinov import postprocess
from dinov.config import PRESETS
from dinov.mask_upsampling import MaskResizer
from dinov.modeling import fused
from dinov.modeling.dinov import DINOv, build_dinov
from dinov.modeling.prompt_encoder import PromptContent
from dinov.predictor import DINOvPredictor, EncodedImage, point_grid_boxes
from dinov.transforms import ResizeConfig, padded_size


def timed_rounds(stages: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each stage over `repeats` rounds, stages interleaved within each round: wall-clock
    (`<stage>`) and, on the CPU, the process's CPU time (`<stage>` with `_s` -> `_cpu_s`), which other work on a
    shared machine inflates much less than the wall clock (with one thread it is what an idle machine's wall
    clock would show, less the memory bandwidth other processes take)."""
    def once(fn: Callable[[], object]) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu

    for fn in stages.values():
        fn()  # warm-up: allocator, kernels, lazy initialisation
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in stages}
    for _ in range(repeats):
        for name, fn in stages.items():
            times[name].append(once(fn))
    results = {name: statistics.median(t[0] for t in values) for name, values in times.items()}
    if device.type == "cpu":
        for name, values in times.items():
            results[name.removesuffix("_s") + "_cpu_s"] = statistics.median(t[1] for t in values)
    return results


def plain_flops(fn: Callable[[], object]) -> int:
    """Multiply-add work of running `fn` (2 per multiply-add), counted on the plain layers (the fused ones do the
    same products through in-place calls the counter does not see)."""
    from torch.utils.flop_counter import FlopCounterMode

    enabled, fused.ENABLED = fused.ENABLED, False
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        fused.ENABLED = enabled
    return int(counter.get_total_flops())


def _plain(fn: Callable[[], object]) -> Callable[[], object]:
    def run_plain() -> object:
        enabled, fused.ENABLED = fused.ENABLED, False
        try:
            return fn()
        finally:
            fused.ENABLED = enabled
    return run_plain


def referring(model: DINOv, multi_scale: list[torch.Tensor], mask_features: torch.Tensor, content: PromptContent,
              grid: torch.Tensor) -> postprocess.ReferringSelection:
    """Referring as the predictor runs it: decode the grid, then the official filter, computing masks
    only for the proposals that survive NMS."""
    out = model.head.decode_referring(multi_scale, mask_features, content, grid, with_masks=False)
    return postprocess.filter_referring(
        pred_boxes=out["pred_boxes"][0], pred_ious=out["pred_ious"][0], pred_match_score=out["pred_match_score"][0],
        mask_embed=out["mask_embed"][0], mask_features=mask_features[0], nms_threshold=model.nms_threshold,
    )


def random_image(height: int, width: int, size_divisibility: int, batch: int = 1,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """A batch of normal noise images of `height` x `width`, zero-padded as the model pads its input."""
    ph, pw = padded_size(height, width, size_divisibility)
    image = torch.zeros(batch, 3, ph, pw, device=device)
    image[..., :height, :width] = torch.randn(batch, 3, height, width, device=device)
    return image


def run(preset: str, height: int, width: int, device: str, repeats: int, classes: int, dtype: str,
        baseline: bool = False, batch: int = 1, max_instances: int = 100, model: DINOv | None = None,
        sgemm_size: int = 2048) -> dict[str, float]:
    """Median seconds of every stage; `model` reuses an already built network of the preset (random weights)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = (model or build_dinov(PRESETS[preset]())).to(dev).eval()
    image = random_image(height, width, model.size_divisibility, batch, dev)
    ph, pw = image.shape[-2:]
    prompt = torch.zeros(1, ph, pw, device=dev)
    prompt[0, height // 3 : height // 2, width // 3 : width // 2] = 1.0
    use_autocast = dev.type == "cuda" and dtype != "float32"
    autocast = torch.autocast(device_type="cuda", dtype=getattr(torch, dtype)) if use_autocast else nullcontext()
    head = model.head
    predictor = DINOvPredictor(model, device=dev, resize=ResizeConfig(shortest_edge=None),
                               autocast_dtype=getattr(torch, dtype) if use_autocast else None)
    with torch.inference_mode(), autocast:
        multi_scale, mask_features = model.encode(image[:1])
        multi_scale, mask_features = [f.float() for f in multi_scale], mask_features.float()
        content = head.encode_prompts(multi_scale, prompt)
        bank = content.label.repeat(1, classes, 1)
        grid = point_grid_boxes(model.points_per_side, (ph, pw)).to(dev)
        # the target image as the predictor holds it (its original size = the model input here)
        encoded = EncodedImage((height, width), (height, width), (ph, pw), multi_scale, mask_features)
        class_list = [bank[0, i : i + 1].float().cpu().numpy() for i in range(classes)]
        decoded = head.decode_generic(multi_scale, mask_features, bank, with_masks=False, aux=False)
        logits, mask_embed = decoded["pred_logits"][0].float(), decoded["mask_embed"][0].float()
        pick = postprocess.select_generic(logits, None, max_instances)
        mask_logits = postprocess.mask_logits_of(mask_embed, mask_features[0], pick.index)
        resizer = MaskResizer((ph, pw), (height, width), (height, width))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sgemm_a = torch.randn(sgemm_size, sgemm_size, device=dev)
        sgemm_b = torch.randn(sgemm_size, sgemm_size, device=dev)
        stages = {
            "encode_image_s": lambda: model.encode(image),
            "encode_image_plain_s": _plain(lambda: model.encode(image)),
            "sgemm_s": lambda: torch.mm(sgemm_a, sgemm_b),
            "encode_prompt_s": lambda: head.encode_prompts(multi_scale, prompt),
            # the generic stage as a pre-annotation runs it: decoding and every post-processing step
            "generic_s": lambda: predictor.segment_generic(encoded, class_list, max_instances=max_instances),
            "generic_decode_s": lambda: head.decode_generic(multi_scale, mask_features, bank, with_masks=False,
                                                            aux=False),
            "generic_select_s": lambda: postprocess.select_generic(logits, None, max_instances),
            "generic_mask_logits_s": lambda: postprocess.mask_logits_of(mask_embed, mask_features[0], pick.index),
            "generic_upsample_s": lambda: resizer.resize_all(mask_logits),
            "decode_referring_s": lambda: referring(model, multi_scale, mask_features, content, grid),
        }
        if baseline:
            # The official computation: dense masked self-attention over all 2400 referring queries and
            # the masks of all of them.
            stages["decode_referring_dense_s"] = lambda: head.decode_referring(
                multi_scale, mask_features, content, grid, dense_attention=True)
        results = timed_rounds(stages, repeats, dev)
        results["generic_instances"] = float(len(predictor.segment_generic(encoded, class_list,
                                                                           max_instances=max_instances)))
        results["generic_kept_queries"] = float(pick.index.numel())
    flops = plain_flops(lambda: model.encode(image))
    results["encode_gflop"] = flops / 1e9
    results["encode_gflops"] = flops / 1e9 / results["encode_image_s"]
    results["encode_plain_gflops"] = flops / 1e9 / results["encode_image_plain_s"]
    results["sgemm_gflops"] = 2 * sgemm_size**3 / 1e9 / results["sgemm_s"]
    results["encode_share_of_sgemm"] = results["encode_gflops"] / results["sgemm_gflops"]
    results["encode_plain_share_of_sgemm"] = results["encode_plain_gflops"] / results["sgemm_gflops"]
    if dev.type == "cpu":
        # the same ratio from process CPU time (with one thread: what an idle core's wall clock would give)
        results["encode_share_of_sgemm_cpu"] = results["sgemm_cpu_s"] / results["encode_image_cpu_s"] * flops \
            / (2 * sgemm_size**3)
        results["encode_plain_share_of_sgemm_cpu"] = results["sgemm_cpu_s"] / results["encode_image_plain_cpu_s"] \
            * flops / (2 * sgemm_size**3)
    if dev.type == "cuda":
        results["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        results["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if batch > 1:
        results["encode_images_per_s"] = batch / results["encode_image_s"]
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="DINOv stage latencies with random weights")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="swin_t")
    parser.add_argument("--size", default="640x853", help="HEIGHTxWIDTH of the (already resized) input")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=1, help="classes in the generic bank")
    parser.add_argument("--max-instances", type=int, default=100, help="generic instances returned at most")
    parser.add_argument("--batch", type=int, default=1, help="images encoded together (encode_image_s is per batch)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="autocast dtype on CUDA (CPU always runs float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--baseline", action="store_true",
                        help="also time referring with the official dense 2400x2400 masked attention")
    parser.add_argument("--sgemm-size", type=int, default=2048, help="side of the SGEMM the encoding is compared with")
    parser.add_argument("--json", help="also write the figures and settings to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.lower().split("x"))
    load_before = os.getloadavg()[0]
    results = run(args.preset, height, width, args.device, args.repeats, args.classes, args.dtype, args.baseline,
                  args.batch, args.max_instances, sgemm_size=args.sgemm_size)
    settings = {"preset": args.preset, "size": f"{height}x{width}", "device": args.device,
                "dtype": args.dtype if args.device != "cpu" else "float32", "threads": torch.get_num_threads(),
                "repeats": args.repeats, "batch": args.batch, "classes": args.classes,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    print(" ".join(f"{k}={v}" for k, v in settings.items()))
    for key, value in results.items():
        print(f"{key:24s} {value:10.3f}")
    report = {"settings": settings, "results": results}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
