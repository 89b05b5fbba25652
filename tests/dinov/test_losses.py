import math

import pytest
import torch
import torch.nn.functional as F

from dinov.train.losses import (
    DEFAULT_WEIGHTS,
    Denoising,
    SetCriterion,
    box_losses,
    dice_loss,
    iou_score_loss,
    loss_base_name,
    pairwise_dice_loss,
    pairwise_sigmoid_ce_loss,
    point_sample,
    sigmoid_ce_loss,
    sigmoid_focal_loss,
    uncertain_point_coords,
)
from dinov.train.matcher import HungarianMatcher


@pytest.fixture(autouse=True)
def _seed():
    # the point sampling is random: fix it so that the thresholds below are not a matter of luck
    torch.manual_seed(0)


def test_point_sample_is_bilinear_at_pixel_centres():
    feat = torch.arange(12.0).reshape(1, 1, 3, 4)  # value = 4 * row + col
    # the centre of pixel (row 1, col 2) is at x = 2.5 / 4, y = 1.5 / 3
    pts = torch.tensor([[[2.5 / 4, 1.5 / 3], [2.0 / 4, 0.5 / 3], [2.0 / 4, 2.0 / 3]]])
    out = point_sample(feat, pts)
    # halfway between col 1 and 2 on row 0 -> 1.5; between rows 1-2 and cols 1-2 -> (5 + 6 + 9 + 10) / 4
    torch.testing.assert_close(out, torch.tensor([[[6.0, 1.5, 7.5]]]))


def test_uncertain_points_prefer_logits_near_zero():
    logits = torch.full((2, 1, 32, 32), 10.0)
    logits[:, :, :, :16] = 0.0  # the left half is maximally uncertain
    g = torch.Generator().manual_seed(0)
    pts = uncertain_point_coords(logits, num_points=100, oversample_ratio=3.0, importance_sample_ratio=0.75,
                                 generator=g)
    assert pts.shape == (2, 100, 2) and pts.min() >= 0 and pts.max() <= 1
    # the first 75 come from the uncertain half (well inside it), the last 25 are uniform
    assert (pts[:, :75, 0] < 0.5).all()
    assert 0 < (pts[:, 75:, 0] < 0.5).float().mean() < 1
    only_random = uncertain_point_coords(logits, 50, 3.0, 0.0, generator=g)
    assert only_random.shape == (2, 50, 2)
    with pytest.raises(ValueError):
        uncertain_point_coords(logits, 10, 0.5, 0.75)


def test_focal_loss_matches_its_formula():
    x = torch.tensor([-2.0, -0.3, 0.0, 1.7, 4.0])
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    got = sigmoid_focal_loss(x, y, alpha=0.25, gamma=2.0)
    for xi, yi, li in zip(x.tolist(), y.tolist(), got.tolist()):
        p = 1 / (1 + math.exp(-xi))
        expected = -0.25 * (1 - p) ** 2 * math.log(p) if yi else -0.75 * p**2 * math.log(1 - p)
        assert li == pytest.approx(expected, rel=1e-5)
    # alpha < 0 switches the class weighting off
    assert sigmoid_focal_loss(torch.tensor([0.0]), torch.tensor([1.0]), alpha=-1)[0].item() == pytest.approx(
        0.25 * math.log(2), rel=1e-6)


def test_mask_losses_known_values():
    labels = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    perfect = labels * 40 - 20
    assert dice_loss(perfect, labels).abs().max() < 1e-6
    assert sigmoid_ce_loss(perfect, labels, 2) < 1e-6
    # logits 0: every point costs log 2, and the dice is 1 - (2 * 0.5 * 2 + 1) / (0.5 * 4 + 2 + 1)
    zeros = torch.zeros(2, 4)
    assert sigmoid_ce_loss(zeros, labels, 2).item() == pytest.approx(math.log(2))
    assert sigmoid_ce_loss(zeros, labels, 4).item() == pytest.approx(math.log(2) / 2)
    torch.testing.assert_close(dice_loss(zeros, labels), torch.full((2,), 1 - 3 / 5))
    # the complementary mask: no overlap, prob sum 2 + label sum 2, only the smoothing term survives
    assert dice_loss(-perfect, labels)[0].item() == pytest.approx(1 - 1 / 5, abs=1e-6)


