"""Click latency while a project trains: p95 of interactive clicks with no training, then while a fine-tuning
runs the way a training job does (a spawned child at nice 10 with one torch thread).

    python benchmarks/training_latency.py --clicks 40 --steps 60

The issue's bar: the p95 while training is at most twice the idle p95.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np


def train_in_child(steps: int) -> None:
    """What labelstudio_backend.training.job does to the machine: nice, one thread, the trainer."""
    import torch

    from dinov.build import load_model
    from dinov.data.scenes import generate_extra_scene
    from dinov.train.finetune import finetune, finetune_config
    from dinov.train.trainer import Trainer

    os.nice(10)
    torch.set_num_threads(1)
    scenes = [generate_extra_scene(1000 + i, size=(192, 240), num_objects=(3, 5)) for i in range(9)]
    model, config, _ = load_model("demo")
    finetune(Trainer(model, config, finetune_config(config, "decoder", steps)), scenes, max_seconds=3600)


def click_latencies(predictor, encoded, points: list, count: int) -> list[float]:
    out = []
    for i in range(count):
        started = time.perf_counter()
        predictor.segment_interactive(encoded, points=[points[i % len(points)]], point_labels=[1])
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=40)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    from dinov.data.scenes import generate_scene
    from dinov.predictor import DINOvPredictor

    predictor = DINOvPredictor.from_checkpoint("demo", device="cpu")
    scene = generate_scene(7, size=(256, 320))
    encoded = predictor.encode_image(scene.image)  # a click on an encoded image: the decoder only
    points = [[float(np.nonzero(m)[1].mean()), float(np.nonzero(m)[0].mean())] for m in scene.masks]
    click_latencies(predictor, encoded, points, 3)  # warm-up
    idle = click_latencies(predictor, encoded, points, args.clicks)
    child = multiprocessing.get_context("spawn").Process(target=train_in_child, args=(args.steps,))
    child.start()
    time.sleep(20)  # past the child's start-up (imports, model load): into its training steps
    busy = click_latencies(predictor, encoded, points, args.clicks)
    still_training = child.is_alive()
    child.terminate()
    child.join()
    p95_idle, p95_busy = np.percentile(idle, 95), np.percentile(busy, 95)
    print(f"click p95: idle {p95_idle * 1000:.0f} ms, while training {p95_busy * 1000:.0f} ms "
          f"({p95_busy / p95_idle:.2f}x; training still running at the end: {still_training})")


if __name__ == "__main__":
    main()
