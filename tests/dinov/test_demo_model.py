"""The committed demo model (the backend's embedded default) on held-out generated scenes.

The figures are a property of the committed file, so they are tested, on a smaller held-out set than
BENCHMARKS.md uses. The floors sit a little below what the committed model scores on this set: they
catch a broken or replaced model, a changed pre/post-processing, or a regression in training (the
evaluation is deterministic, so each floor sits about 5 % under the committed model's figure on this
set and a 10 % regression fails). Generic figures are at the checkpoint's calibrated default threshold on its
calibrated score form (metadata: quality x margin, 0.02). The issue's targets (generic mIoU >= 0.6 with 4
examples, class right >= 0.8, click and box >= 0.85) are not all reached by this model; BENCHMARKS.md reports its
full figures.
"""

import pytest

from dinov.build import DEMO_CHECKPOINT
from dinov.eval.evaluate import evaluate_predictor
from dinov.predictor import DINOvPredictor

# The committed model (demo-17451e55, issue 19 round 2) on this set (10 scenes, examples from 40): generic 4 ex.
# 0.653, 16 ex. 0.632; click 0.899, box 0.918, scribble 0.892, example from another image 0.490; 0.6 wrong regions
# per image (4 examples, duplicates counted); 4.3 % of click masks cover a fifth of another instance.
FLOORS = {
    "generic_4": 0.62,
    "generic_16": 0.60,
    "refer_point": 0.855,
    "refer_box": 0.87,
    "refer_scribble": 0.85,
    "refer_example": 0.465,
}


@pytest.fixture(scope="module")
def report():
    if not DEMO_CHECKPOINT.exists():
        pytest.fail(f"the demo checkpoint {DEMO_CHECKPOINT} is missing")
    predictor = DINOvPredictor.from_checkpoint("demo", device="cpu")
    return evaluate_predictor(predictor, num_scenes=10, pool_scenes=40, progress=False)


@pytest.mark.parametrize("task", sorted(FLOORS))
def test_demo_model_scores_above_its_floor(report, task):
    assert report[task]["miou"] >= FLOORS[task], report


def test_demo_model_makes_few_wrong_regions_and_click_masks_stay_on_their_object(report):
    assert report["generic_4"]["wrong_per_image"] <= 1.0, report
    assert report["refer_point"]["covering_another"] <= 0.10, report


def test_demo_model_carries_its_calibrated_threshold(report):
    assert report["score_form"] == "quality_x_margin" and 0.0 < report["score_threshold"] <= 0.5, report


def test_demo_model_is_far_better_than_chance(report):
    # Random weights score near 0 on generic propagation and about 0.05 on referring (tests of the
    # pipeline with the official mini weights show it); the trained model must be far above that.
    assert report["refer_box"]["found"] >= 0.4 and report["generic_16"]["found"] >= 0.1, report