def test_pairwise_costs_equal_the_per_pair_losses():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    labels = (torch.rand(4, 50, generator=g) > 0.4).float()
    ce = pairwise_sigmoid_ce_loss(logits, labels)
    dice = pairwise_dice_loss(logits, labels)
    for q in range(3):
        for t in range(4):
            x, y = logits[q:q + 1], labels[t:t + 1]
            assert ce[q, t].item() == pytest.approx(sigmoid_ce_loss(x, y, 1).item(), rel=1e-5)
            assert dice[q, t].item() == pytest.approx(dice_loss(x, y).item(), rel=1e-5)


def test_box_losses_known_values():
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.6, 0.5, 0.3, 0.3]])
    l1, giou = box_losses(boxes, boxes.clone(), 2)
    assert l1.item() == 0 and abs(giou.item()) < 1e-6
    # side by side, touching: IoU 0, hull 2 boxes wide = union -> GIoU 0; one gap apart: GIoU -1/3
    a = torch.tensor([[0.125, 0.5, 0.25, 0.25]])
    touching = torch.tensor([[0.375, 0.5, 0.25, 0.25]])
    gap = torch.tensor([[0.625, 0.5, 0.25, 0.25]])
    assert box_losses(a, touching, 1)[1].item() == pytest.approx(1.0, abs=1e-6)
    l1, giou = box_losses(a, gap, 1)
    assert giou.item() == pytest.approx(4 / 3, abs=1e-6) and l1.item() == pytest.approx(0.5)
    assert iou_score_loss(torch.tensor([0.5, 1.0]), torch.tensor([0.25, 1.0])).tolist() == [0.0625, 0.0]


# ---------------------------------------------------------------------------------------------
# the criterion


def _targets():
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 8:30, 4:40] = True
    masks[1, 36:60, 20:62] = True
    boxes = torch.tensor([[22, 19, 36, 22], [41, 48, 42, 24]], dtype=torch.float32) / 64
    one = {"labels": torch.tensor([2, 0]), "masks": masks, "boxes": boxes}
    other = {"labels": torch.tensor([1]), "masks": masks[1:].flip(-1).clone(),
             "boxes": torch.tensor([[1 - 41 / 64, 48 / 64, 42 / 64, 24 / 64]])}
    return [one, other]


def _outputs(seed: int, batch: int = 2, queries: int = 6, classes: int = 3, with_aux: int = 2):
    g = torch.Generator().manual_seed(seed)

    def layer():
        return {
            "pred_logits": (torch.randn(batch, queries, classes, generator=g)).requires_grad_(),
            "pred_masks": (torch.randn(batch, queries, 16, 16, generator=g)).requires_grad_(),
            "pred_boxes": (torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.2).requires_grad_(),
            "pred_ious": torch.rand(batch, queries, generator=g).requires_grad_(),
        }

    out = layer()
    out["aux_outputs"] = [layer() for _ in range(with_aux)]
    return out


def _perfect_outputs(targets, queries=6, classes=3):
    """Query 1 + i predicts target i of each image exactly; the rest predict nothing."""
    out = {
        "pred_logits": torch.full((len(targets), queries, classes), -9.0),
        "pred_masks": torch.full((len(targets), queries, 64, 64), -30.0),
        "pred_boxes": torch.full((len(targets), queries, 4), 0.05),
    }
    for b, t in enumerate(targets):
        for i in range(len(t["labels"])):
            out["pred_logits"][b, 1 + i, t["labels"][i]] = 9.0
            out["pred_masks"][b, 1 + i][t["masks"][i]] = 30.0
            out["pred_boxes"][b, 1 + i] = t["boxes"][i]
    return out


def test_criterion_keys_and_weighted_total():
    crit = SetCriterion(HungarianMatcher(num_points=64), num_points=64, iou_loss=True)
    losses = crit(_outputs(0), _targets())
    bases = ["loss_mask_cls", "loss_mask_bce", "loss_mask_dice", "iou_score_loss", "loss_bbox", "loss_giou"]
    assert set(losses) == {f"{b}_{layer}" for b in bases for layer in (0, 1, 2)}
    total = crit.total_loss(losses)
    expected = sum(DEFAULT_WEIGHTS[loss_base_name(k)] * v for k, v in losses.items())
    torch.testing.assert_close(total, expected)
    assert DEFAULT_WEIGHTS["loss_mask_cls"] == 4 and DEFAULT_WEIGHTS["loss_giou"] == 2
    assert loss_base_name("loss_giou_3_dn") == "loss_giou" and loss_base_name("loss_bbox_interm") == "loss_bbox"
    with pytest.raises(KeyError, match="no weight"):
        SetCriterion(HungarianMatcher(), weights={"loss_mask_cls": 1.0}).total_loss(losses)


