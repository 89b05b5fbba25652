import math

import numpy as np
import pytest
import torch

from dinov.metrics import InstanceEvaluator, best_ious, coco_average_precision, iou, mask_iou, point_in_mask

H, W = 20, 40


def rect(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_mask_iou_known_values():
    a = rect(0, 2, 0, 2)  # 4 px
    b = rect(0, 2, 1, 3)  # 4 px, 2 shared -> union 6
    empty = np.zeros((H, W), bool)
    got = mask_iou(np.stack([a, b, empty]), np.stack([a, b, empty]))
    expected = [[1, 1 / 3, 0], [1 / 3, 1, 0], [0, 0, 0]]
    np.testing.assert_allclose(got, expected, atol=1e-7)
    assert iou(torch.from_numpy(a), b) == pytest.approx(1 / 3) and iou(empty, empty) == 0.0
    with pytest.raises(ValueError, match="two"):
        iou(a[None], b)
    with pytest.raises(ValueError, match="different sizes"):
        mask_iou(a, a[:, :5])
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        mask_iou(np.zeros((1, 1, H, W)), a)


def test_best_iou_only_counts_predictions_of_the_same_class():
    gt = np.stack([rect(0, 10, 0, 10), rect(0, 10, 20, 30)])
    pred = np.stack([rect(0, 10, 0, 6), rect(0, 10, 20, 30), rect(0, 10, 0, 10)])
    # the exact copy of instance 0 has the wrong class; the 60 % one has the right class
    got = best_ious(pred, [0, 1, 1], gt, [0, 1])
    np.testing.assert_allclose(got, [0.6, 1.0])
    np.testing.assert_allclose(best_ious(np.zeros((0, H, W), bool), [], gt, [0, 1]), [0, 0])


def test_miou_and_found_over_all_instances():
    ev = InstanceEvaluator()
    # image 1: instance A (class 0) found with IoU 0.6; instance B (class 1) only hit by a class-0 prediction
    ev.add(np.stack([rect(0, 10, 0, 6), rect(0, 10, 20, 30)]), [0.9, 0.8], [0, 0],
           np.stack([rect(0, 10, 0, 10), rect(0, 10, 20, 30)]), [0, 1])
    # image 2: instance C (class 1) predicted with IoU 0.4
    ev.add(rect(0, 10, 0, 4)[None], [0.5], [1], rect(0, 10, 0, 10)[None], [1])
    s = ev.summary()
    assert s["num_instances"] == 3 and s["num_images"] == 2
    assert s["miou"] == pytest.approx((0.6 + 0.0 + 0.4) / 3)
    assert s["found"] == pytest.approx(1 / 3)
    assert s["per_class"][0]["miou"] == pytest.approx(0.6) and s["per_class"][1]["miou"] == pytest.approx(0.2)
    # class 0: one TP (score .9) and one FP (.8) for 1 instance -> AP 1; class 1: the only
    # detection misses (IoU 0.4) -> AP 0; the mean over classes with instances is 0.5
    assert s["per_class"][0]["ap50"] == pytest.approx(1.0)
    assert s["per_class"][1]["ap50"] == 0.0
    assert s["ap50"] == pytest.approx(0.5)


def test_ap50_by_hand():
    g1, g2, g3 = rect(0, 10, 0, 10), rect(0, 10, 20, 30), rect(10, 20, 0, 10)
    ev = InstanceEvaluator()
    # image 1: .9 on g1 (TP), .8 a duplicate of g1 (FP: g1 is taken), .7 on g2 (TP)
    ev.add(np.stack([g1, g1, g2]), [0.9, 0.8, 0.7], [3, 3, 3], np.stack([g1, g2]), [3, 3])
    # image 2: .6 on empty background (FP), .5 on g3 (TP)
    ev.add(np.stack([rect(0, 5, 30, 40), g3]), [0.6, 0.5], [3, 3], g3[None], [3])
    # ranked: TP FP TP FP TP over 3 instances; precision envelope 1 up to recall 1/3 (34 of the 101
    # recall points), 2/3 up to 2/3 (33 points), 3/5 up to 1 (34 points)
    expected = (34 * 1 + 33 * (2 / 3) + 34 * 0.6) / 101
    assert ev.summary()["ap50"] == pytest.approx(expected, abs=1e-9)
    # the same from the ranked list directly, whatever order the detections come in
    scores = np.array([0.5, 0.9, 0.6, 0.8, 0.7])
    matched = np.array([True, True, False, False, True])
    assert coco_average_precision(scores, matched, 3) == pytest.approx(expected, abs=1e-9)
    assert math.isnan(coco_average_precision(scores, matched, 0))
    assert coco_average_precision(np.zeros(0), np.zeros(0, bool), 2) == 0.0


def test_ap_matching_is_greedy_by_score_like_coco():
    a, b = rect(0, 10, 0, 10), rect(0, 10, 6, 16)
    ev = InstanceEvaluator()
    # the best-scored detection overlaps both instances and takes the better one (b, IoU 0.8 vs a 0.6);
    # the second detection only fits b, already taken, so it is a false positive although a
    # one-to-one optimum would have matched both
    d1 = rect(0, 10, 4, 14)  # IoU with a: 60/140; with b: 80/120
    d2 = rect(0, 10, 7, 16)
    assert mask_iou(d1, a)[0, 0] < 0.5 < mask_iou(d1, b)[0, 0]
    ev.add(np.stack([d2, d1]), [0.4, 0.9], [0, 0], np.stack([a, b]), [0, 0])
    # ranked: TP, FP over 2 instances -> precision 1 up to recall 0.5 (51 points), then 0
    assert ev.summary()["ap50"] == pytest.approx(51 / 101)


def test_ap_classes_without_instances_are_left_out_and_missed_classes_count_zero():
    g = rect(0, 10, 0, 10)
    ev = InstanceEvaluator()
    ev.add(np.stack([g, rect(10, 20, 20, 30)]), [0.9, 0.9], [0, 5], np.stack([g, g]), [0, 2])
    s = ev.summary()
    # class 0: AP 1; class 2: instance never predicted -> 0; class 5: no instances -> not averaged
    assert math.isnan(s["per_class"][5]["ap50"]) and s["per_class"][2]["ap50"] == 0
    assert s["ap50"] == pytest.approx(0.5)
    assert s["miou"] == pytest.approx(0.5) and s["found"] == pytest.approx(0.5)


def test_at_most_max_detections_per_image_and_class():
    g = rect(0, 10, 0, 10)
    ev = InstanceEvaluator(max_detections=1)
    # the lower-scored exact detection is dropped; the kept one misses
    ev.add(np.stack([rect(10, 20, 20, 30), g]), [0.9, 0.1], [0, 0], g[None], [0])
    assert ev.summary()["ap50"] == 0.0
    ev = InstanceEvaluator(max_detections=2)
    ev.add(np.stack([rect(10, 20, 20, 30), g]), [0.9, 0.1], [0, 0], g[None], [0])
    # FP then TP: precision 1/2 at recall 1 for every recall point
    assert ev.summary()["ap50"] == pytest.approx(0.5)


def test_evaluator_input_checks_and_empty_summary():
    ev = InstanceEvaluator()
    assert math.isnan(ev.summary()["miou"]) and ev.summary()["num_instances"] == 0
    with pytest.raises(ValueError, match="entries"):
        ev.add(np.zeros((2, H, W), bool), [0.5], [0, 0], np.zeros((0, H, W), bool), [])
    with pytest.raises(ValueError, match="resize"):
        ev.add(np.zeros((1, 5, 5), bool), [0.5], [0], np.zeros((1, H, W), bool), [0])
    # no predictions at all, torch inputs
    ev.add(torch.zeros(0, H, W, dtype=torch.bool), torch.zeros(0), torch.zeros(0, dtype=torch.long),
           torch.from_numpy(rect(0, 5, 0, 5))[None], torch.tensor([1]))
    s = ev.summary()
    assert s["miou"] == 0 and s["found"] == 0 and s["ap50"] == 0


def test_point_in_mask_rounds_to_the_nearest_pixel_and_clamps():
    mask = np.zeros((4, 5), bool)
    mask[1, 2] = True
    assert point_in_mask(mask, 2, 1) and point_in_mask(mask, 1.6, 0.6)  # rounds, as the click rules do
    assert not point_in_mask(mask, 2.6, 1)
    mask[3, 4] = True
    assert point_in_mask(mask, 40, 30)  # outside: the nearest pixel inside


def test_a_second_region_on_a_matched_instance_is_wrong():
    from dinov.metrics import region_matches, roc_auc, standard_error, wrong_regions

    truth = np.zeros((2, 10, 10), bool)
    truth[0, :5, :5] = True
    truth[1, 5:, 5:] = True
    duplicate = truth[0].copy()
    duplicate[0, 0] = False
    preds = np.stack([truth[0], duplicate, truth[1]])
    assert region_matches(preds, [0.9, 0.8, 0.7], [0, 0, 1], truth, [0, 1]).tolist() == [True, False, True]
    # the higher score takes the instance
    assert region_matches(preds, [0.5, 0.8, 0.7], [0, 0, 1], truth, [0, 1]).tolist() == [False, True, True]
    assert wrong_regions(preds, [0, 0, 1], truth, [0, 1]) == 0  # without scores: the lenient rule
    assert wrong_regions(preds, [0, 0, 1], truth, [0, 1], pred_scores=[0.9, 0.8, 0.7]) == 1
    assert roc_auc([0.9, 0.8, 0.3, 0.1], [True, False, True, False]) == 0.75
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5 and np.isnan(roc_auc([0.1], [True]))
    assert standard_error([1.0, 3.0]) == pytest.approx(1.0)
