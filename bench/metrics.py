"""The evaluation protocol: every metric the harness reports, computed from per-group counts.

Everything here is a pure function of ``correct[g]`` and ``total[g]`` (the number of correctly
classified and of all examples of group ``g`` in one split) plus the dataset's group structure, so
any metric can be recomputed later from the run records alone.

"Average accuracy" means different things in different papers; we never print a bare "average":

* ``plain``: correct / total over all examples of the split (DFR, CelebA, Spawrious convention).
* ``train_weighted``: group accuracies weighted by the *training* group proportions (GroupDRO /
  WILDS ``adj_acc_avg`` / JTT convention for Waterbirds).
* ``group_mean``: unweighted mean of the group accuracies ("balanced"/"unbiased" accuracy).
* ``urbancars_id``: UrbanCars' I.D. Acc (Whac-A-Mole), see :func:`urbancars_metrics`.

Groups with no example in the split are left out of worst-group accuracy and of the group mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

AVERAGE_LABELS = {
    "plain": "average accuracy (plain, over examples)",
    "train_weighted": "average accuracy (weighted by training group proportions)",
    "group_mean": "average accuracy (mean over groups)",
    "urbancars_id": "I.D. Acc (UrbanCars, weighted by training alignment ratios)",
}

# UrbanCars: both spurious cues are aligned with the object class with this ratio in training.
URBANCARS_TRAIN_RATIO = 0.95


@dataclass(frozen=True)
class GroupStructure:
    """What the metrics need to know about a dataset's groups (see datasets.base for the id layout)."""

    n_classes: int
    attr_cardinalities: tuple[int, ...]
    train_group_counts: tuple[int, ...]
    average_kind: str = "plain"
    is_urbancars: bool = False

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> GroupStructure:
        """From :meth:`datasets.base.SpuriousDataset.info` (also stored in every run's config.json)."""
        return cls(
            n_classes=info["n_classes"],
            attr_cardinalities=tuple(len(v) for v in info["attr_value_names"]),
            train_group_counts=tuple(info["group_counts"]["train"]),
            average_kind=info["average_kind"],
            is_urbancars=info["average_kind"] == "urbancars_id",
        )

    @property
    def n_groups(self) -> int:
        return self.n_classes * int(np.prod(self.attr_cardinalities, dtype=int))

    def class_of_group(self) -> np.ndarray:
        """``class_of_group()[g]`` is the class label of group ``g`` (the most significant digit)."""
        return np.arange(self.n_groups) // (self.n_groups // self.n_classes)


def _as_counts(correct: Sequence[float], total: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    correct_array = np.asarray(correct, dtype=float)
    total_array = np.asarray(total, dtype=float)
    if correct_array.shape != total_array.shape:
        raise ValueError(f"correct {correct_array.shape} and total {total_array.shape} differ in shape")
    if np.any(correct_array > total_array) or np.any(correct_array < 0):
        raise ValueError("each group needs 0 <= correct <= total")
    return correct_array, total_array


def group_accuracies(correct: Sequence[float], total: Sequence[float]) -> np.ndarray:
    """Accuracy of each group; NaN for a group with no example."""
    correct_array, total_array = _as_counts(correct, total)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total_array > 0, correct_array / np.maximum(total_array, 1), np.nan)


def worst_group_accuracy(correct: Sequence[float], total: Sequence[float]) -> float:
    """Minimum accuracy over the groups that have at least one example."""
    accuracies = group_accuracies(correct, total)
    if np.all(np.isnan(accuracies)):
        raise ValueError("no group has any example")
    return float(np.nanmin(accuracies))


def plain_accuracy(correct: Sequence[float], total: Sequence[float]) -> float:
    """Fraction of all examples classified correctly."""
    correct_array, total_array = _as_counts(correct, total)
    return float(correct_array.sum() / total_array.sum())


def group_mean_accuracy(correct: Sequence[float], total: Sequence[float]) -> float:
    """Unweighted mean of the accuracies of the non-empty groups."""
    return float(np.nanmean(group_accuracies(correct, total)))