def test_perfect_predictions_cost_almost_nothing():
    targets = _targets()
    # uniform points: importance sampling would pick the boundaries, where interpolated logits are ~0
    crit = SetCriterion(HungarianMatcher(num_points=256), num_points=256, importance_sample_ratio=0.0)
    perfect = crit(_perfect_outputs(targets), targets)
    for name in ("loss_mask_dice_0", "loss_bbox_0", "loss_giou_0"):
        assert perfect[name].item() < 0.05, name
    # points within a pixel of a boundary see interpolated, soft labels: the BCE stays a little above 0
    assert perfect["loss_mask_bce_0"].item() < 0.2
    # all other class outputs are confidently off, so the focal loss is tiny too
    assert perfect["loss_mask_cls_0"].item() < 1e-3
    random = crit(_outputs(1), targets)
    for name in ("loss_mask_bce_0", "loss_mask_dice_0", "loss_giou_0", "loss_mask_cls_0"):
        assert random[name] > 3 * perfect[name] + 0.1, name


def test_class_loss_is_the_focal_loss_over_all_queries_per_target():
    targets = _targets()
    outputs = _outputs(2, with_aux=0)
    crit = SetCriterion(HungarianMatcher(num_points=64), losses=("labels",))
    indices = crit.matcher(outputs, targets)
    losses = crit(outputs, targets, indices=indices)
    onehot = torch.zeros(2, 6, 3)
    for b, (rows, cols) in enumerate(indices):
        for q, t in zip(rows.tolist(), cols.tolist()):
            onehot[b, q, targets[b]["labels"][t]] = 1
    expected = sigmoid_focal_loss(outputs["pred_logits"], onehot).sum() / 3  # 3 targets in the batch
    torch.testing.assert_close(losses["loss_mask_cls_0"], expected)


def test_mask_bce_with_zero_logits_is_log2_whatever_the_points():
    targets = _targets()
    outputs = _outputs(3, with_aux=0)
    outputs["pred_masks"] = torch.zeros_like(outputs["pred_masks"])
    crit = SetCriterion(HungarianMatcher(num_points=64), losses=("masks",), num_points=100)
    assert crit(outputs, targets)["loss_mask_bce_0"].item() == pytest.approx(math.log(2), rel=1e-5)


def test_gradients_reach_every_output_of_every_layer():
    crit = SetCriterion(HungarianMatcher(num_points=64), num_points=64, iou_loss=True)
    outputs = _outputs(4)
    crit.total_loss(crit(outputs, _targets())).backward()
    for layer in [outputs] + outputs["aux_outputs"]:
        for key in ("pred_logits", "pred_masks", "pred_boxes", "pred_ious"):
            grad = layer[key].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, key


def test_aux_layers_rematch_or_reuse_the_final_matching():
    calls = []

    class CountingMatcher(HungarianMatcher):
        def forward(self, outputs, targets, costs=("cls", "box", "mask"), generator=None):
            calls.append(costs)
            return super().forward(outputs, targets, costs, generator)

    outputs = _outputs(5, with_aux=3)
    SetCriterion(CountingMatcher(num_points=16), num_points=16)(outputs, _targets())
    assert len(calls) == 4
    calls.clear()
    crit = SetCriterion(CountingMatcher(num_points=16), num_points=16, rematch_aux=False, match_costs=("box", "mask"))
    losses = crit(outputs, _targets())
    assert calls == [("box", "mask")] and "loss_giou_3" in losses


