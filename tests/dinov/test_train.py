"""Training: the loss falls on generated scenes, runs resume, and fine-tuning from a Label Studio
export runs end to end."""

import numpy as np
import torch

from dinov.build import load_model, save_model
from dinov.config import demo
from dinov.data.scenes import SceneDataset, generate_scene
from dinov.modeling.dinov import build_dinov
from dinov.train.config import TrainConfig
from dinov.train.sampling import batches
from dinov.train.trainer import Trainer, train


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


def _encoded_demo(seed: int = 0):
    torch.manual_seed(seed)
    model = build_dinov(demo()).eval()
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        multi_scale, mask_features = model.encode(images)
    return model, multi_scale, mask_features


def test_denoising_queries_are_isolated_from_the_matching_queries():
    """Object and class queries give exactly the same outputs with or without denoising queries, and a denoising
    group is not affected by the boxes of another group: they neither see nor are seen."""
    model, multi_scale, mask_features = _encoded_demo()
    head = model.head
    bank = torch.randn(1, 5, head.hidden_dim)
    dn = torch.rand(2, 2 * 3, 4) * 0.5 + 0.25  # 2 groups of 3 queries
    with torch.no_grad():
        plain = head.decode_generic(multi_scale, mask_features, bank, aux_masks=True)
        with_dn = head.decode_generic(multi_scale, mask_features, bank, aux_masks=True, denoising_boxes=dn,
                                      denoising_groups=2)
        moved = dn.clone()
        moved[:, 3:] = torch.rand(2, 3, 4) * 0.5 + 0.25  # change group 1 only
        other = head.decode_generic(multi_scale, mask_features, bank, aux_masks=True, denoising_boxes=moved,
                                    denoising_groups=2)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.allclose(plain[key], with_dn[key], atol=1e-5), key
    assert "denoising" not in plain
    out = with_dn["denoising"]
    assert out["pred_masks"].shape == (2, 6, *mask_features.shape[-2:])
    assert out["pred_boxes"].shape == (2, 6, 4) and out["pred_logits"].shape == (2, 6, 5)
    assert len(out["aux_outputs"]) == demo().decoder.dec_layers - 1
    # group 0 did not see group 1 ...
    assert torch.allclose(out["pred_masks"][:, :3], other["denoising"]["pred_masks"][:, :3], atol=1e-5)
    # ... and group 1 did change
    assert not torch.allclose(out["pred_masks"][:, 3:], other["denoising"]["pred_masks"][:, 3:], atol=1e-3)


def test_denoising_losses_fall_when_trained_alone():
    """The denoising loss alone (no matching) drops on a fixed batch: the DN path carries gradients."""
    torch.manual_seed(0)
    config = small_config(lr=2e-3, warmup_steps=1, steps=30, dn_queries=20)
    trainer = Trainer(build_dinov(demo()), demo(), config)
    batch = next(batches(SceneDataset(range(50)), config, np.random.default_rng(1)))
    first = trainer.train_step(batch)
    assert first["denoising"] > 0
    for _ in range(15):
        last = trainer.train_step(batch)
    assert last["denoising"] < 0.7 * first["denoising"], (first["denoising"], last["denoising"])


def test_denoising_boxes_are_noised_ground_truth_in_groups():
    config = small_config(dn_queries=12, dn_noise_scale=0.4)
    trainer = Trainer(build_dinov(demo()), demo(), config)
    truth = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.3]])
    targets = [{"boxes": truth}, {"boxes": truth[:1]}]
    boxes, groups = trainer.objective.denoising_boxes(targets)
    assert groups == 6 and boxes.shape == (2, 12, 4)
    grouped = boxes[0].view(6, 2, 4)
    # every noised copy stays within the noise bounds of its instance (centre +-0.4 * half size, size +-0.4 * size)
    bound = torch.cat([truth[:, 2:] / 2, truth[:, 2:]], 1) * 0.4 + 1e-6
    assert ((grouped - truth).abs() <= bound).all()
    assert not torch.allclose(grouped[0], grouped[1])  # each group draws its own noise
    # the second image has one instance: the other slot of each group is padding
    assert torch.allclose(boxes[1].view(6, 2, 4)[:, 1], torch.full((6, 4), 0.5))


