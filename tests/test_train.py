"""Training: the loss falls on generated scenes, runs resume, and fine-tuning from a Label Studio
export runs end to end."""

import numpy as np
import pytest
import torch

from dinov.checkpoint import load_model, save_model
from dinov.config import demo
from dinov.data.scenes import SceneDataset, generate_scene
from dinov.modeling.dinov import build_dinov
from dinov.train.trainer import TrainConfig, Trainer, batches, train


def small_config(**overrides) -> TrainConfig:
    values = dict(steps=40, batch_size=2, lr=1e-3, warmup_steps=5, min_size=96, max_size=112,
                  interactive_per_image=3, mask_points=256, log_every=10, checkpoint_every=20)
    values.update(overrides)
    return TrainConfig(**values)


def test_short_training_run_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(build_dinov(demo()), demo(), small_config())
    history = train(trainer, SceneDataset(range(200)), tmp_path, progress=False)
    assert len(history) == 40 and trainer.step == 40
    first = np.mean([h["total"] for h in history[:8]])
    last = np.mean([h["total"] for h in history[-8:]])
    assert last < 0.6 * first, (first, last)
    assert (tmp_path / "last.pt").exists()


def test_resume_continues_from_the_saved_step(tmp_path):
    torch.manual_seed(0)
    config = small_config(steps=4, checkpoint_every=2)
    trainer = Trainer(build_dinov(demo()), demo(), config)
    train(trainer, SceneDataset(range(20)), tmp_path, progress=False)
    resumed = Trainer(build_dinov(demo()), demo(), small_config(steps=6))
    resumed.resume(tmp_path / "last.pt")
    assert resumed.step == 4
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key])
    history = train(resumed, SceneDataset(range(20)), tmp_path, progress=False)
    assert len(history) == 2 and resumed.step == 6


def test_batches_hold_prepared_instances():
    config = small_config(batch_size=3)
    batch = next(batches(SceneDataset(range(10)), config, np.random.default_rng(0)))
    assert len(batch) == 3
    for sample in batch:
        assert 96 <= min(sample.image.shape[1:]) <= 112
        assert sample.masks.shape[1:] == sample.image.shape[1:] and len(sample.masks) == len(sample.classes) >= 1


def test_fine_tuning_from_a_labelstudio_export_runs_end_to_end(tmp_path, caplog):
    from dinov.data.labelstudio_export import write_labelstudio_export
    from dinov.data.scenes import class_names
    from dinov.train.__main__ import main

    scenes = [generate_scene(seed, size=(96, 112), num_objects=(1, 3)) for seed in range(4)]
    export = write_labelstudio_export(scenes, class_names(), tmp_path / "export", region="brush")
    init = tmp_path / "init.safetensors"
    save_model(build_dinov(demo()), demo(), init)
    out = tmp_path / "run"
    caplog.set_level("INFO")
    main(["--init", str(init), "--data", str(export), "--images", str(export.parent), "--out", str(out),
          "--steps", "3", "--batch-size", "2", "--min-size", "96", "--max-size", "112", "--freeze-backbone",
          "--mask-points", "128", "--export", str(out / "tuned.safetensors"), "--eval-scenes", "1"])
    assert "evaluation before training" in caplog.text and "evaluation after training" in caplog.text
    tuned, config, _ = load_model(out / "tuned.safetensors")
    assert config == demo()
    initial, _, _ = load_model(init)
    # The backbone was frozen; the head was trained.
    for key, value in initial.backbone.state_dict().items():
        assert torch.equal(value, tuned.backbone.state_dict()[key])
    assert not torch.equal(initial.head.query_feat.weight, tuned.head.query_feat.weight)
