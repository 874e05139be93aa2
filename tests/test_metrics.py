"""Metrics against values computed by hand."""

import math

import numpy as np
import pytest

from bench import metrics
from bench.metrics import GroupStructure

# Waterbirds-like: 2 classes x 2 places, Waterbirds' training counts.
WATERBIRDS = GroupStructure(n_classes=2, attr_cardinalities=(2,), train_group_counts=(3498, 184, 56, 1057),
                            average_kind="train_weighted")


def test_group_and_worst_group_accuracy():
    correct, total = [90, 5, 1, 40], [100, 10, 4, 50]
    assert metrics.group_accuracies(correct, total).tolist() == [0.9, 0.5, 0.25, 0.8]
    assert metrics.worst_group_accuracy(correct, total) == 0.25


def test_empty_groups_are_left_out():
    correct, total = [9, 0, 3, 0], [10, 0, 4, 0]
    accuracies = metrics.group_accuracies(correct, total)
    assert math.isnan(accuracies[1]) and math.isnan(accuracies[3])
    assert metrics.worst_group_accuracy(correct, total) == 0.75
    assert metrics.group_mean_accuracy(correct, total) == pytest.approx((0.9 + 0.75) / 2)


def test_plain_and_group_mean_accuracy():
    correct, total = [90, 5, 1, 40], [100, 10, 4, 50]
    assert metrics.plain_accuracy(correct, total) == pytest.approx(136 / 164)
    assert metrics.group_mean_accuracy(correct, total) == pytest.approx((0.9 + 0.5 + 0.25 + 0.8) / 4)


def test_train_weighted_accuracy_is_wilds_adj_acc_avg():
    correct, total = [90, 5, 1, 40], [100, 10, 4, 50]
    expected = (3498 * 0.9 + 184 * 0.5 + 56 * 0.25 + 1057 * 0.8) / 4795
    assert metrics.train_weighted_accuracy(correct, total, WATERBIRDS.train_group_counts) == pytest.approx(expected)
    assert metrics.average_accuracy(correct, total, WATERBIRDS) == pytest.approx(expected)


def test_train_weighted_is_nan_when_a_trained_group_is_missing():
    assert math.isnan(metrics.train_weighted_accuracy([1, 0, 1, 1], [1, 0, 1, 1], (1, 1, 1, 1)))


def test_worst_class_accuracy_pools_groups_of_a_class():
    # class 0 = groups 0,1: (90+5)/(100+10); class 1 = groups 2,3: (1+40)/(4+50)
    correct, total = [90, 5, 1, 40], [100, 10, 4, 50]
    assert metrics.class_accuracies(correct, total, WATERBIRDS).tolist() == pytest.approx([95 / 110, 41 / 54])
    assert metrics.worst_class_accuracy(correct, total, WATERBIRDS) == pytest.approx(41 / 54)


def test_urbancars_metrics_by_hand():
    # groups g = 4*obj + 2*bg + co; accuracies chosen so every alignment cell differs per object.
    acc = {  # (obj, bg, co): accuracy
        (0, 0, 0): 1.0, (0, 0, 1): 0.8, (0, 1, 0): 0.6, (0, 1, 1): 0.2,
        (1, 1, 1): 0.9, (1, 1, 0): 0.7, (1, 0, 1): 0.5, (1, 0, 0): 0.3,
    }
    total = [100] * 8
    correct = [0] * 8
    for (obj, bg, co), a in acc.items():
        correct[4 * obj + 2 * bg + co] = round(100 * a)
    both_aligned = (1.0 + 0.9) / 2  # bg == obj, co == obj
    bg_conflict = (acc[0, 1, 0] + acc[1, 0, 1]) / 2  # bg != obj, co == obj
    co_conflict = (acc[0, 0, 1] + acc[1, 1, 0]) / 2  # bg == obj, co != obj
    both_conflict = (acc[0, 1, 1] + acc[1, 0, 0]) / 2
    id_acc = 0.9025 * both_aligned + 0.0475 * bg_conflict + 0.0475 * co_conflict + 0.0025 * both_conflict
    result = metrics.urbancars_metrics(correct, total)
    assert result["id_acc"] == pytest.approx(id_acc)
    assert result["bg_gap"] == pytest.approx(bg_conflict - id_acc)
    assert result["coobj_gap"] == pytest.approx(co_conflict - id_acc)
    assert result["bg_coobj_gap"] == pytest.approx(both_conflict - id_acc)
    # Hand value: 0.857375 + 0.026125 + 0.035625 + 0.000625
    assert result["id_acc"] == pytest.approx(0.91975)


def test_summarize_names_every_average_and_adds_urbancars_metrics():
    structure = GroupStructure(n_classes=2, attr_cardinalities=(2, 2), train_group_counts=(1,) * 8,
                               average_kind="urbancars_id", is_urbancars=True)
    summary = metrics.summarize([1] * 8, [2] * 8, structure)
    assert summary["average_kind"] == "urbancars_id"
    assert summary["average_accuracy"] == summary["id_acc"] == pytest.approx(0.5)
    for key in ("plain_accuracy", "group_mean_accuracy", "train_weighted_accuracy", "worst_class_accuracy",
                "bg_gap", "coobj_gap", "bg_coobj_gap"):
        assert key in summary


def test_structure_from_dataset_info():
    info = {"n_classes": 2, "attr_value_names": [["land", "water"]], "average_kind": "train_weighted",
            "group_counts": {"train": [3498, 184, 56, 1057]}}
    structure = GroupStructure.from_info(info)
    assert structure == WATERBIRDS
    assert structure.class_of_group().tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("correct,total", [([2], [1]), ([-1], [1]), ([1, 2], [3])])
def test_invalid_counts_are_rejected(correct, total):
    with pytest.raises(ValueError):
        metrics.group_accuracies(correct, total)


def test_all_empty_split_is_an_error():
    with pytest.raises(ValueError):
        metrics.worst_group_accuracy([0, 0], [0, 0])


def test_average_kind_labels_cover_all_kinds():
    from datasets.base import AVERAGE_KINDS

    assert set(metrics.AVERAGE_LABELS) == set(AVERAGE_KINDS)
    assert np.isfinite(metrics.average_accuracy([1, 1, 1, 1], [2, 2, 2, 2],
                                                GroupStructure(2, (2,), (1, 1, 1, 1), "group_mean")))
