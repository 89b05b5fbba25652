"""Stage times of two revisions of this repository, same machine, same run (issue 22).

    git archive fdf8582 | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_before_after.py --before /tmp/before --threads 1,2 --rounds 3

Each round runs one process per revision, in turns (before, after, before, ...), so a change in the machine's load
hits both alike; each process imports `dinov` and `labelstudio_backend` from its revision's folder, builds Swin-T
with the same random weights (seed 0), encodes a 640x853 image (padded to 640x864) once to warm up and then times
every stage `--repeats` times (median): image encoding, generic segmentation as a pre-annotation runs it (decoding
and post-processing, at most 100 instances), referring over the 20x20 grid (decoding, the official filter and
the upsampling of the selected masks), one click (cached features), Label Studio's brush RLE of a 1200x1600 mask,
instance selection of 40 objects at 1200x1600, and an SGEMM (`torch.mm`, 2048^3) for scale. Stage figures are
process CPU time (with one thread: what an idle core's wall clock would show) and wall clock. Prints per stage
the medians over rounds of both revisions and the before/after ratio of the medians; `--json FILE` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

_CHILD = r'''
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
import torch
torch.set_num_threads(int(sys.argv[2]))
repeats = int(sys.argv[3])
from dinov.config import PRESETS
from dinov.modeling.dinov import build_dinov
from dinov.predictor import DINOvPredictor, EncodedImage
from dinov.transforms import ResizeConfig
# the backend's modules moved (issue 18) and Instance became LabeledMask: import from whichever layout this is
try:
    from labelstudio_backend.labelstudio.regions import encode_rle
    from labelstudio_backend.serving import instances as selection
except ImportError:
    from labelstudio_backend.regions import encode_rle
    from labelstudio_backend import instances as selection
LabeledMask = getattr(selection, "LabeledMask", None) or getattr(selection, "Instance")

torch.manual_seed(0)
model = build_dinov(PRESETS["swin_t"]()).eval()
predictor = DINOvPredictor(model, resize=ResizeConfig(shortest_edge=None))
height, width, padded = 640, 853, (640, 864)
image = torch.zeros(1, 3, *padded)
image[..., :height, :width] = torch.randn(1, 3, height, width)
with torch.inference_mode():
    multi_scale, mask_features = model.encode(image)
encoded = EncodedImage((height, width), (height, width), padded, multi_scale, mask_features)
prompt = np.zeros((height, width), bool)
prompt[height // 3 : height // 2, width // 3 : width // 2] = True
embedding = predictor.encode_prompts(encoded, prompt[None])
rng = np.random.default_rng(0)
rle_mask = np.zeros((1200, 1600), bool)
rle_mask[100:900, 200:1300] = True
rle_mask[300:500, 400:600] = False
found = []
for k in range(40):
    mask = np.zeros((1200, 1600), bool)
    y, x = rng.integers(0, 1000), rng.integers(0, 1400)
    mask[y : y + rng.integers(20, 200), x : x + rng.integers(20, 200)] = True
    found.append(LabeledMask("a" if k % 2 else "b", mask, float(rng.random())))
rules = selection.SelectionRules(100, 10, False)

def encode():
    with torch.inference_mode():
        model.encode(image)

stages = {
    "encode": encode,
    "generic": lambda: predictor.segment_generic(encoded, [embedding], max_instances=100),
    "referring": lambda: predictor.segment_referring(encoded, embedding),
    "click": lambda: predictor.segment_interactive(encoded, points=[[width / 2, height / 2]], point_labels=[1]),
    "rle": lambda: encode_rle(rle_mask),
    "select": lambda: selection.select_instances(found, rules),
    "sgemm": lambda a=torch.randn(2048, 2048), b=torch.randn(2048, 2048): torch.mm(a, b),
}
for fn in stages.values():
    fn()
times = {name: [] for name in stages}
for _ in range(repeats):
    for name, fn in stages.items():
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
print(json.dumps({name: [statistics.median(t[1] for t in v), statistics.median(t[0] for t in v)]
                  for name, v in times.items()}))
'''


def run_side(folder: str, threads: int, repeats: int) -> dict[str, list[float]]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=folder)
    out = subprocess.run([sys.executable, "-c", _CHILD, folder, str(threads), str(repeats)], env=env,
                         capture_output=True, text=True, check=True, cwd=folder)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="folder of the earlier revision (git archive of it)")
    parser.add_argument("--after", default=str(HERE), help="folder of the later revision (default: this one)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of each stage in one process")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    report: dict = {"load_average_1min": [round(os.getloadavg()[0], 2)], "threads": {}}
    for threads in (int(t) for t in args.threads.split(",")):
        sides: dict[str, list[dict[str, list[float]]]] = {"before": [], "after": []}
        for _ in range(args.rounds):
            for side, folder in (("before", args.before), ("after", args.after)):
                sides[side].append(run_side(folder, threads, args.repeats))
        table = {}
        print(f"threads={threads}  stage: before -> after (CPU s | wall s), ratio before/after")
        for stage in sides["after"][0]:
            row = {}
            for kind, i in (("cpu", 0), ("wall", 1)):
                before = statistics.median(r[stage][i] for r in sides["before"])
                after = statistics.median(r[stage][i] for r in sides["after"])
                row[kind] = {"before": before, "after": after, "ratio": before / after}
            table[stage] = row
            print(f"  {stage:10s} cpu {row['cpu']['before']:8.4f} -> {row['cpu']['after']:8.4f} "
                  f"({row['cpu']['ratio']:5.2f}x) | wall {row['wall']['before']:8.4f} -> {row['wall']['after']:8.4f} "
                  f"({row['wall']['ratio']:5.2f}x)")
        report["threads"][threads] = {"stages": table, "raw": sides}
    report["load_average_1min"].append(round(os.getloadavg()[0], 2))
    print("load average (1 min) before/after the run:", report["load_average_1min"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
