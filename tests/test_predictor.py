"""The inference API on the official miniT weights (random, but the official architecture)."""

import numpy as np
import pytest
import torch

from dinov.checkpoint import load_model
from dinov.predictor import DINOvPredictor, mask_box
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
    instances = predictor.segment_generic(tgt, [emb], max_instances=1000)
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


def test_negative_click_excludes_candidates(predictor, io):
    tgt = predictor.encode_image(rgb(io["tgt_image"]))
    x, y = io["click_points"][0].tolist()
    plain = predictor.segment_interactive(tgt, points=[[x, y]], point_labels=[1])
    if plain.best is None:
        pytest.skip("random weights gave no candidate")
    ys, xs = np.nonzero(plain.best.mask)
    far = max(zip(xs, ys), key=lambda p: (p[0] - x) ** 2 + (p[1] - y) ** 2)
    result = predictor.segment_interactive(tgt, points=[[x, y], list(far)], point_labels=[1, 0])
    if result.best is not None:
        assert not result.best.mask[far[1], far[0]]


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
