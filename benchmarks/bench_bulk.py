"""Throughput of the bulk pipeline: images per second against batch size and image-fetch workers.

    python benchmarks/bench_bulk.py                                   # demo model and Swin-T (random), CPU
    python benchmarks/bench_bulk.py --models swinT --device cuda --batch-sizes 1,8,16 --images 64

Each row runs a whole bulk job in folder mode (labelstudio_backend.bulk.run_bulk with --images/--references/
--out): the images are generated scenes written as PNG files, the references a Label Studio export of two
annotated scenes. Every image costs --fetch-latency seconds more to fetch, as a download from Label Studio or
cloud storage would, which is what the fetch workers overlap with the model. images/s is measured over the
prediction loop (fetch, batched encode, segmentation against the pinned references, writing); loading the
model and pinning the references are not counted.

Models: `demo` (dinov/assets/demo.safetensors; the official-architecture mini checkpoint of the reference data
until the demo model exists, see --mini), `swinT` (the released Swin-T architecture with random weights, at
the released models' test size 800/1333), or a checkpoint path.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from dinov.build import DEMO_CHECKPOINT  # noqa: E402
from dinov.data.scenes import class_id, class_names, generate_scene  # noqa: E402
from dinov.predictor import DINOvPredictor  # noqa: E402
from dinov.transforms import ResizeConfig  # noqa: E402
from labelstudio_backend import bulk  # noqa: E402
from labelstudio_backend.bulk import job as bulk_job  # noqa: E402
from labelstudio_backend.labelstudio.regions import encode_rle  # noqa: E402
from labelstudio_backend.settings import Settings  # noqa: E402

MINI_CHECKPOINT = REPO_ROOT.parent / "shared" / "dinov_reference" / "miniT_ckpt.pth"
CLASSES = [class_id("square", "red"), class_id("circle", "blue")]


def load_predictor(name: str, device: str, mini: Path) -> tuple[DINOvPredictor, str]:
    """(predictor, what it is)."""
    if name == "swinT":
        from dinov.config import swin_t
        from dinov.modeling.dinov import build_dinov

        torch.manual_seed(0)
        model = build_dinov(swin_t())
        resize = ResizeConfig(shortest_edge=800, max_size=1333)
        return DINOvPredictor(model, device=device, resize=resize, checkpoint_id="swinT-random"), \
            "Swin-T, random weights, 800/1333"
    if name == "demo":
        if DEMO_CHECKPOINT.exists():
            return DINOvPredictor.from_checkpoint("demo", device=device), "demo model"
        predictor = DINOvPredictor.from_checkpoint(str(mini), device=device)
        return predictor, f"{mini.name} (demo model not trained yet), {predictor.resize.shortest_edge}/" \
                          f"{predictor.resize.max_size}"
    predictor = DINOvPredictor.from_checkpoint(name, device=device)
    return predictor, name


def write_dataset(folder: Path, count: int, size: tuple[int, int]) -> tuple[Path, Path]:
    """count scene images to predict, plus an export of two annotated scenes (the references)."""
    names = [class_names()[c] for c in CLASSES]
    images = folder / "images"
    refs = folder / "refs"
    images.mkdir(parents=True)
    refs.mkdir()
    for i in range(count):
        Image.fromarray(generate_scene(1000 + i, size=size, num_objects=3, classes=CLASSES).image).save(
            images / f"scene{i:04d}.png")
    export = []
    for i in range(2):
        scene = generate_scene(i, size=size, num_objects=2, classes=CLASSES)
        Image.fromarray(scene.image).save(refs / f"ref{i}.png")
        result = [{"id": f"r{i}_{j}", "type": "brushlabels", "from_name": "tag", "to_name": "image",
                   "original_width": size[1], "original_height": size[0],
                   "value": {"format": "rle", "rle": encode_rle(mask), "brushlabels": [names[CLASSES.index(int(c))]]}}
                  for j, (mask, c) in enumerate(zip(scene.masks, scene.classes))]
        export.append({"id": i + 1, "data": {"image": f"/data/upload/1/0000000{i}-ref{i}.png"},
                       "annotations": [{"id": i + 1, "result": result, "updated_at": "2024-05-01T10:00:00Z"}]})
    (refs / "export.json").write_text(json.dumps(export))
    return images, refs / "export.json"


class SlowFolderImages(bulk.FolderImages):
    latency = 0.0

    def fetch(self, url, task_id=None):
        time.sleep(self.latency)
        return super().fetch(url, task_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,swinT", help="comma-separated: demo, swinT, or checkpoint paths")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--workers", default="1,4", help="image-fetch threads to try")
    parser.add_argument("--images", type=int, default=16, help="images per run")
    parser.add_argument("--size", default="480x640", help="image size HxW")
    parser.add_argument("--fetch-latency", type=float, default=0.05, help="seconds added to each image fetch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--mini", type=Path, default=MINI_CHECKPOINT, help="stand-in for the demo model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.lower().split("x"))
    batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    workers = [int(v) for v in args.workers.split(",")]
    SlowFolderImages.latency = args.fetch_latency

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, export = write_dataset(tmp / "data", args.images, (height, width))
        original = bulk_job.FolderImages
        bulk_job.FolderImages = SlowFolderImages  # run_bulk builds its folder image source from this name
        try:
            for name in args.models.split(","):
                predictor, what = load_predictor(name, args.device, args.mini)
                settings = Settings(model_dir=tmp / f"model_dir-{len(rows)}", device=args.device,
                                    score_threshold=0.3)
                warm = bulk.BulkOptions(images=images, references=export, out=tmp / "warm.json", progress=False,
                                        batch_size=2, task_ids=None)
                bulk.run_bulk(warm, settings, model_factory=lambda s, p=predictor: p)  # pins references, warms up
                for batch in batch_sizes:
                    for count in workers:
                        out = tmp / f"{name.replace('/', '_')}-{batch}-{count}.json"
                        options = bulk.BulkOptions(images=images, references=export, out=out, progress=False,
                                                   batch_size=batch, workers=count)
                        report = bulk.run_bulk(options, settings, model_factory=lambda s, p=predictor: p)
                        assert report.done == args.images, report.summary()
                        rows.append((what, args.device, batch, count, report.images_per_second))
                        print(f"{what}: batch {batch}, workers {count}: {report.images_per_second:.2f} images/s",
                              file=sys.stderr, flush=True)
        finally:
            bulk_job.FolderImages = original

    print(f"\n{args.images} images of {width}x{height} px, {args.fetch_latency * 1000:.0f} ms fetch latency each, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| model | device | batch size | fetch workers | images/s |")
    print("|---|---|---|---|---|")
    for what, device, batch, count, rate in rows:
        print(f"| {what} | {device} | {batch} | {count} | {rate:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
