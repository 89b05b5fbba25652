import itertools
import math

import pytest
import torch

from dinov.train.losses import point_sample
from dinov.train.matcher import FORBIDDEN_COST, HungarianMatcher, interactive_allowed


def _random_case(seed: int, num_queries: int, num_targets: int, num_classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(1, num_queries, num_classes, generator=g) * 2,
        "pred_masks": torch.randn(1, num_queries, 8, 8, generator=g) * 3,
        "pred_boxes": torch.rand(1, num_queries, 4, generator=g) * 0.4 + 0.1,
    }
    target = {
        "labels": torch.randint(0, num_classes, (num_targets,), generator=g),
        "masks": torch.rand(num_targets, 32, 32, generator=g) > 0.5,
        "boxes": torch.rand(num_targets, 4, generator=g) * 0.4 + 0.1,
    }
    return outputs, target


def _xyxy(b):
    cx, cy, w, h = b
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _giou(a, b):
    ax0, ay0, ax1, ay1 = _xyxy(a)
    bx0, by0, bx1, by1 = _xyxy(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _pair_cost(outputs, target, points, q, t, w):
    """The matching cost of one pair, written out term by term with plain floats."""
    alpha, gamma = 0.25, 2.0
    p = torch.sigmoid(outputs["pred_logits"][0, q, target["labels"][t]]).item()
    cls = alpha * (1 - p) ** gamma * -math.log(p + 1e-6) - (1 - alpha) * p**gamma * -math.log(1 - p + 1e-6)
    pb = outputs["pred_boxes"][0, q].tolist()
    tb = target["boxes"][t].tolist()
    l1 = sum(abs(a - b) for a, b in zip(pb, tb))
    x = point_sample(outputs["pred_masks"][0, q][None, None], points[None])[0, 0].tolist()
    y = point_sample(target["masks"][t].float()[None, None], points[None])[0, 0].tolist()
    bce = sum(math.log1p(math.exp(-xi)) * yi + math.log1p(math.exp(xi)) * (1 - yi) for xi, yi in zip(x, y)) / len(x)
    s = [1 / (1 + math.exp(-xi)) for xi in x]
    dice = 1 - (2 * sum(si * yi for si, yi in zip(s, y)) + 1) / (sum(s) + sum(y) + 1)
    return (w["class"] * cls + w["box"] * l1 - w["giou"] * _giou(pb, tb)
            + w["mask"] * bce + w["dice"] * dice)


WEIGHTS = {"class": 4.0, "mask": 5.0, "dice": 5.0, "box": 5.0, "giou": 2.0}


@pytest.mark.parametrize("seed, num_queries, num_targets", [(0, 3, 2), (1, 4, 4), (2, 5, 3), (3, 3, 4), (4, 6, 1)])
def test_matching_is_the_brute_force_optimum(seed, num_queries, num_targets):
    outputs, target = _random_case(seed, num_queries, num_targets)
    matcher = HungarianMatcher(num_points=64)
    (rows, cols), = matcher(outputs, [target], generator=torch.Generator().manual_seed(seed))
    points = torch.rand(64, 2, generator=torch.Generator().manual_seed(seed))  # the matcher's points

    cost = [[_pair_cost(outputs, target, points, q, t, WEIGHTS) for t in range(num_targets)]
            for q in range(num_queries)]
    # the matcher's own cost matrix agrees with the term-by-term costs
    matrix = matcher.cost_matrix(outputs, target, 0, point_coords=points)
    torch.testing.assert_close(matrix, torch.tensor(cost), atol=1e-4, rtol=1e-4)

    # brute force over every injective assignment of the smaller side into the larger
    k = min(num_queries, num_targets)
    best, best_pairs = math.inf, None
    if num_targets <= num_queries:
        for qs in itertools.permutations(range(num_queries), num_targets):
            total = sum(cost[q][t] for t, q in enumerate(qs))
            if total < best:
                best, best_pairs = total, sorted((q, t) for t, q in enumerate(qs))
    else:
        for ts in itertools.permutations(range(num_targets), num_queries):
            total = sum(cost[q][t] for q, t in enumerate(ts))
            if total < best:
                best, best_pairs = total, sorted(enumerate(ts))
    assert len(rows) == len(cols) == k
    assert rows.tolist() == sorted(rows.tolist())
    assert sum(cost[q][t] for q, t in zip(rows.tolist(), cols.tolist())) == pytest.approx(best, abs=1e-5)
    assert list(zip(rows.tolist(), cols.tolist())) == best_pairs


def test_perfect_predictions_are_found_in_shuffled_order():
    torch.manual_seed(0)
    n, q = 4, 7
    masks = torch.zeros(n, 40, 40, dtype=torch.bool)
    boxes = torch.zeros(n, 4)
    for i in range(n):
        masks[i, 10 * i:10 * i + 8, 5:30] = True
        boxes[i] = torch.tensor([17.5, 10 * i + 4, 25, 8]) / 40
    labels = torch.tensor([2, 0, 2, 1])
    slots = torch.tensor([5, 1, 3, 0])  # target i is predicted by query slots[i]
    pred_masks = torch.full((1, q, 40, 40), -8.0)
    pred_boxes = torch.rand(1, q, 4) * 0.2 + 0.4
    pred_logits = torch.full((1, q, 3), -6.0)
    for i in range(n):
        pred_masks[0, slots[i]][masks[i]] = 8.0
        pred_boxes[0, slots[i]] = boxes[i]
        pred_logits[0, slots[i], labels[i]] = 6.0
    outputs = {"pred_logits": pred_logits, "pred_masks": pred_masks, "pred_boxes": pred_boxes}
    (rows, cols), = HungarianMatcher(num_points=500)(outputs, [{"labels": labels, "masks": masks, "boxes": boxes}])
    assert dict(zip(cols.tolist(), rows.tolist())) == {i: int(slots[i]) for i in range(n)}


def test_each_cost_term_alone_drives_the_match():
    # two queries, two targets; each cost term on its own prefers the swapped assignment
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, :, :8] = True
    masks[1, :, 8:] = True
    boxes = torch.tensor([[0.25, 0.5, 0.5, 1.0], [0.75, 0.5, 0.5, 1.0]])
    target = {"labels": torch.tensor([0, 1]), "masks": masks, "boxes": boxes}
    outputs = {
        "pred_logits": torch.tensor([[[-5.0, 5.0], [5.0, -5.0]]]),
        "pred_masks": torch.stack([masks[1], masks[0]]).float()[None] * 10 - 5,
        "pred_boxes": boxes.flip(0)[None],
    }
    for costs, kwargs in [(("cls",), {}), (("mask",), {}), (("box",), {}),
                          (("box",), {"cost_box": 0.0}), (("mask",), {"cost_mask": 0.0})]:
        (rows, cols), = HungarianMatcher(num_points=200, **kwargs)(outputs, [target], costs=costs)
        assert cols.tolist() == [1, 0], (costs, kwargs)


