"""Train or fine-tune DINOv.

From scratch on generated scenes (the demo model's commands, from scratch and then with shared-class batches,
are in BENCHMARKS.md):

    python -m dinov.train --config demo --data scenes --steps 800 --batch-classes 10 --out runs/demo --export runs/demo/demo.safetensors
    python -m dinov.eval.calibrate --checkpoint runs/demo/demo.safetensors --write   # its default score threshold

Fine-tune a released checkpoint on a Label Studio export (or COCO instances) of a project:

    python -m dinov.train --init swinT --data export.json --images ./images --freeze-backbone --out runs/mine

The evaluation on held-out data is printed before and after training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (set before torch loads OpenMP): on a shared machine
# spinning threads slow training many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from dinov.build import load_model, save_model
from dinov.config import PRESETS
from dinov.data.scenes import Scene
from dinov.modeling.dinov import build_dinov
from dinov.train.config import CHEAP_RECIPE, TrainConfig
from dinov.train.trainer import Trainer, train, with_shape_encoder

logger = logging.getLogger("dinov.train")


def load_dataset(data: str, images: Path | None, seeds: range) -> Sequence[Scene]:
    """`scenes` (generated), a Label Studio JSON export, or a COCO instances file."""
    if data == "scenes":
        from dinov.data.scenes import SceneDataset

        return SceneDataset(seeds)
    path = Path(data)
    if not path.exists():
        raise SystemExit(f"--data {data}: no such file; give 'scenes', a Label Studio JSON export or a COCO json")
    content = json.loads(path.read_text())
    if isinstance(content, dict) and "annotations" in content and "images" in content:
        from dinov.data.coco import load_coco

        if images is None:
            raise SystemExit("--images is required with COCO annotations")
        return load_coco(path, images)
    from dinov.data.labelstudio_export import load_labelstudio_export

    return load_labelstudio_export(path, images)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(PRESETS), default="demo", help="architecture when training from scratch")
    parser.add_argument("--init", help="start from this checkpoint (demo, swinT, swinL or a path)")
    parser.add_argument("--data", default="scenes", help="'scenes', a Label Studio JSON export, or COCO json")
    parser.add_argument("--images", type=Path, help="folder of the images an export refers to")
    parser.add_argument("--out", type=Path, required=True, help="run folder (last.pt is resumable)")
    parser.add_argument("--export", type=Path, help="also write the final weights as safetensors here")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--eval-scenes", type=int, default=0, help="held-out generated scenes to evaluate on (0: skip)")
    parser.add_argument("--shape-dim", type=int, default=0,
                        help="add the shape extension of class matching with embeddings of this width (0: as the "
                             "model is); the new encoder starts random, every other weight from --init")
    parser.add_argument("--shape-pretrain-steps", type=int, default=400,
                        help="with a new shape encoder (--shape-dim), first train it alone this many steps to tell "
                             "the data's classes apart from their masks (dinov.train.shape_pretrain)")
    parser.add_argument("--shape-logit-scale", type=float, default=1.0,
                        help="initial weight of a new shape encoder's similarity in the class logit")
    parser.add_argument("--cheap", action="store_true",
                        help="the cheap step (dinov.train.config.CHEAP_RECIPE: crops, mask points, denoising and interactive "
                             "queries) unless those flags are given")
    parser.add_argument("--cache-dir", type=Path, default=Path("model_dir"), help="where swinT/swinL are downloaded")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            # --flag / --no-flag, so that options on by default can be turned off (ablations)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if args.cheap:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        values.update({k: v for k, v in CHEAP_RECIPE.items() if "--" + k.replace("_", "-") not in given})
    train_config = TrainConfig(**values)
    if args.init:
        model, model_config, _ = load_model(args.init, cache_dir=args.cache_dir)
    else:
        model_config = PRESETS[args.config]()
        model = build_dinov(model_config)
    resuming = args.resume and (args.out / "last.pt").exists()
    dataset = load_dataset(args.data, args.images, range(0, 1_000_000))
    if args.shape_dim and model.head.shape_encoder is None:
        model, model_config = with_shape_encoder(model, model_config, args.shape_dim)
        encoder = model.head.shape_encoder
        assert encoder is not None  # with_shape_encoder gave the head one
        with torch.no_grad():
            encoder.logit_scale.fill_(args.shape_logit_scale)
        if args.shape_pretrain_steps and not resuming:
            from dinov.train.shape_pretrain import pretrain_shape_encoder

            num_classes = len(dataset.class_names) if hasattr(dataset, "class_names") else \
                1 + max(int(c) for scene in dataset for c in scene.classes)
            losses = pretrain_shape_encoder(encoder, dataset, num_classes, args.shape_pretrain_steps, seed=args.seed)
            logger.info("shape encoder pretrained %d steps: loss %.3f -> %.3f", len(losses),
                        sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:]))
    trainer = Trainer(model, model_config, train_config, device=args.device)
    if resuming:
        trainer.resume(args.out / "last.pt")
        logger.info("resumed at step %d", trainer.step)

    if args.eval_scenes:
        from dinov.eval.evaluate import evaluate_model, format_report

        logger.info("evaluation before training:\n%s", format_report(evaluate_model(trainer.model, args.eval_scenes)))
    history = train(trainer, dataset, args.out)
    if history:
        first = sum(h["total"] for h in history[:20]) / min(20, len(history))
        last = sum(h["total"] for h in history[-20:]) / min(20, len(history))
        logger.info("loss: first steps %.3f, last steps %.3f", first, last)
    if args.export:
        args.export.parent.mkdir(parents=True, exist_ok=True)
        save_model(trainer.model.eval(), model_config, args.export,
                   metadata={"train_config": json.dumps(dataclasses.asdict(train_config)), "data": str(args.data)})
        logger.info("wrote %s", args.export)
    if args.eval_scenes:
        from dinov.eval.evaluate import evaluate_model, format_report

        logger.info("evaluation after training:\n%s", format_report(evaluate_model(trainer.model, args.eval_scenes)))


if __name__ == "__main__":
    main()
