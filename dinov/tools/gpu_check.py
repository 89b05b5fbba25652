"""Everything to check on a GPU machine, in one short run, with one JSON report (`scripts/gpu_check.sh`).

    python -m dinov.tools.gpu_check --out gpu_check.json               # on a CUDA machine, a few minutes
    python -m dinov.tools.gpu_check --dry-run --out dry.json           # the same steps on the CPU at small sizes

Steps, each timed and recorded even when one fails:
1. the tests marked `cuda` (`pytest -m cuda`: CUDA equals CPU, batched equals single, bf16, the backend on CUDA);
2. bf16 autocast against float32 on the demo model and generated scenes (mask IoU, goal >= 0.95);
3. `dinov.tools.bench` for Swin-T and Swin-L (random weights) at 800x1333, batch 1 and 8, bf16 autocast;
4. click latency with cached features (Swin-T, through `DINOvPredictor.segment_interactive`, all post-processing
   included) and generic segmentation with its post-processing;
5. the peak GPU memory over all of it.
The report says which of the issue's goals were met (H100-class: Swin-T >= 30 images/s batched, a click
<= 50 ms, Swin-L >= 10 images/s). The dry run uses the CPU, 128x192 inputs, batch 1 and 2, one repeat.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dinov.config import PRESETS
from dinov.modeling.dinov import DINOv, build_dinov

REPO_ROOT = Path(__file__).resolve().parents[2]
GOALS = {"swin_t_images_per_s": 30.0, "click_ms": 50.0, "swin_l_images_per_s": 10.0, "bf16_mean_iou": 0.95}


def _step(report: dict, name: str, fn: Callable[[], Any]) -> Any:
    """Run one step; its result, or its error, goes into the report with its duration."""
    started = time.perf_counter()
    try:
        result = fn()
        report["steps"][name] = {"ok": True, "seconds": round(time.perf_counter() - started, 2)}
        return result
    except Exception as e:  # a failed step must not hide the others' figures
        report["steps"][name] = {"ok": False, "seconds": round(time.perf_counter() - started, 2),
                                 "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        return None


def run_cuda_tests(dry_run: bool) -> dict:
    """pytest -m cuda; counts from its JUnit XML (on the CPU every test is skipped: a dry run checks the wiring)."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "cuda.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/dinov/test_cuda.py", f"--junitxml={junit}"]
        completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
        root = ElementTree.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is None:
            raise RuntimeError(f"pytest's JUnit report has no testsuite (exit code {completed.returncode})")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["exit_code"] = completed.returncode
    return {**counts, "output_tail": completed.stdout[-1500:]}


def bf16(device: str, scenes: int) -> dict:
    from dinov.predictor import DINOvPredictor
    from dinov.tools.precision import bf16_agreement

    predictor = DINOvPredictor.from_checkpoint("demo", device=device, autocast_dtype=None)
    return bf16_agreement(predictor, scenes=scenes)


