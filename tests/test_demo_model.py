"""The committed demo model (the backend's embedded default) on held-out generated scenes.

The figures are a property of the committed file, so they are tested, on a smaller held-out set than
BENCHMARKS.md uses. The floors sit a little below what the committed model scores on this set: they
catch a broken or replaced model, a changed pre/post-processing, or a regression in training. The
issue's targets (generic mIoU >= 0.6 with 4 examples, referring from a box >= 0.7) are not reached by
this model; BENCHMARKS.md reports its full figures.
"""

import pytest

from dinov.checkpoint import DEMO_CHECKPOINT
from dinov.evaluate import evaluate_predictor
from dinov.predictor import DINOvPredictor

FLOORS = {
    "generic_4": 0.15,
    "generic_16": 0.15,
    "refer_point": 0.5,
    "refer_box": 0.5,
    "refer_scribble": 0.5,
    "refer_example": 0.3,
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


def test_demo_model_is_far_better_than_chance(report):
    # Random weights score near 0 on generic propagation and about 0.05 on referring (tests of the
    # pipeline with the official mini weights show it); the trained model must be far above that.
    assert report["refer_box"]["found"] >= 0.4 and report["generic_16"]["found"] >= 0.1, report