def test_empty_targets_give_zero_box_and_mask_losses_with_gradients():
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 64, 64, dtype=torch.bool),
             "boxes": torch.zeros(0, 4)}
    outputs = _outputs(6, batch=1, with_aux=1)
    crit = SetCriterion(HungarianMatcher(num_points=16), num_points=16, iou_loss=True)
    losses = crit(outputs, [empty])
    assert losses["loss_mask_bce_0"].item() == 0 and losses["loss_bbox_1"].item() == 0
    # with no targets every query is pushed to "no class": the focal loss over all of them, divided by 1
    expected = sigmoid_focal_loss(outputs["pred_logits"], torch.zeros(1, 6, 3)).sum()
    torch.testing.assert_close(losses["loss_mask_cls_0"], expected)
    crit.total_loss(losses).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_denoising_queries_are_supervised_with_their_own_targets():
    targets = _targets()
    perfect = _perfect_outputs(targets)
    # two denoising groups of 3 queries: query g * 3 + i denoises target i
    dn_outputs = {k: v.clone() for k, v in _perfect_outputs(targets, queries=6).items()}
    for key in dn_outputs:
        dn_outputs[key] = torch.cat([dn_outputs[key][:, 1:4], dn_outputs[key][:, 1:4]], dim=1)
    dn_outputs["aux_outputs"] = [dict(dn_outputs), dict(dn_outputs)]
    crit = SetCriterion(HungarianMatcher(num_points=64), num_points=256, importance_sample_ratio=0.0)
    losses = crit(dict(perfect, aux_outputs=[perfect, perfect]), targets,
                  denoising=Denoising(dn_outputs, num_groups=2, group_size=3))
    # the first auxiliary layer has no denoising loss (official behaviour without encoder proposals)
    assert {k for k in losses if k.endswith("_dn")} == {f"{b}_{layer}_dn" for b in (
        "loss_mask_bce", "loss_mask_dice", "loss_bbox", "loss_giou") for layer in (0, 2)}
    assert all(losses[k].item() < (0.2 if "bce" in k else 0.05) for k in losses if k.endswith("_dn"))
    # shifting the denoising queries by one breaks the known pairing: the losses jump
    shifted = {k: v.roll(1, dims=1) for k, v in dn_outputs.items() if k != "aux_outputs"}
    bad = crit(perfect, targets, denoising=Denoising(shifted, num_groups=2, group_size=3))
    assert bad["loss_giou_0_dn"] > 0.5 and bad["loss_mask_dice_0_dn"] > 0.5
    with pytest.raises(ValueError, match="denoising groups"):
        crit(perfect, targets, denoising=Denoising(shifted, num_groups=3, group_size=1))


def test_match_score_loss_is_cross_entropy_over_the_kept_predictions():
    # four interactive predictions with disjoint masks and boxes (NMS keeps them all); the two
    # content queries show the instances of predictions 2 and 0
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    boxes = torch.zeros(4, 4)
    for i in range(4):
        masks[i, 8 * i:8 * i + 8, :] = True
        boxes[i] = torch.tensor([0.5, (8 * i + 4) / 32, 1.0, 0.25])
    scores = torch.tensor([[[0.1, -1.0, 2.0, 0.3], [1.5, 0.2, -0.4, 0.0]]], requires_grad=True)
    outputs = {"pred_masks": (masks.float() * 20 - 10)[None], "pred_boxes": boxes[None],
               "pred_ious": torch.tensor([[0.9, 0.8, 0.7, 0.6]]), "pred_match_score": scores}
    target = {"masks": masks, "boxes": boxes, "content_masks": masks[[2, 0]]}
    crit = SetCriterion(HungarianMatcher(num_points=256), losses=("match_score",), match_costs=("mask",))
    loss = crit(outputs, [target])["loss_match_score_0"]
    s = scores.detach()[0]
    expected = -(torch.log_softmax(s[0], 0)[2] + torch.log_softmax(s[1], 0)[0]) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert scores.grad.abs().sum() > 0
    # overlapping duplicates are suppressed: prediction 3 becomes a copy of 2 with a lower IoU
    dup_masks, dup_boxes = outputs["pred_masks"].clone(), boxes.clone()
    dup_masks[0, 3], dup_boxes[3] = dup_masks[0, 2], boxes[2]
    outputs_dup = dict(outputs, pred_masks=dup_masks, pred_boxes=dup_boxes[None])
    loss_dup = crit(outputs_dup, [dict(target, boxes=dup_boxes)])["loss_match_score_0"]
    kept = s[:, :3]
    expected_dup = -(torch.log_softmax(kept[0], 0)[2] + torch.log_softmax(kept[1], 0)[0]) / 2
    assert loss_dup.item() == pytest.approx(expected_dup.item(), rel=1e-5)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(HungarianMatcher(), losses=("labels", "focal"))
    targets = _targets()
    targets[0] = dict(targets[0], labels=torch.tensor([2, 5]))
    with pytest.raises(ValueError, match="number of classes"):
        indices = [(torch.tensor([0, 1]), torch.tensor([0, 1])), (torch.tensor([0]), torch.tensor([0]))]
        SetCriterion(HungarianMatcher(num_points=8), losses=("labels",))(_outputs(0), targets, indices=indices)


