"""Interactive answers stay on the object the user pointed at (issue 11).

The rule (dinov.interactive.restrict_to_prompts, applied by segment_interactive): a click keeps only what is
connected to the positive clicks and drops parts a negative click touches; a box keeps at most 2 % of the mask
outside the box (here: none); a stroke keeps the object(s) it covers. Checked on synthetic masks, and with the
demo model on a generated 320x256 scene at the exact geometries Label Studio 1.23.2's UI sends.
"""

import numpy as np
import pytest

from dinov.data.scenes import class_colour, class_id, generate_scene, shape_mask
from dinov.interactive import Candidate, choose_candidate, restrict_to_prompts
from dinov.metrics import fraction_outside_box, point_in_mask
from dinov.predictor import DINOvPredictor

WIDTH, HEIGHT = 320, 256
# The keypoint of the captured payload: {"x": 84.888, "y": 77.978} percent of the image
CLICK = (84.888 / 100 * WIDTH, 77.978 / 100 * HEIGHT)
# The rectangle of the captured payload: {"x": 38.437, "y": 17.184, "width": 32.457, "height": 40.571} percent
BOX = (38.437 / 100 * WIDTH, 17.184 / 100 * HEIGHT, (38.437 + 32.457) / 100 * WIDTH, (17.184 + 40.571) / 100 * HEIGHT)
NONE = np.zeros((0, 2))


def payload_scene():
    """A red circle under the click with a separate red square beside it; a blue square inside the box with a
    blue circle entirely outside it (the two spills seen in Label Studio's UI)."""
    image = generate_scene(5, size=(HEIGHT, WIDTH), num_objects=0).image.copy()
    shapes = {
        "red circle": shape_mask("circle", CLICK, 52, 0.0, (HEIGHT, WIDTH)),
        "red square": shape_mask("square", (195, 205), 48, 0.0, (HEIGHT, WIDTH)),
        "blue square": shape_mask("square", (175, 96), 64, 0.3, (HEIGHT, WIDTH)),
        "blue circle": shape_mask("circle", (62, 92), 56, 0.0, (HEIGHT, WIDTH)),
    }
    for name, mask in shapes.items():
        colour, kind = name.split()
        image[mask] = class_colour(class_id(kind, colour))
    return image, shapes


def test_payload_geometry_is_as_captured():
    _, shapes = payload_scene()
    assert point_in_mask(shapes["red circle"], *CLICK) and not point_in_mask(shapes["red square"], *CLICK)
    assert fraction_outside_box(shapes["blue square"], BOX) == 0.0
    assert fraction_outside_box(shapes["blue circle"], BOX) == 1.0
    assert not (shapes["red circle"] & shapes["red square"]).any()


def test_point_in_mask_rounds_pixel_coordinates():
    mask = np.zeros((4, 5), bool)
    mask[2, 3] = True
    assert point_in_mask(mask, 3.4, 1.6) and point_in_mask(mask, 2.5001, 2.4)
    assert not point_in_mask(mask, 3.6, 2.0) and not point_in_mask(mask, 3.0, 2.6)
    assert point_in_mask(np.ones((4, 5), bool), 9.0, -3.0)  # beyond the border: the border pixel


def test_a_click_keeps_only_the_clicked_object():
    _, s = payload_scene()
    spilled = s["red circle"] | s["red square"]
    kept = restrict_to_prompts(spilled, np.array([CLICK]), NONE, np.zeros((0, 4)), None)
    assert np.array_equal(kept, s["red circle"])
    # a negative click on a part drops that part
    both = np.array([CLICK, (195, 205)])
    kept = restrict_to_prompts(spilled, both[:1], both[1:], np.zeros((0, 4)), None)
    assert np.array_equal(kept, s["red circle"])
    # two positive clicks: both objects
    kept = restrict_to_prompts(spilled, both, NONE, np.zeros((0, 4)), None)
    assert np.array_equal(kept, spilled)


def test_a_box_keeps_what_is_inside_it():
    _, s = payload_scene()
    spilled = s["blue square"] | s["blue circle"]
    kept = restrict_to_prompts(spilled, NONE, NONE, np.array([BOX]), None)
    assert np.array_equal(kept, s["blue square"])
    assert fraction_outside_box(kept, BOX) <= 0.02


def test_a_stroke_keeps_the_objects_it_covers():
    _, s = payload_scene()
    everything = s["red circle"] | s["red square"] | s["blue square"] | s["blue circle"]
    stroke = np.zeros((HEIGHT, WIDTH), bool)
    stroke[200:203, 180:290] = True  # across the red square and the red circle
    kept = restrict_to_prompts(everything, NONE, NONE, np.zeros((0, 4)), stroke)
    assert np.array_equal(kept, s["red circle"] | s["red square"])


def test_candidate_choice_prefers_the_candidate_that_did_not_spill():
    _, s = payload_scene()
    clicked = np.array([CLICK])
    spilled = Candidate(s["red circle"], 0.9, 0, 0, kept_fraction=0.4)
    clean = Candidate(s["red circle"].copy(), 0.8, 1, 0, kept_fraction=1.0)
    assert choose_candidate([spilled, clean], clicked, NONE, None) is clean


@pytest.fixture(scope="module")
def demo_answers():
    image, shapes = payload_scene()
    predictor = DINOvPredictor.from_checkpoint("demo", device="cpu")
    encoded = predictor.encode_image(image)
    click = predictor.segment_interactive(encoded, points=[CLICK], point_labels=[1]).best
    box = predictor.segment_interactive(encoded, boxes=[BOX]).best
    return shapes, click, box


def test_demo_click_answer_does_not_spill(demo_answers):
    shapes, click, _ = demo_answers
    assert click is not None and point_in_mask(click.mask, *CLICK)
    for other in ("red square", "blue square", "blue circle"):
        assert (click.mask & shapes[other]).sum() < 0.2 * shapes[other].sum(), other
    assert (click.mask & shapes["red circle"]).sum() >= 0.5 * click.mask.sum()  # mostly the circle itself


def test_demo_box_answer_stays_in_the_box(demo_answers):
    shapes, _, box = demo_answers
    assert box is not None
    assert fraction_outside_box(box.mask, BOX) <= 0.02
    assert not (box.mask & shapes["blue circle"]).any()
    assert (box.mask & shapes["blue square"]).sum() >= 0.5 * box.mask.sum()
