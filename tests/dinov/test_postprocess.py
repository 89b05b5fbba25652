"""The official post-processing filters: against the reference outputs and on hand-made cases."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov.mask_upsampling import MaskResizer, upsample_masks
from dinov.modeling.box_ops import point_boxes
from dinov.modeling.dinov_head import DINOvHead
from dinov.modeling.prompt_encoder import PromptContent
from dinov.postprocess import filter_generic, filter_referring, official_threshold, select_generic

PREFIX = "model.sem_seg_head.predictor."
TOL = 1e-4


def padded_size_of(mask_features):
    return tuple(int(s) * 4 for s in mask_features.shape[-2:])


@pytest.fixture(scope="module", params=["miniT", "miniL"])
def io(request, reference_dir):
    return torch.load(reference_dir / f"{request.param}_io.pt", map_location="cpu", weights_only=True), request.param


# ----------------------------------------------------------------------------- against the reference


def test_filter_generic_reference(io):
    io, _ = io
    selection = filter_generic(io["openset_raw_pred_logits"][0], io["openset_raw_pred_masks"][0])
    image_size = tuple(io["tgt_image"].shape[-2:])
    masks = upsample_masks(selection.mask_logits, padded_size_of(io["tgt_mask_features"]), image_size)
    assert masks.shape == io["openset_mask_logits"].shape
    diff = (masks - io["openset_mask_logits"]).abs().max().item()
    print(f"openset_mask_logits: max abs diff {diff:.3g}")
    assert diff <= TOL
    assert torch.allclose(selection.scores, io["openset_scores"], atol=TOL, rtol=0)


def test_filter_referring_reference(io, reference_dir):
    io, name = io
    config = json.loads((reference_dir / f"{name}_config.json").read_text())["overrides"]
    dec = config["DECODER"]
    head = DINOvHead(hidden_dim=dec["HIDDEN_DIM"], num_queries=dec["NUM_OBJECT_QUERIES"], nheads=dec["NHEADS"],
                     dim_feedforward=dec["DIM_FEEDFORWARD"], dec_layers=dec["DEC_LAYERS"],
                     mask_dim=config["ENCODER"]["MASK_DIM"], dim_proj=config["DIM_PROJ"],
                     total_num_feature_levels=dec["TOTAL_NUM_FEATURE_LEVELS"]).eval()
    sd = torch.load(reference_dir / f"{name}_ckpt.pth", map_location="cpu", weights_only=True)["model"]
    head.load_state_dict({k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)})
    features = [io[f"tgt_multi_scale_{i}"] for i in range(head.num_feature_levels)]
    prompt = PromptContent(io["content_label_3"], io["content_bbox_3"], io["content_attn_3"])
    with torch.no_grad():
        out = head.decode_referring(features, io["tgt_mask_features"], prompt, io["refer_grid_boxes_dn"])
    selection = filter_referring(out["pred_boxes"][0], out["pred_ious"][0], out["pred_match_score"][0],
                                 pred_masks=out["pred_masks"][0])
    assert torch.equal(selection.index, io["refer_selected_index"])
    assert torch.allclose(selection.scores, io["refer_scores"], atol=TOL, rtol=0)
    masks = upsample_masks(selection.mask_logits, padded_size_of(io["tgt_mask_features"]),
                           tuple(io["tgt_image"].shape[-2:]))
    diff = (masks - io["refer_mask_logits"]).abs().max().item()
    print(f"refer_mask_logits: max abs diff {diff:.3g}")
    assert masks.shape == io["refer_mask_logits"].shape and diff <= TOL

    # computing only the needed masks from mask_embed selects the same
    lazy = filter_referring(out["pred_boxes"][0], out["pred_ious"][0], out["pred_match_score"][0],
                            mask_embed=out["mask_embed"][0], mask_features=io["tgt_mask_features"][0])
    assert torch.equal(lazy.index, selection.index) and torch.equal(lazy.kept_index, selection.kept_index)
    assert torch.allclose(lazy.mask_logits, selection.mask_logits, atol=1e-5)


# ----------------------------------------------------------------------------- hand-made cases


def square_mask(size: int, x0: int, y0: int, side: int, inside: float = 5.0) -> torch.Tensor:
    m = torch.full((size, size), -5.0)
    m[y0:y0 + side, x0:x0 + side] = inside
    return m


def test_filter_referring_hand_made():
    # 3 points x 2 granularities = 6 proposals (index p*2+k), 2 prompts, masks on a 20x20 stride-4 grid
    ious = torch.tensor([[0.9, 0.4],    # 0 kept, 1 dropped (IoU <= 0.5)
                         [0.8, 0.7],    # 2: box identical to 0 -> removed by NMS; 3 kept
                         [0.6, 0.95]])  # 4: mask too small (<= 50 px); 5 kept
    boxes = torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2],
                          [0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2],
                          [0.5, 0.25, 0.2, 0.2], [0.25, 0.75, 0.2, 0.2]])
    masks = torch.stack([square_mask(20, 0, 0, 8), square_mask(20, 5, 5, 8), square_mask(20, 0, 0, 8),
                         square_mask(20, 10, 10, 8), square_mask(20, 2, 2, 7), square_mask(20, 3, 12, 8)])
    match = torch.tensor([[0.0, 9.0, 9.0, 1.0, 9.0, 2.0],   # best survivor: 5
                          [3.0, 9.0, 9.0, 1.0, 9.0, 0.0]])  # best survivor: 0
    selection = filter_referring(boxes, ious, match, pred_masks=masks)
    assert selection.kept_index.tolist() == [5, 0, 3]  # NMS order: by predicted IoU
    assert selection.index.tolist() == [5, 0]
    survivors = torch.tensor([[0.0, 1.0, 2.0], [3.0, 1.0, 0.0]]).softmax(-1)
    assert torch.allclose(selection.scores, survivors.max(-1).values)
    assert torch.equal(selection.mask_logits, masks[[5, 0]])

    # restricting to granularity 0 leaves proposals 0 and 2 (same box: NMS keeps 0) and 4 (too small)
    only_first = filter_referring(boxes, ious, match, pred_masks=masks, levels=[0])
    assert only_first.kept_index.tolist() == [0] and only_first.index.tolist() == [0, 0]

    # the shape extension's term is added to the survivors' match scores: here it favours the mask at the
    # top-left (proposal 0) for the first prompt, enough to overturn its content match (2.0 for proposal 5)
    seen = []

    def shape_logits(survivor_masks: torch.Tensor) -> torch.Tensor:
        seen.append(survivor_masks)
        top_left = (survivor_masks[:, :4, :4] > 0).flatten(1).float().mean(1)  # [M]: 1 for the mask at (0, 0)
        return torch.stack([5.0 * top_left, torch.zeros_like(top_left)])

    shaped = filter_referring(boxes, ious, match, pred_masks=masks, shape_logits=shape_logits)
    assert torch.equal(seen[0], masks[[5, 0, 3]])  # called once, on the survivors in NMS order
    assert shaped.index.tolist() == [0, 0]
    with_shape = torch.tensor([[0.0 + 5.0, 1.0, 2.0], [3.0, 1.0, 0.0]]).softmax(-1)  # columns: 0, 3, 5
    assert torch.allclose(shaped.scores, with_shape.max(-1).values)

    # nothing survives -> empty selection rather than an error
    none = filter_referring(boxes, ious * 0.1, match, pred_masks=masks)
    assert none.index.numel() == 0 and none.scores.numel() == 0 and none.mask_logits.shape[0] == 0


def test_filter_referring_rejects_bad_shapes():
    with pytest.raises(ValueError, match="pred_ious"):
        filter_referring(torch.zeros(6, 4), torch.zeros(6), torch.zeros(1, 6), pred_masks=torch.zeros(6, 4, 4))
    with pytest.raises(ValueError, match="mask_embed"):
        filter_referring(torch.zeros(6, 4), torch.zeros(3, 2), torch.zeros(1, 6))


def test_filter_generic_lowers_threshold():
    # best probabilities 0.05, 0.09, 0.02: 0.12 keeps none, 0.08 keeps the second
    probs = torch.tensor([[0.05, 0.01], [0.02, 0.09], [0.02, 0.01]])
    logits = torch.logit(probs)
    masks = torch.randn(3, 4, 4)
    selection = filter_generic(logits, masks)
    assert selection.index.tolist() == [1]
    assert selection.labels.tolist() == [1]
    assert selection.threshold == pytest.approx(0.08)
    assert torch.allclose(selection.scores, torch.tensor([0.09]))
    assert torch.equal(selection.mask_logits, masks[[1]])

    high = filter_generic(torch.logit(torch.tensor([[0.5], [0.13], [0.11]])), masks)
    assert high.index.tolist() == [0, 1] and high.threshold == 0.12

    # masks of the kept queries only, from mask embeddings
    embed, features = torch.randn(3, 5), torch.randn(5, 4, 4)
    lazy = filter_generic(logits, mask_embed=embed, mask_features=features)
    assert torch.allclose(lazy.mask_logits, torch.einsum("qc,chw->qhw", embed, features)[[1]], atol=1e-6)
    with pytest.raises(ValueError, match="mask_embed"):
        filter_generic(logits)


def test_upsample_masks_crops_top_left():
    logits = torch.zeros(1, 8, 10)
    logits[0, :2, :3] = 4.0  # top-left block of the stride-4 grid
    up = upsample_masks(logits, padded_size=(32, 40), image_size=(30, 25))
    assert up.shape == (1, 30, 25)
    expected = F.interpolate(logits[None], size=(32, 40), mode="bilinear", align_corners=False)[0, :, :30, :25]
    assert torch.equal(up, expected)
    assert up[0, :6, :10].gt(0).all() and not up[0, 12:, :].gt(0).any()
    assert upsample_masks(torch.zeros(0, 8, 10), (32, 40), (30, 25)).shape == (0, 30, 25)
    with pytest.raises(ValueError, match="larger"):
        upsample_masks(logits, padded_size=(32, 40), image_size=(33, 25))


def test_point_boxes_match_reference_clicks(io):
    io, _ = io
    boxes = point_boxes(io["click_points"], padded_size_of(io["tgt_mask_features"]))
    assert torch.equal(boxes, io["click_boxes_dn"])


# ----------------------------------------------------------------------------- the predictor's generic path


def _official_masks(logits, padded, input_size, image_size):
    """The official post-processing of one mask: bilinear to the padded size, crop, bilinear to the image."""
    up = upsample_masks(logits[None], padded, input_size)[None]
    if tuple(input_size) != tuple(image_size):
        up = F.interpolate(up, size=tuple(image_size), mode="bilinear", align_corners=False)
    return (up[0, 0] > 0).numpy()


@pytest.mark.parametrize("full_fraction", [2.0, MaskResizer.FULL_FRACTION])
def test_mask_resizer_equals_the_official_upsampling(full_fraction):
    """Windowed upsampling (forced for every mask with full_fraction=2) gives the official masks and boxes."""
    gen = torch.Generator().manual_seed(3)
    resized_cases = 0
    for trial in range(120):
        h, w = (int(v) for v in torch.randint(3, 30, (2,), generator=gen))
        padded = (4 * h, 4 * w)
        input_size = (4 * h - int(torch.randint(0, min(31, 4 * h - 1), (1,), generator=gen)),
                      4 * w - int(torch.randint(0, min(31, 4 * w - 1), (1,), generator=gen)))
        if trial % 2:  # the original image is larger or smaller than the model input
            f = 0.3 + 2.5 * torch.rand(2, generator=gen)
            image_size = (max(1, int(input_size[0] * f[0])), max(1, int(input_size[1] * f[1])))
            resized_cases += image_size != input_size
        else:
            image_size = input_size
        yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
        centre = torch.rand(2, generator=gen) * torch.tensor([h, w])
        radius = float(torch.rand(1, generator=gen)) * max(h, w) / 2
        logits = radius - ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2).sqrt() + 0.5 * torch.randn(h, w, generator=gen)
        if trial % 5 == 0:
            logits = torch.randn(h, w, generator=gen)  # scattered, as with random weights
        resizer = MaskResizer(padded, input_size, image_size)
        resizer.FULL_FRACTION = resizer.FULL_FRACTION_RESIZED = full_fraction
        got = resizer(logits)
        want = _official_masks(logits, padded, input_size, image_size)
        if not want.any():
            assert got is None
            continue
        assert got is not None and got.mask.shape == want.shape
        assert np.array_equal(got.mask, want), f"trial {trial}: {(got.mask != want).sum()} pixels differ"
        ys, xs = np.flatnonzero(want.any(1)), np.flatnonzero(want.any(0))
        assert got.box == (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    assert resized_cases > 30


def test_mask_resizer_skips_masks_positive_only_in_the_padding():
    logits = -torch.ones(10, 12)
    logits[:, 11] = 5.0  # the last column of cells only reaches the padding of a 40x36 image in 40x48
    assert MaskResizer((40, 48), (40, 36), (40, 36))(logits) is None
    assert MaskResizer((40, 48), (40, 36), (80, 72))(logits) is None
    logits[0, 0] = 1.0
    found = MaskResizer((40, 48), (40, 36), (40, 36))(logits)
    assert found is not None and found.box[0] == 0 and found.box[1] == 0


def test_select_generic_keeps_the_official_threshold_and_order():
    logits = torch.logit(torch.tensor([[0.05, 0.3], [0.5, 0.1], [0.09, 0.02], [0.2, 0.95]]))
    pick = select_generic(logits, None, max_instances=10)
    assert pick.index.tolist() == [3, 1, 0] and pick.labels.tolist() == [1, 0, 1]
    assert select_generic(logits, None, max_instances=2).index.tolist() == [3, 1]
    assert select_generic(logits, 0.5, max_instances=10).index.tolist() == [3, 1]  # fixed: >= the threshold
    low = torch.logit(torch.tensor([[0.05], [0.07]]))  # nothing above 0.12: lowered to 0.04
    assert select_generic(low, None, max_instances=10).index.tolist() == [1, 0]
    assert official_threshold(low.sigmoid()[:, 0]) == pytest.approx(0.04)


def test_the_gpu_path_of_the_mask_resizer_equals_the_windowed_one():
    """resize_all on a GPU upsamples whole maps in chunks (resize_together); here on the CPU against the windows."""
    gen = torch.Generator().manual_seed(5)
    for padded, input_size, image_size in [((64, 96), (64, 90), (64, 90)), ((64, 96), (64, 90), (130, 170)),
                                           ((64, 96), (60, 90), (40, 55))]:
        logits = torch.randn(7, padded[0] // 4, padded[1] // 4, generator=gen) - 1.0
        logits[0] = -5.0  # an empty mask stays None on both paths
        resizer = MaskResizer(padded, input_size, image_size)
        resizer.DEVICE_CHUNK_PIXELS = 3 * (image_size[0] * image_size[1] + padded[0] * padded[1])  # chunks of 3
        together, windowed = resizer.resize_together(logits), resizer.resize_all(logits)
        assert len(together) == len(windowed) == 7 and together[0] is None and windowed[0] is None
        for a, b in zip(together[1:], windowed[1:]):
            assert (a is None) == (b is None)
            if a is not None:
                assert np.array_equal(a.mask, b.mask) and a.box == b.box


def test_mask_nms_keeps_one_region_per_object():
    from dinov.postprocess import mask_nms, mask_quality

    logits = -torch.ones(4, 10, 10)
    logits[0, :5, :5] = 2.0  # the best
    logits[1, :5, :4] = 1.0  # IoU 0.8 with the best: a duplicate
    logits[2, 5:, 5:] = 1.0  # another object
    logits[3, :5, 2:8] = 1.0  # IoU 15/40 with the best: kept at 0.5, dropped at 0.3
    assert mask_nms(logits, 0.5).tolist() == [0, 2, 3]
    assert mask_nms(logits, 0.3).tolist() == [0, 2]
    assert mask_nms(logits, 1.0).tolist() == [0, 1, 2, 3]
    quality = mask_quality(logits)
    assert torch.allclose(quality, torch.sigmoid(torch.tensor([2.0, 1.0, 1.0, 1.0])))
    with pytest.raises(ValueError):
        mask_nms(logits, 1.5)


def test_generic_regions_of_the_predictor_are_not_duplicated():
    """Every caller's generic regions (backend, bulk, evaluation) come from segment_generic: with its default no
    two regions overlap by more than the NMS IoU; nms_iou=None returns the official, unsuppressed regions."""
    from dinov.data.scenes import generate_scene
    from dinov.metrics import mask_iou
    from dinov.postprocess import DEFAULT_NMS_IOU
    from dinov.predictor import DINOvPredictor

    predictor = DINOvPredictor.from_checkpoint("demo", device="cpu")
    scene = generate_scene(5)
    encoded = predictor.encode_image(scene.image)
    examples = predictor.encode_prompts(encoded, scene.masks)
    bank = [examples[i:i + 1] for i in range(len(examples))]
    everything = predictor.segment_generic(encoded, bank, score_threshold=0.0, nms_iou=None)
    kept = predictor.segment_generic(encoded, bank, score_threshold=0.0)
    assert 0 < len(kept) < len(everything)
    ious = mask_iou(np.stack([x.mask for x in kept]), np.stack([x.mask for x in kept]))
    np.fill_diagonal(ious, 0.0)
    assert ious.max() <= DEFAULT_NMS_IOU + 0.05  # (stride-4 masks decide; upsampled ones differ by a few pixels)
    assert [x.score for x in kept] == sorted([x.score for x in kept], reverse=True)
    assert all(0.5 <= x.mask_quality <= 1.0 for x in kept)


def test_region_scores_quality_times_margin():
    from dinov.postprocess import region_scores

    logits = torch.logit(torch.tensor([[0.9, 0.2, 0.1], [0.6, 0.55, 0.1]]))
    masks = -torch.ones(2, 4, 4)
    masks[0, :2, :2] = 3.0
    masks[1, 2:, 2:] = 1.0
    official, labels = region_scores(logits, None, "class_probability")
    assert torch.allclose(official, torch.tensor([0.9, 0.6])) and labels.tolist() == [0, 0]
    scores, labels = region_scores(logits, masks, "quality_x_margin")
    expected = torch.sigmoid(torch.tensor([3.0, 1.0])) * torch.tensor([0.7, 0.05])
    assert torch.allclose(scores, expected, atol=1e-6) and labels.tolist() == [0, 0]
    with pytest.raises(ValueError):
        region_scores(logits, None, "quality_x_margin")
    with pytest.raises(ValueError):
        region_scores(logits, masks, "entropy")


def test_a_checkpoint_score_form_is_what_generic_regions_score_and_threshold():
    from dinov.config import demo
    from dinov.data.scenes import generate_scene
    from dinov.modeling.dinov import build_dinov
    from dinov.predictor import DINOvPredictor

    assert DINOvPredictor(build_dinov(demo())).score_form == "class_probability"  # no metadata: the official
    predictor = DINOvPredictor.from_checkpoint("demo", device="cpu")
    scene = next(s for s in map(generate_scene, range(5, 50)) if len(s.masks) >= 3)
    encoded = predictor.encode_image(scene.image)
    examples = predictor.encode_prompts(encoded, scene.masks)
    bank = [examples[i:i + 1] for i in range(len(examples))]
    predictor.model.score_form = "quality_x_margin"
    found = predictor.segment_generic(encoded, bank, score_threshold=0.0, nms_iou=None)
    probs, _ = predictor.generic_queries(encoded, bank)
    top = np.sort(probs, axis=1)[:, ::-1]
    margins = sorted((top[:, 0] - top[:, 1]).tolist(), reverse=True)
    for region in found:  # a region's score is its quality times its query's margin
        assert any(abs(region.score - region.mask_quality * m) < 1e-4 for m in margins)
    cut = sorted(x.score for x in found)[len(found) // 2]
    assert all(x.score >= cut for x in predictor.segment_generic(encoded, bank, score_threshold=cut, nms_iou=None))


def test_the_prediction_score_is_the_share_of_candidate_score_mass_kept():
    from dinov.postprocess import prediction_score

    assert prediction_score([0.5, 0.3], 1.6) == pytest.approx(0.5)
    assert prediction_score([], 1.0) == 0.0
    assert prediction_score([0.5, 0.3], None) == pytest.approx(0.4)  # the official score form: the mean
    assert prediction_score([], None) == 0.0
    assert prediction_score([0.9], 0.5) == 1.0