def bench(preset: str, size: str, device: str, batch: int, repeats: int, dtype: str,
          model: DINOv | None = None) -> dict:
    from dinov.tools import bench as stage_bench

    height, width = (int(v) for v in size.split("x"))
    results = stage_bench.run(preset, height, width, device, repeats, classes=1, dtype=dtype, batch=batch,
                              model=model)
    results["images_per_s"] = batch / results["encode_image_s"]
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def click_latency(device: str, size: tuple[int, int], clicks: int, dtype: str) -> dict:
    """A click on an already encoded Swin-T image (random weights): the whole predictor call, masks on the host."""
    from dinov.config import swin_t
    from dinov.modeling.dinov import build_dinov
    from dinov.predictor import DINOvPredictor
    from dinov.transforms import ResizeConfig

    torch.manual_seed(0)
    autocast = None if dtype == "float32" else getattr(torch, dtype)
    predictor = DINOvPredictor(build_dinov(swin_t()), device=device, resize=ResizeConfig(shortest_edge=None),
                               autocast_dtype=autocast)
    image = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    encoded = predictor.encode_image(image)
    example = np.zeros(size, bool)
    example[size[0] // 3 : size[0] // 2, size[1] // 3 : size[1] // 2] = True
    classes = [predictor.encode_prompts(encoded, example)]
    rng = np.random.default_rng(1)

    def timed(fn: Callable[[], Any]) -> float:
        fn()  # warm-up
        times = []
        for _ in range(clicks):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    def click() -> None:
        point = [[float(rng.integers(0, size[1])), float(rng.integers(0, size[0]))]]
        predictor.segment_interactive(encoded, points=point, point_labels=[1])

    result = {"click_ms": timed(click), "generic_with_post_ms": timed(lambda: predictor.segment_generic(encoded, classes)),
              "size": f"{size[0]}x{size[1]}", "clicks": clicks}
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, small sizes, one repeat: checks the wiring")
    parser.add_argument("--out", default=str(Path(os.environ.get("MODEL_DIR", "model_dir")) / "gpu_check.json"),
                        help="the JSON report (default: MODEL_DIR/gpu_check.json)")
    parser.add_argument("--skip-tests", action="store_true", help="leave out pytest -m cuda")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.dry_run:
        device, size, batches, repeats, scenes, clicks, dtype = "cpu", "128x192", (1, 2), 1, 1, 2, "float32"
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run on a machine without a GPU", file=sys.stderr)
            return 2
        device, size, batches, repeats, scenes, clicks, dtype = "cuda", "800x1333", (1, 8), 5, 4, 20, "bfloat16"
        torch.backends.cudnn.benchmark = True
    report: dict[str, Any] = {
        "dry_run": args.dry_run, "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "dtype": dtype, "size": size, "steps": {}, "bench": {},
    }
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if not args.skip_tests:
        report["cuda_tests"] = _step(report, "cuda_tests", lambda: run_cuda_tests(args.dry_run))
    report["bf16_vs_fp32"] = _step(report, "bf16_vs_fp32", lambda: bf16(device, scenes))
    for preset in ("swin_t", "swin_l"):
        torch.manual_seed(0)
        model = build_dinov(PRESETS[preset]())  # once per preset: building Swin-L takes longer than a bench
        for batch in batches:
            key = f"{preset}_b{batch}"
            report["bench"][key] = _step(
                report, f"bench_{key}",
                functools.partial(bench, preset, size, device, batch, repeats, dtype, model))
        del model
    height, width = (int(v) for v in size.split("x"))
    report["latency"] = _step(report, "click_latency", lambda: click_latency(device, (height, width), clicks, dtype))
    peaks = [b["peak_memory_mb"] for b in report["bench"].values() if b]
    # each bench resets the peak statistics: the largest of their peaks and of what ran since the last one
    report["peak_gpu_memory_mb"] = max(peaks + [torch.cuda.max_memory_allocated() / 2**20]) if device == "cuda" else None
    report["peak_memory_mb"] = max(peaks) if peaks else None  # on the CPU: the resident set size

    def best(preset: str) -> float | None:
        rates = [b["images_per_s"] for key, b in report["bench"].items() if b and key.startswith(preset)]
        return max(rates) if rates else None

    bf = report["bf16_vs_fp32"] or {}
    measured = {"swin_t_images_per_s": best("swin_t"), "swin_l_images_per_s": best("swin_l"),
                "click_ms": (report["latency"] or {}).get("click_ms"),
                "bf16_mean_iou": min((v["mean_iou"] for v in bf.values()), default=None)}
    report["goals"] = {name: {"goal": GOALS[name], "measured": value,
                              "met": None if value is None else (value <= GOALS[name] if name == "click_ms"
                                                                 else value >= GOALS[name])}
                       for name, value in measured.items()}
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    report["all_steps_ok"] = all(step["ok"] for step in report["steps"].values()) and \
        (args.skip_tests or (report.get("cuda_tests") or {}).get("exit_code") in (0, 5) and
         not (report.get("cuda_tests") or {}).get("failures") and not (report.get("cuda_tests") or {}).get("errors"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    summary = {name: (goal["measured"], goal["met"]) for name, goal in report["goals"].items()}
    print(json.dumps({"out": args.out, "elapsed_s": report["elapsed_s"], "all_steps_ok": report["all_steps_ok"],
                      "goals (measured, met)": summary}, indent=2, default=str))
    return 0 if report["all_steps_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
