"""Calibrated score thresholds, readable model names, and the evaluation's precision columns."""

import numpy as np
import pytest

from dinov.build import OFFICIAL_SCORE_THRESHOLD, SCORE_THRESHOLD_METADATA_KEY, load_model, model_name, save_model
from dinov.checkpoint import read_safetensors_metadata, write_metadata
from dinov.config import demo
from dinov.eval.calibrate import best_f1_threshold
from dinov.metrics import covers_another, wrong_regions
from dinov.modeling.dinov import build_dinov
from dinov.predictor import DINOvPredictor


def test_best_f1_threshold_drops_the_low_scoring_wrong_regions():
    scores = np.array([0.9, 0.8, 0.3, 0.2, 0.1])
    matched = np.array([True, True, False, True, False])
    threshold, f1 = best_f1_threshold(scores, matched, num_truths=3, thresholds=np.array([0.05, 0.15, 0.25, 0.5]))
    # at 0.15: 4 kept, 3 right -> 6/7; at 0.25: 3 kept, 2 right -> 4/6; at 0.05: 5 kept -> 6/8
    assert threshold == 0.15 and f1 == pytest.approx(6 / 7)


def test_threshold_and_name_travel_with_the_checkpoint(tmp_path):
    path = tmp_path / "mine.safetensors"
    model = build_dinov(demo())
    save_model(model, demo(), path)
    loaded, _, digest = load_model(path)
    assert loaded.default_score_threshold == OFFICIAL_SCORE_THRESHOLD  # no metadata: the official 0.12
    write_metadata(path, {SCORE_THRESHOLD_METADATA_KEY: "0.37"})
    assert "dinov_config" in read_safetensors_metadata(path)  # the config is kept
    loaded, _, digest = load_model(path)
    assert loaded.default_score_threshold == pytest.approx(0.37)
    assert loaded.model_name == f"mine-{digest[:8]}"
    predictor = DINOvPredictor(loaded, model_name=loaded.model_name)
    assert predictor.default_score_threshold == pytest.approx(0.37) and predictor.model_name.startswith("mine-")
    for key, value in model.state_dict().items():
        assert np.array_equal(value.numpy(), loaded.state_dict()[key].numpy())


def test_model_names_are_readable():
    assert model_name("demo", "1a2b3c4d5e6f") == "demo-1a2b3c4d"
    assert model_name("swinT", "abcdef012345") == "swinT-abcdef01"
    assert model_name("/models/run 3/final.safetensors", "0123456789ab") == "final-01234567"
    demo_predictor = DINOvPredictor.from_checkpoint("demo", device="cpu")
    assert demo_predictor.model_name.startswith("demo-") and len(demo_predictor.model_name) == len("demo-") + 8


def test_wrong_regions_and_covering_another():
    truth = np.zeros((2, 10, 10), bool)
    truth[0, :5, :5] = True
    truth[1, 5:, 5:] = True
    right = truth[0].copy()
    shifted = np.roll(truth[0], 3, axis=1)  # IoU 2/8 with instance 0
    wrong_class = truth[1].copy()
    preds = np.stack([right, shifted, wrong_class])
    assert wrong_regions(preds, [0, 0, 0], truth, [0, 1]) == 2
    assert wrong_regions(preds, [0, 0, 1], truth, [0, 1]) == 1
    assert wrong_regions(np.zeros((0, 10, 10), bool), [], truth, [0, 1]) == 0
    spill = truth[0] | truth[1]
    assert covers_another(spill, truth[1:], 0.2) and not covers_another(truth[0], truth[1:], 0.2)
    corner = np.zeros((10, 10), bool)
    corner[5:7, 5:7] = True  # 4 of 25 pixels: under a fifth
    assert not covers_another(corner, truth[1:], 0.2)
