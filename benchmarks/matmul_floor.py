"""How fast the encoding and referring could be if only their matrix products and convolutions cost anything.

    OMP_NUM_THREADS=1 python benchmarks/matmul_floor.py --threads 1     # Swin-T, random weights, 640x853
    python benchmarks/matmul_floor.py --threads 2

Records every dense product a stage runs (under inference mode a dispatch mode sees them as ``linear``,
``conv2d``, ``scaled_dot_product_attention``, ``einsum``, ``matmul`` and the fused layers' ``addmm``/``addmm_``),
then times each of them again on its own, with fresh random inputs of the same shapes and strides, in the same
process, and sums them: the stage's time if every copy, elementwise op, norm and the deformable sampling cost
nothing. Also times the stage's deformable sampling (``ms_deform_attn._sample``, all layers) and an SGEMM, and
prints what issue 22's target for the stage (encode: 70 % of the SGEMM on one thread, 60 % on two; referring:
0.75 s) leaves for all the work that is not a product. Wall clock: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Under inference mode a dispatch mode sees the composite ops (linear, conv2d, ...) before they are decomposed.
DENSE_OPS = {
    aten.linear.default, aten.conv2d.default, aten.scaled_dot_product_attention.default, aten.matmul.default,
    aten.einsum.default, aten.addmm.default, aten.addmm_.default, aten.mm.default, aten.bmm.default,
    aten.baddbmm.default, aten.convolution.default,
}


class TensorSpec:
    """Shape, strides and dtype of one argument: enough to make a fresh input the kernel treats the same way."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.shape, self.stride, self.dtype = tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype

    def make(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype).normal_()


class DenseOpRecorder(TorchDispatchMode):
    """Runs everything as usual and keeps the dense products' calls (op, argument specs)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, list[Any], dict[str, Any]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in DENSE_OPS:
            self.calls.append((func, [_spec(a) for a in args], {k: _spec(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSpec(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_spec(v) for v in value)
    return value


def _make(value: Any) -> Any:
    if isinstance(value, TensorSpec):
        return value.make()
    if isinstance(value, (list, tuple)):
        return type(value)(_make(v) for v in value)
    return value


def replay_seconds(calls: list[tuple[Any, list[Any], dict[str, Any]]], repeats: int) -> dict[str, float]:
    """Wall-clock time of each recorded product run on its own (median of `repeats` after a warm-up), summed per op."""
    totals: dict[str, float] = {}
    for func, spec, kwspec in calls:
        args = [_make(a) for a in spec]
        kwargs = {k: _make(v) for k, v in kwspec.items()}
        func(*args, **kwargs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            func(*args, **kwargs)
            times.append(time.perf_counter() - start)
        name = str(func.overloadpacket.__name__)
        totals[name] = totals.get(name, 0.0) + statistics.median(times)
    return totals


def sampling_seconds(fn: Callable[[], object]) -> float:
    """Wall-clock time `fn` spends in the deformable sampling (every layer's ``ms_deform_attn._sample``)."""
    from dinov.modeling import ms_deform_attn

    sample, spent = ms_deform_attn._sample, [0.0]

    def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return sample(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    ms_deform_attn._sample = timed
    try:
        fn()
    finally:
        ms_deform_attn._sample = sample
    return spent[0]


def main() -> None:
    from dinov.config import PRESETS
    from dinov.modeling.dinov import build_dinov
    from dinov.predictor import point_grid_boxes
    from dinov.tools import bench

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="swin_t", choices=sorted(PRESETS))
    parser.add_argument("--size", default="640x853", help="HEIGHTxWIDTH of the (already resized) input")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sgemm-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_dinov(PRESETS[args.preset]()).eval()
    height, width = (int(v) for v in args.size.split("x"))
    image = bench.random_image(height, width, model.size_divisibility)
    ph, pw = image.shape[-2:]
    prompt = torch.zeros(1, ph, pw)
    prompt[0, height // 3 : height // 2, width // 3 : width // 2] = 1.0

    with torch.inference_mode():
        multi_scale, mask_features = model.encode(image)
        content = model.head.encode_prompts(multi_scale, prompt)
        grid = point_grid_boxes(model.points_per_side, (ph, pw))
        stages: dict[str, Callable[[], object]] = {
            "encode": lambda: model.encode(image),
            "referring": lambda: bench.referring(model, multi_scale, mask_features, content, grid),
        }
        a, b = torch.randn(args.sgemm_size, args.sgemm_size), torch.randn(args.sgemm_size, args.sgemm_size)
        times = bench.timed_rounds({"sgemm_s": lambda: torch.mm(a, b), **stages}, args.repeats, torch.device("cpu"))
        sgemm_gflops = 2 * args.sgemm_size**3 / 1e9 / times["sgemm_s"]
        threads = torch.get_num_threads()
        print(f"{args.preset} {height}x{width}, {threads} thread(s), wall-clock s (load average "
              f"{os.getloadavg()[0]:.2f}), medians of {args.repeats}; SGEMM {args.sgemm_size}^3: "
              f"{sgemm_gflops:.1f} GFLOP/s")
        for name, fn in stages.items():
            measured = times[name]
            gflop = bench.plain_flops(fn) / 1e9
            sampling = statistics.median(sampling_seconds(fn) for _ in range(args.repeats))
            recorder = DenseOpRecorder()
            with recorder:
                fn()
            per_op = replay_seconds(recorder.calls, args.repeats)
            floor = sum(per_op.values())
            print(f"\n{name}: measured {measured:.3f} s, {gflop:.1f} GFLOP ({gflop / measured:.1f} GFLOP/s, "
                  f"{gflop / measured / sgemm_gflops:.1%} of SGEMM)")
            print(f"  dense products alone, each timed on its own ({len(recorder.calls)} calls): {floor:.3f} s "
                  f"= {gflop / floor:.1f} GFLOP/s, {gflop / floor / sgemm_gflops:.1%} of SGEMM; "
                  f"everything else now: {measured - floor:.3f} s, of it the deformable sampling {sampling:.3f} s")
            for op, seconds in sorted(per_op.items(), key=lambda kv: -kv[1]):
                print(f"    {op:45s} {seconds:7.3f}")
            if name == "encode":
                share = 0.7 if threads == 1 else 0.6
                target, what = gflop / (share * sgemm_gflops), f"{share:.0%} of SGEMM"
            else:
                target, what = 0.75, "0.75 s"
            print(f"  target ({what}): {target:.3f} s, leaving {target - floor:.3f} s beside the products")

if __name__ == "__main__":
    main()