def test_target_masks_are_padded_to_the_largest_image_of_the_batch():
    # image 0 (32 x 32, one full mask) sits in the top-left quarter of the batch's 64 x 64 extent,
    # set by image 1 which has no instances; the predicted masks cover that whole extent
    full = {"labels": torch.tensor([0]), "masks": torch.ones(1, 32, 32, dtype=torch.bool),
            "boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5]])}
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 64, 64, dtype=torch.bool),
             "boxes": torch.zeros(0, 4)}
    outputs = {"pred_masks": torch.zeros(2, 3, 16, 16)}
    crit = SetCriterion(HungarianMatcher(num_points=8), losses=("masks",), num_points=4000,
                        importance_sample_ratio=0.0)
    indices = [(torch.tensor([0]), torch.tensor([0])), (torch.zeros(0, dtype=torch.long),) * 2]
    dice = crit(outputs, [full, empty], indices=indices)["loss_mask_dice_0"].item()
    # logits 0 -> probability 1/2 everywhere; a quarter of the points fall on the mask:
    # dice loss 1 - (2 * 0.5 * P / 4) / (0.5 * P + P / 4) = 2/3 (it would be 1/3 without the padding)
    assert dice == pytest.approx(2 / 3, abs=0.03)


def test_point_sampled_mask_losses_equal_the_dense_losses_on_every_pixel_centre():
    """Points at every pixel centre sample the masks exactly: the point BCE and dice are the dense ones; uniform
    random points (importance ratio 0) are an unbiased estimate of the BCE integrated over the image (the bilinear
    field; here on a grid 8 times finer than the pixels)."""
    from dinov.train.losses import dice_loss, point_sample, sigmoid_ce_loss, uncertain_point_coords

    torch.manual_seed(0)
    h, w = 12, 16
    logits = torch.randn(3, 1, h, w)
    target = (torch.rand(3, 1, h, w) > 0.6).float()
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], -1)[None].expand(3, -1, -1)
    point_logits = point_sample(logits, coords)[:, 0]
    point_labels = point_sample(target, coords)[:, 0]
    assert torch.allclose(point_logits, logits.flatten(1), atol=1e-6)
    dense_bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1).sum() / 3
    assert torch.allclose(sigmoid_ce_loss(point_logits, point_labels, 3.0), dense_bce, atol=1e-6)
    prob = logits.sigmoid().flatten(1)
    dense_dice = 1 - (2 * (prob * target.flatten(1)).sum(1) + 1) / (prob.sum(1) + target.flatten(1).sum(1) + 1)
    assert torch.allclose(dice_loss(point_logits, point_labels), dense_dice, atol=1e-6)
    # uniform points: the mean over many draws approaches the integral over the image
    fy, fx = torch.meshgrid((torch.arange(8 * h) + 0.5) / (8 * h), (torch.arange(8 * w) + 0.5) / (8 * w), indexing="ij")
    fine = torch.stack([fx.flatten(), fy.flatten()], -1)[None].expand(3, -1, -1)
    integral = sigmoid_ce_loss(point_sample(logits, fine)[:, 0], point_sample(target, fine)[:, 0], 3.0)
    generator = torch.Generator().manual_seed(1)
    estimates = []
    for _ in range(200):
        uniform = uncertain_point_coords(logits, 64, importance_sample_ratio=0.0, generator=generator)
        estimates.append(sigmoid_ce_loss(point_sample(logits, uniform)[:, 0], point_sample(target, uniform)[:, 0], 3.0))
    assert abs(float(torch.stack(estimates).mean()) - float(integral)) < 0.015