def train_weighted_accuracy(
    correct: Sequence[float], total: Sequence[float], train_group_counts: Sequence[float]
) -> float:
    """Group accuracies weighted by the training group proportions (WILDS ``adj_acc_avg``).

    Groups with training examples but none in this split make the value undefined (NaN).
    """
    weights = np.asarray(train_group_counts, dtype=float)
    accuracies = group_accuracies(correct, total)
    used = weights > 0
    if np.any(np.isnan(accuracies[used])):
        return float("nan")
    return float(np.sum(weights[used] * accuracies[used]) / weights[used].sum())


def class_accuracies(correct: Sequence[float], total: Sequence[float], structure: GroupStructure) -> np.ndarray:
    """Accuracy of each class (pooled over its groups); NaN for a class with no example."""
    correct_array, total_array = _as_counts(correct, total)
    classes = structure.class_of_group()
    class_correct = np.bincount(classes, weights=correct_array, minlength=structure.n_classes)
    class_total = np.bincount(classes, weights=total_array, minlength=structure.n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(class_total > 0, class_correct / np.maximum(class_total, 1), np.nan)


def worst_class_accuracy(correct: Sequence[float], total: Sequence[float], structure: GroupStructure) -> float:
    """Minimum per-class accuracy; needs no attribute labels (used for label-free model selection)."""
    return float(np.nanmin(class_accuracies(correct, total, structure)))


def urbancars_metrics(
    correct: Sequence[float], total: Sequence[float], ratio: float = URBANCARS_TRAIN_RATIO
) -> dict[str, float]:
    """UrbanCars' metrics exactly as Whac-A-Mole defines them (urbancars_trainers/base_trainer.py).

    Groups are ``g = 4*obj + 2*bg + co``. A cue is "present" (aligned) when its value equals the
    object class. ``A(bg, co)`` is the unweighted mean over the two object classes of the accuracy
    on the cell with that alignment. I.D. Acc weights the four A's by the training ratios
    ``w(present) = ratio``, ``w(absent) = 1 - ratio``; each gap is an A minus I.D. Acc.
    """
    accuracies = group_accuracies(correct, total).reshape(2, 2, 2)  # [obj, bg, co]

    def alignment_mean(bg_aligned: bool, co_aligned: bool) -> float:
        cells = []
        for obj in (0, 1):
            bg = obj if bg_aligned else 1 - obj
            co = obj if co_aligned else 1 - obj
            cells.append(accuracies[obj, bg, co])
        return float(np.mean(cells))

    weight = {True: ratio, False: 1.0 - ratio}
    id_acc = sum(
        alignment_mean(bg, co) * weight[bg] * weight[co] for bg in (True, False) for co in (True, False)
    )
    return {
        "id_acc": float(id_acc),
        "bg_gap": alignment_mean(False, True) - id_acc,
        "coobj_gap": alignment_mean(True, False) - id_acc,
        "bg_coobj_gap": alignment_mean(False, False) - id_acc,
    }


def average_accuracy(correct: Sequence[float], total: Sequence[float], structure: GroupStructure) -> float:
    """The dataset's headline average accuracy, of the kind ``structure.average_kind``."""
    kind = structure.average_kind
    if kind == "plain":
        return plain_accuracy(correct, total)
    if kind == "train_weighted":
        return train_weighted_accuracy(correct, total, structure.train_group_counts)
    if kind == "group_mean":
        return group_mean_accuracy(correct, total)
    if kind == "urbancars_id":
        return urbancars_metrics(correct, total)["id_acc"]
    raise ValueError(f"unknown average kind {kind!r}")


def summarize(correct: Sequence[float], total: Sequence[float], structure: GroupStructure) -> dict[str, Any]:
    """Every metric of one split, each named by what it is."""
    result: dict[str, Any] = {
        "worst_group_accuracy": worst_group_accuracy(correct, total),
        "average_accuracy": average_accuracy(correct, total, structure),
        "average_kind": structure.average_kind,
        "plain_accuracy": plain_accuracy(correct, total),
        "group_mean_accuracy": group_mean_accuracy(correct, total),
        "train_weighted_accuracy": train_weighted_accuracy(correct, total, structure.train_group_counts),
        "worst_class_accuracy": worst_class_accuracy(correct, total, structure),
        "group_accuracies": [None if np.isnan(a) else float(a) for a in group_accuracies(correct, total)],
    }
    if structure.is_urbancars:
        result.update(urbancars_metrics(correct, total))
    return result