def test_allowed_pairs_and_class_agnostic_targets():
    outputs, target = _random_case(7, 6, 2)
    allowed = torch.zeros(6, 2, dtype=torch.bool)
    allowed[3:, 0] = True  # target 0 may only go to queries 3-5, target 1 only to 0-2
    allowed[:3, 1] = True
    agnostic = {"masks": target["masks"], "boxes": target["boxes"], "allowed": allowed}
    (rows, cols), = HungarianMatcher(num_points=32)(outputs, [agnostic], costs=("box", "mask"))
    for q, t in zip(rows.tolist(), cols.tolist()):
        assert allowed[q, t]
    cost = HungarianMatcher(num_points=32).cost_matrix(outputs, agnostic, 0, costs=("box", "mask"))
    assert (cost[~allowed] == FORBIDDEN_COST).all() and (cost[allowed] < 100).all()
    with pytest.raises(ValueError, match="allowed"):
        HungarianMatcher()(outputs, [dict(agnostic, allowed=allowed[:5])], costs=("box",))


def test_batches_empty_targets_and_errors():
    o1, t1 = _random_case(1, 5, 3)
    o2, _ = _random_case(2, 5, 3)
    outputs = {k: torch.cat([o1[k], o2[k]]) for k in o1}
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 32, 32, dtype=torch.bool),
             "boxes": torch.zeros(0, 4)}
    (r1, c1), (r2, c2) = HungarianMatcher(num_points=16)(outputs, [t1, empty])
    assert len(r1) == 3 and len(r2) == len(c2) == 0 and r2.dtype == torch.int64
    with pytest.raises(ValueError, match="targets for a batch"):
        HungarianMatcher()(outputs, [t1])
    with pytest.raises(ValueError, match="number of classes"):
        HungarianMatcher()(o1, [dict(t1, labels=torch.tensor([0, 1, 9]))])
    with pytest.raises(ValueError, match="unknown costs"):
        HungarianMatcher()(o1, [t1], costs=("cls", "iou"))
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(cost_class=0, cost_mask=0, cost_dice=0)


def test_interactive_allowed_pairs_each_prompt_with_its_own_targets():
    allowed = interactive_allowed([2, 0, 1], tokens_per_prompt=3)
    expected = torch.tensor([[1, 1, 0]] * 3 + [[0, 0, 0]] * 3 + [[0, 0, 1]] * 3, dtype=torch.bool)
    assert torch.equal(allowed, expected)
    with pytest.raises(ValueError, match="granularity"):
        interactive_allowed([7], tokens_per_prompt=6)
