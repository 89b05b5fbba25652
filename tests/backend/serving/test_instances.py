"""LabeledMask selection (labelstudio_backend/serving/instances.py): pure functions over LabeledMask values."""

from __future__ import annotations

import numpy as np

from labelstudio_backend.serving.instances import LabeledMask, SelectionRules, select_instances, similar_to_drawn


def square(r0: int, c0: int, size: int = 4, shape: tuple[int, int] = (12, 12)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[r0:r0 + size, c0:c0 + size] = True
    return mask


def test_best_first_no_duplicates_per_label_limit_and_min_area():
    rules = SelectionRules(max_per_label=2, min_area=4, allow_overlap=False)
    found = [LabeledMask("a", square(0, 0), 0.5), LabeledMask("a", square(0, 0), 0.9),  # a duplicate, lower score
             LabeledMask("a", square(6, 6), 0.7), LabeledMask("a", square(6, 0), 0.6),  # over the per-label limit
             LabeledMask("b", square(0, 0, 2), 0.8)]                                # inside a's better square
    kept = select_instances(found, rules)
    assert [(k.label, k.score) for k in kept] == [("a", 0.9), ("a", 0.7)]


def test_a_part_of_a_found_object_is_not_a_new_object():
    rules = SelectionRules(max_per_label=5, min_area=1, allow_overlap=True)
    whole = LabeledMask("a", square(0, 0, 6), 0.9)
    part = LabeledMask("a", square(0, 0, 3), 0.8)           # IoU 0.25 with the whole, but all inside it
    half_out = LabeledMask("a", square(3, 3, 6), 0.7)       # a quarter inside: another object
    other_label = LabeledMask("b", square(1, 1, 3), 0.6)    # inside, but another label may overlap
    kept = select_instances([whole, part, half_out, other_label], rules)
    assert [(k.label, k.score) for k in kept] == [("a", 0.9), ("a", 0.7), ("b", 0.6)]
    # labels may not overlap: a region mostly inside a better one of another label is that object too
    kept = select_instances([whole, other_label], SelectionRules(5, 1, allow_overlap=False))
    assert [(k.label, k.score) for k in kept] == [("a", 0.9)]


def test_overlap_between_labels_goes_to_the_better_instance_unless_allowed():
    a, b = LabeledMask("a", square(0, 0), 0.9), LabeledMask("b", square(2, 2), 0.8)
    kept = select_instances([a, b], SelectionRules(5, 1, allow_overlap=False))
    assert kept[1].mask.sum() == 16 - 4 and not (kept[0].mask & kept[1].mask).any()
    kept = select_instances([a, b], SelectionRules(5, 1, allow_overlap=True))
    assert kept[1].mask.sum() == 16


def test_similar_objects_leave_out_negative_clicks_and_keep_the_drawn_one():
    drawn = LabeledMask("a", square(0, 0), 0.9)
    other, refused = LabeledMask("a", square(6, 6), 0.8), LabeledMask("a", square(6, 0), 0.7)
    similar = similar_to_drawn([other, refused], drawn, negatives=[(1.4, 7.2)])  # (x, y) inside `refused`
    assert similar == [other, drawn]
    assert similar_to_drawn([drawn], drawn, negatives=[]) == [drawn]


def _select_on_whole_masks(instances, rules):
    """The rule computed on whole-image masks (the implementation before issue 22), as the reference."""
    from collections import defaultdict

    kept, counts, claimed, own = [], defaultdict(int), None, {}
    for instance in sorted(instances, key=lambda item: -item.score):
        label = instance.label
        if counts[label] >= rules.max_per_label:
            continue
        mask = np.asarray(instance.mask, dtype=bool)
        if claimed is None:
            claimed = np.zeros_like(mask)
        taken = claimed if not rules.allow_overlap else own.get(label, np.zeros_like(mask))
        area = int(mask.sum())
        if area and int((mask & taken).sum()) >= 0.8 * area:
            continue
        if not rules.allow_overlap:
            mask = mask & ~(claimed & ~own.get(label, np.zeros_like(mask)))
        if int(mask.sum()) < max(1, rules.min_area):
            continue
        kept.append(LabeledMask(label, mask, instance.score))
        counts[label] += 1
        claimed |= mask
        own[label] = own.get(label, np.zeros_like(mask)) | mask
    return kept


def test_selection_inside_boxes_equals_the_whole_mask_rule():
    rng = np.random.default_rng(22)
    for trial in range(200):
        height, width = (int(v) for v in rng.integers(5, 60, 2))
        found = []
        for k in range(int(rng.integers(0, 12))):
            mask = np.zeros((height, width), bool)
            y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
            mask[y0 : y0 + int(rng.integers(0, 30)), x0 : x0 + int(rng.integers(0, 30))] = True
            if k % 3 == 0:
                mask &= rng.random((height, width)) < 0.7  # holes and separate parts
            found.append(LabeledMask(str(rng.choice(["cat", "dog"])), mask, float(rng.random())))
        rules = SelectionRules(int(rng.integers(1, 6)), int(rng.integers(0, 40)), bool(trial % 2))
        got, want = select_instances(found, rules), _select_on_whole_masks(found, rules)
        assert [(g.label, g.score) for g in got] == [(w.label, w.score) for w in want]
        assert all(np.array_equal(g.mask, w.mask) for g, w in zip(got, want))
