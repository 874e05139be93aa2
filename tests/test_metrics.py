"""Metrics against values computed by hand."""

import math
import warnings

import numpy as np
import pytest

from bench.core import metrics
from bench.core.metrics import GroupStructure

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
                               average_kind="urbancars_id", extra_metrics=("urbancars",))
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
    from bench.core.dataset import AVERAGE_KINDS

    assert set(metrics.AVERAGE_LABELS) == set(AVERAGE_KINDS)
    assert np.isfinite(metrics.average_accuracy([1, 1, 1, 1], [2, 2, 2, 2],
                                                GroupStructure(2, (2,), (1, 1, 1, 1), "group_mean")))


# --------------------------------------------------------------------------------------------
# Batched forms: counts [..., G] give one value per split, exactly those of one call per split.

BATCH_STRUCTURES = {
    "train_weighted": WATERBIRDS,
    "plain": GroupStructure(2, (2,), (10, 1, 1, 10), "plain"),
    # 3 classes x 4 attribute values (12 groups: numpy sums 8 or more values pairwise, not one by one);
    # the last group has no training example (left out of the weighting).
    "group_mean": GroupStructure(3, (4,), (30, 3, 3, 3, 3, 30, 3, 3, 3, 3, 30, 0), "group_mean"),
    "urbancars_id": GroupStructure(2, (2, 2), (361, 19, 19, 1, 1, 19, 19, 361), "urbancars_id",
                                   extra_metrics=("urbancars",)),
}

# Each takes (correct, total, structure); reductions give [...] (a float for one split), the others [..., K].
BATCH_FUNCTIONS = {
    "group_accuracies": lambda c, t, s: metrics.group_accuracies(c, t),
    "worst_group_accuracy": lambda c, t, s: metrics.worst_group_accuracy(c, t),
    "plain_accuracy": lambda c, t, s: metrics.plain_accuracy(c, t),
    "group_mean_accuracy": lambda c, t, s: metrics.group_mean_accuracy(c, t),
    "train_weighted_accuracy": lambda c, t, s: metrics.train_weighted_accuracy(c, t, s.train_group_counts),
    "class_accuracies": metrics.class_accuracies,
    "worst_class_accuracy": metrics.worst_class_accuracy,
    "average_accuracy": metrics.average_accuracy,
}
PER_GROUP = {"group_accuracies", "class_accuracies"}


def three_splits(n_groups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[3, G] counts: an ordinary split, one with an empty group, one with a single non-empty group."""
    rng = np.random.default_rng(seed)
    total = rng.integers(1, 40, size=(3, n_groups))
    total[1, 1] = 0
    total[2, 1:] = 0
    correct = rng.binomial(total, 0.7)
    return correct, total


@pytest.mark.parametrize("kind", list(BATCH_STRUCTURES))
def test_a_batch_gives_what_separate_calls_give(kind: str) -> None:
    structure = BATCH_STRUCTURES[kind]
    correct, total = three_splits(structure.n_groups, seed=len(kind))
    functions = dict(BATCH_FUNCTIONS)
    if structure.extra_metrics:
        for key in ("id_acc", "bg_gap", "coobj_gap", "bg_coobj_gap"):
            functions[key] = lambda c, t, s, key=key: metrics.urbancars_metrics(c, t)[key]
    for name, function in functions.items():
        batch = function(correct, total, structure)
        singles = [function(correct[i].tolist(), total[i].tolist(), structure) for i in range(3)]
        if name in PER_GROUP:
            assert batch.shape == (3, len(singles[0])), name
        else:
            assert isinstance(batch, np.ndarray) and batch.shape == (3,), name
            assert all(isinstance(single, float) for single in singles), name
        for i, single in enumerate(singles):
            np.testing.assert_array_equal(batch[i], single, err_msg=f"{name}, split {i}")  # NaN == NaN here
    # The cases the splits were made for: an empty group is left out or makes the weighting undefined.
    assert np.isnan(metrics.train_weighted_accuracy(correct, total, structure.train_group_counts)[1:]).all()
    assert metrics.worst_group_accuracy(correct, total)[2] == correct[2, 0] / total[2, 0]


def test_many_splits_with_more_leading_axes_in_any_memory_layout() -> None:
    structure = BATCH_STRUCTURES["group_mean"]
    rng = np.random.default_rng(7)
    total = rng.integers(1, 40, size=(2, 25, structure.n_groups))  # [2, 25, G]
    correct = rng.binomial(total, rng.uniform(0.2, 1.0, size=total.shape))
    for name, function in BATCH_FUNCTIONS.items():
        singles = np.array([[function(correct[a, b].tolist(), total[a, b].tolist(), structure) for b in range(25)]
                            for a in range(2)])
        np.testing.assert_array_equal(function(correct, total, structure), singles, err_msg=name)
        # Column-major memory (e.g. a transposed array) must not change the order numpy adds a split's groups in.
        fortran = function(np.asfortranarray(correct[0]), np.asfortranarray(total[0]), structure)
        np.testing.assert_array_equal(fortran, singles[0], err_msg=name)


def test_summarize_of_a_batch() -> None:
    structure = BATCH_STRUCTURES["urbancars_id"]
    correct, total = three_splits(8, seed=3)
    batch = metrics.summarize(correct, total, structure)
    for i in range(3):
        single = metrics.summarize(correct[i], total[i], structure)
        assert batch.keys() == single.keys()
        for key, value in single.items():
            if key == "group_accuracies":
                expected = [np.nan if a is None else a for a in value]
                np.testing.assert_array_equal(batch[key][i], expected)
            elif key == "average_kind":
                assert batch[key] == value
            else:
                np.testing.assert_array_equal(batch[key][i], value, err_msg=key)


def test_a_batch_with_an_empty_split() -> None:
    correct, total = np.array([[3, 1], [0, 0]]), np.array([[4, 2], [0, 0]])
    # Worst-group accuracy of a split without any example is an error, as for a single such split.
    with pytest.raises(ValueError, match="no group has any example"):
        metrics.worst_group_accuracy(correct, total)
    # The others are NaN for it, without numpy's all-NaN warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for values in (metrics.plain_accuracy(correct, total), metrics.group_mean_accuracy(correct, total),
                       metrics.train_weighted_accuracy(correct, total, (1, 1)),
                       metrics.worst_class_accuracy(correct, total, GroupStructure(2, (1,), (1, 1)))):
            assert not np.isnan(values[0]) and np.isnan(values[1])


def test_batch_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.group_accuracies(np.zeros((3, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="group axis"):
        metrics.plain_accuracy(1, 2)
    with pytest.raises(ValueError, match="8 groups"):
        metrics.urbancars_metrics(np.zeros((3, 4)), np.ones((3, 4)))
    with pytest.raises(ValueError, match="3 group counts for 4 groups"):
        metrics.class_accuracies(np.zeros((2, 3)), np.ones((2, 3)), WATERBIRDS)