def test_class_banks_take_examples_from_other_images():
    config = small_config(max_examples=16, cross_image_examples=True)
    trainer = Trainer(build_dinov(demo()), demo(), config)
    d = demo().decoder.hidden_dim
    a, b, c = torch.zeros(d), torch.ones(d), torch.full((d,), 2.0)
    # class 0 on image 0 (a) and image 1 (b); class 1 only on image 1 (c)
    prompts = [(0, 0, a), (1, 0, b), (1, 1, c)]
    banks = trainer.objective.class_banks(prompts, num_images=2, num_classes=2)
    assert banks.shape == (2, 2, d)
    assert torch.equal(banks[0, 0], b) and torch.equal(banks[1, 0], a)  # the other image's example
    assert torch.equal(banks[1, 1], c)  # no other image has class 1: its own example


def test_batches_with_shared_classes_draw_from_one_subset():
    config = small_config(batch_size=4, batch_classes=5)
    batch = next(batches(SceneDataset(range(100)), config, np.random.default_rng(3)))
    classes = {int(c) for s in batch for c in s.classes}
    assert len(classes) <= 5


# ---------------------------------------------------------------------------------------------- the cheap step


def test_crops_cut_image_and_masks_at_the_same_place():
    """A fixed-size crop: the image and every mask are cut by the same window, so each instance's pixels keep
    their colour; every sample of a batch has the crop's size (no padding)."""
    from dinov.train.sampling import random_crop

    image = np.zeros((40, 50, 3), np.uint8)
    masks = np.zeros((2, 40, 50), bool)
    masks[0, 5:25, 10:30] = True
    masks[1, 20:40, 30:50] = True
    image[masks[0]] = (255, 0, 0)
    image[masks[1]] = (0, 0, 255)
    for seed in range(5):
        cropped, cut = random_crop(image, masks, 32, np.random.default_rng(seed))
        assert cropped.shape == (32, 32, 3) and cut.shape == (2, 32, 32)
        assert (cropped[cut[0]] == (255, 0, 0)).all() and (cropped[cut[1]] == (0, 0, 255)).all()
        assert (cropped[~(cut[0] | cut[1])] == 0).all()
    config = small_config(batch_size=3, crop_size=96)
    batch = next(batches(SceneDataset(range(10)), config, np.random.default_rng(0)))
    for sample in batch:
        assert tuple(sample.image.shape[1:]) == (96, 96) and sample.masks.shape[1:] == (96, 96)
        assert (sample.masks.flatten(1).sum(1) >= 16).all()


def test_a_cheap_step_trains_with_crops_few_points_and_small_query_sets():
    from dinov.train.config import CHEAP_RECIPE

    torch.manual_seed(0)
    config = small_config(steps=2, batch_size=2, **CHEAP_RECIPE)
    assert config.crop_size == 128 and config.mask_points == 256 and config.dn_queries == 20
    trainer = Trainer(build_dinov(demo()), demo(), config)
    assert trainer.criterion.num_points == 256 and trainer.criterion.matcher.num_points == 256
    batch = next(batches(SceneDataset(range(10)), config, np.random.default_rng(0)))
    losses = trainer.train_step(batch)
    assert np.isfinite(losses["total"]) and {"generic", "denoising", "interactive_mask"} <= set(losses)


# ---------------------------------------------------------------------------------------------- shape extension


def test_shape_extension_keeps_every_other_weight_and_trains():
    from dinov.train.trainer import with_shape_encoder

    torch.manual_seed(0)
    base = build_dinov(demo())
    model, config = with_shape_encoder(base, demo(), 16)
    assert config.decoder.shape_dim == 16 and model.head.shape_encoder is not None
    assert model.embedding_dim == base.embedding_dim + 16
    extended = model.state_dict()
    for key, value in base.state_dict().items():
        assert torch.equal(value, extended[key]), key
    assert {k for k in extended if k not in base.state_dict()} == {
        k for k in extended if ".shape_encoder." in k}
    trainer = Trainer(model, config, small_config(steps=1, batch_size=2, crop_size=96))
    before = {k: v.clone() for k, v in model.head.shape_encoder.state_dict().items()}
    trainer.train_step(next(batches(SceneDataset(range(10)), trainer.config, np.random.default_rng(1))))
    after = model.head.shape_encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the class loss reaches the shape encoder
