"""The inference API on the official miniT weights (random, but the official architecture)."""

import numpy as np
import pytest
import torch

from dinov.build import load_model
from dinov.interactive import Candidate, choose_candidate, mask_box
from dinov.predictor import DINOvPredictor
from dinov.transforms import InputError, ResizeConfig


@pytest.fixture(scope="module")
def predictor(reference_dir):
    model, _, digest = load_model(reference_dir / "miniT_ckpt.pth")
    # No resizing: the reference tensors were made at the images' own sizes.
    return DINOvPredictor(model, resize=ResizeConfig(shortest_edge=None), checkpoint_id=digest)


@pytest.fixture(scope="module")
def io(reference_dir):
    return torch.load(reference_dir / "miniT_io.pt", map_location="cpu", weights_only=True)


def rgb(tensor):
    return tensor.permute(1, 2, 0).numpy().copy()


def test_prompt_embeddings_equal_the_official_content_queries(predictor, io):
    ref = predictor.encode_image(rgb(io["ref_image"]))
    masks = np.stack([io[k][0].numpy() > 0 for k in ("ref_mask", "ref_mask2", "ref_mask3")])
    emb = predictor.encode_prompts(ref, masks)
    assert emb.shape == (3, predictor.embedding_dim)
    assert np.abs(emb - io["content_label_3"][0].numpy()).max() < 1e-4


def test_generic_masks_equal_the_official_postprocessed_masks(predictor, io):
    ref = predictor.encode_image(rgb(io["ref_image"]))
    tgt = predictor.encode_image(rgb(io["tgt_image"]))
    emb = predictor.encode_prompts(ref, io["ref_mask"][0].numpy() > 0)
    # the official post-processing keeps duplicates: no mask NMS here
    instances = predictor.segment_generic(tgt, [emb], max_instances=1000, nms_iou=None)
    expected = io["openset_mask_logits"] > 0
    expected_scores = io["openset_scores"]
    got = sorted(instances, key=lambda inst: -inst.score)
    nonempty = [i for i in range(len(expected)) if expected[i].any()]
    assert len(got) == len(nonempty)
    order = torch.argsort(expected_scores[nonempty], descending=True)
    for inst, j in zip(got, order.tolist()):
        want = expected[nonempty[j]].numpy()
        assert inst.mask.shape == want.shape
        assert (inst.mask != want).sum() <= 2  # logits within 1e-5 of 0 may flip a pixel
        assert inst.box == mask_box(inst.mask)
        assert abs(inst.score - float(expected_scores[nonempty[j]])) < 1e-4


def test_referring_selects_the_official_proposals(predictor, io):
    ref = predictor.encode_image(rgb(io["ref_image"]))
    tgt = predictor.encode_image(rgb(io["tgt_image"]))
    masks = np.stack([io[k][0].numpy() > 0 for k in ("ref_mask", "ref_mask2", "ref_mask3")])
    results = predictor.segment_referring(tgt, predictor.encode_prompts(ref, masks))
    assert len(results) == 3
    for i, inst in enumerate(results):
        want = (io["refer_mask_logits"][i] > 0).numpy()
        assert inst is not None and (inst.mask != want).sum() <= 2
        assert abs(inst.score - float(io["refer_scores"][i])) < 1e-4


def test_interactive_candidates_are_the_official_click_outputs(predictor, io):
    tgt = predictor.encode_image(rgb(io["tgt_image"]))
    points = io["click_points"][:1].numpy()
    result = predictor.segment_interactive(tgt, points=points, point_labels=[1])
    assert len(result.candidates) == 6
    ious = [c.predicted_iou for c in result.candidates]
    assert np.allclose(ious, io["click_raw_pred_ious"][0, 0].numpy(), atol=1e-4)
    assert result.best is None or any(c is result.best for c in result.candidates)


def test_candidate_choice_follows_clicks_and_strokes():
    def square(x0, y0, x1, y1):
        mask = np.zeros((40, 40), bool)
        mask[y0:y1, x0:x1] = True
        return mask

    small, large, other = square(5, 5, 15, 15), square(5, 5, 30, 30), square(25, 25, 38, 38)
    candidates = [Candidate(small, 0.9, 0, 0), Candidate(large, 0.5, 1, 0), Candidate(other, 0.95, 2, 1)]
    # one click: the highest predicted IoU among candidates containing it
    assert choose_candidate(candidates, np.array([[8, 8]]), np.zeros((0, 2)), None) is candidates[0]
    # two clicks: the candidate covering both, despite a lower IoU
    assert choose_candidate(candidates, np.array([[8, 8], [20, 20]]), np.zeros((0, 2)), None) is candidates[1]
    # a negative click inside the large square rules it out
    assert choose_candidate(candidates, np.array([[8, 8]]), np.array([[20, 20]]), None).granularity == 0
    # a stroke: the candidate overlapping it most
    assert choose_candidate(candidates, np.zeros((0, 2)), np.zeros((0, 2)), square(6, 20, 28, 22)) is candidates[1]
    # nothing left: None
    assert choose_candidate(candidates[:1], np.array([[8, 8]]), np.array([[8, 8]]), None) is None


def test_batched_encoding_equals_single(predictor, io):
    a = rgb(io["tgt_image"])
    b = a[::-1].copy()  # same size, different content: one bucket
    c = rgb(io["ref_image"])  # another size: another bucket
    batch = predictor.encode_images([a, b, c])
    for image, enc in zip([a, b, c], batch):
        single = predictor.encode_image(image)
        assert enc.image_size == single.image_size
        assert torch.allclose(enc.mask_features, single.mask_features, atol=1e-4)
        for x, y in zip(enc.multi_scale_features, single.multi_scale_features):
            assert torch.allclose(x, y, atol=1e-4)


def test_resizing_returns_masks_at_the_original_size(reference_dir, io):
    model, _, _ = load_model(reference_dir / "miniT_ckpt.pth")
    predictor = DINOvPredictor(model, resize=ResizeConfig(shortest_edge=96, max_size=200))
    tgt = predictor.encode_image(rgb(io["tgt_image"]))
    assert tgt.input_size == (96, 134) and tgt.image_size == (150, 210)
    emb = predictor.encode_prompts(tgt, io["tgt_mask"][0].numpy() > 0)
    for inst in predictor.segment_generic(tgt, [emb]):
        assert inst.mask.shape == (150, 210)


def test_bad_inputs_say_what_is_wrong(predictor, io):
    tgt = predictor.encode_image(rgb(io["tgt_image"]))
    with pytest.raises(InputError, match="empty"):
        predictor.encode_prompts(tgt, np.zeros((150, 210), bool))
    with pytest.raises(InputError, match="original size"):
        predictor.encode_prompts(tgt, np.ones((10, 10), bool))
    with pytest.raises(InputError, match="no classes"):
        predictor.segment_generic(tgt, [])
    with pytest.raises(InputError, match="shape"):
        predictor.segment_generic(tgt, [np.zeros((1, 7), np.float32)])
    with pytest.raises(InputError, match="RGB"):
        predictor.encode_image(np.zeros((20, 20, 4), np.uint8))
    with pytest.raises(InputError, match="positive point"):
        predictor.segment_interactive(tgt, points=[[5, 5]], point_labels=[0])
