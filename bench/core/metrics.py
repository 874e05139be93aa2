"""The evaluation protocol: every metric the harness reports, computed from per-group counts.

Everything here is a pure function of ``correct[g]`` and ``total[g]`` (the number of correctly
classified and of all examples of group ``g`` in one split) plus the dataset's group structure, so
any metric can be recomputed later from the run records alone.

Every function takes counts of shape ``[..., G]`` (groups on the last axis, any leading batch axes,
e.g. ``[n_evaluations, G]`` for all evaluations of many runs at once) and computes each split (each
row) on its own: a ``[..., G]`` input gives ``[...]`` values, exactly those of one call per row, and
a one-dimensional input (one split) gives a Python float. ``bench report`` aggregates thousands of
runs with these same functions, so there is one definition of every metric.

"Average accuracy" means different things in different papers; we never print a bare "average":

* ``plain``: correct / total over all examples of the split (DFR, CelebA, Spawrious convention).
* ``train_weighted``: group accuracies weighted by the *training* group proportions (GroupDRO /
  WILDS ``adj_acc_avg`` / JTT convention for Waterbirds).
* ``group_mean``: unweighted mean of the group accuracies ("balanced"/"unbiased" accuracy).
* ``urbancars_id``: UrbanCars' I.D. Acc (Whac-A-Mole), see :func:`urbancars_metrics`.

Beyond worst-group accuracy and its average, a dataset may declare *metric sets*
(:data:`METRIC_SETS`, by name in its ``extra_metrics``): UrbanCars declares ``urbancars``, its
I.D. Acc and three gaps. Everything that reports metrics (``summarize``, ``bench run``'s table,
``bench report``) renders whatever a dataset declares; this module is the one place that knows what
each metric set computes.

Groups with no example in the split are left out of worst-group accuracy and of the group mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# A model whose class accuracies are all within this of 0 or 1, one of them 1, predicted one class.
ONE_CLASS_MARGIN = 0.05

# UrbanCars: both spurious cues are aligned with the object class with this ratio in training.
URBANCARS_TRAIN_RATIO = 0.95

# Counts of one split ([G]) or of many ([..., G]): lists, nested lists or arrays.
Counts = Sequence[float] | Sequence[Sequence[float]] | np.ndarray


@dataclass(frozen=True)
class GroupStructure:
    """What the metrics need to know about a dataset's groups (see bench.core.dataset for the id layout)."""

    n_classes: int
    attr_cardinalities: tuple[int, ...]
    train_group_counts: tuple[int, ...]
    average_kind: str = "plain"
    extra_metrics: tuple[str, ...] = ()  # names of METRIC_SETS

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> GroupStructure:
        """From :meth:`bench.core.dataset.SpuriousDataset.info` (also stored in every run's config.json).

        Records written before datasets declared ``extra_metrics`` get the sets their average kind
        implies (:attr:`Average.metric_sets`)."""
        kind = info["average_kind"]
        implied = AVERAGES[kind].metric_sets if kind in AVERAGES else ()
        declared = tuple(info.get("extra_metrics") or ())
        return cls(
            n_classes=info["n_classes"],
            attr_cardinalities=tuple(len(v) for v in info["attr_value_names"]),
            train_group_counts=tuple(info["group_counts"]["train"]),
            average_kind=kind,
            extra_metrics=tuple(dict.fromkeys(declared + implied)),
        )

    def metric_specs(self) -> list[MetricSpec]:
        """Every metric of the declared metric sets, in order."""
        return [spec for name in self.extra_metrics for spec in METRIC_SETS[name].metrics]

    @property
    def n_groups(self) -> int:
        return self.n_classes * int(np.prod(self.attr_cardinalities, dtype=int))

    def class_of_group(self) -> np.ndarray:
        """``class_of_group()[g]`` is the class label of group ``g`` (the most significant digit)."""
        return np.arange(self.n_groups) // (self.n_groups // self.n_classes)


def _as_counts(correct: Counts, total: Counts) -> tuple[np.ndarray, np.ndarray]:
    correct_array = np.asarray(correct, dtype=float)
    total_array = np.asarray(total, dtype=float)
    if correct_array.shape != total_array.shape:
        raise ValueError(f"correct {correct_array.shape} and total {total_array.shape} differ in shape")
    if correct_array.ndim == 0:
        raise ValueError("counts need a group axis (one count per group)")
    if np.any(correct_array > total_array) or np.any(correct_array < 0):
        raise ValueError("each group needs 0 <= correct <= total")
    # Row-major, so that sums over the groups of a batch add in the same order as for one split.
    return np.ascontiguousarray(correct_array), np.ascontiguousarray(total_array)


def _per_split(values: np.ndarray) -> np.ndarray | float:
    """A reduction over the groups as returned: a float for one split, else the ``[...]`` array."""
    return float(values) if values.ndim == 0 else values


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, NaN where the denominator is 0 (nothing to measure), without warnings."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def _nanmin_groups(values: np.ndarray) -> np.ndarray:
    """Minimum over the last axis ignoring NaN; NaN where all are NaN (numpy's nanmin would warn)."""
    present = ~np.isnan(values)
    lowest = np.where(present, values, np.inf).min(axis=-1)
    return np.where(present.any(axis=-1), lowest, np.nan)


def _nanmean_groups(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN (numpy's nanmean: sum of the others / their number); NaN
    where all are NaN, without numpy's warning."""
    present = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, values, 0.0).sum(axis=-1) / present.sum(axis=-1)


def group_accuracies(correct: Counts, total: Counts) -> np.ndarray:
    """Accuracy of each group, ``[..., G]``; NaN for a group with no example."""
    correct_array, total_array = _as_counts(correct, total)
    return _ratio(correct_array, total_array)


def worst_group_accuracy(correct: Counts, total: Counts) -> np.ndarray | float:
    """Minimum accuracy over the groups that have at least one example.

    Raises ValueError if a split has no example at all (a caller error: nothing was evaluated).
    """
    accuracies = group_accuracies(correct, total)
    present = ~np.isnan(accuracies)
    if not np.all(present.any(axis=-1)):
        raise ValueError("no group has any example")
    return _per_split(np.where(present, accuracies, np.inf).min(axis=-1))


def plain_accuracy(correct: Counts, total: Counts) -> np.ndarray | float:
    """Fraction of all examples classified correctly (NaN for a split with no example)."""
    correct_array, total_array = _as_counts(correct, total)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _per_split(correct_array.sum(axis=-1) / total_array.sum(axis=-1))


def group_mean_accuracy(correct: Counts, total: Counts) -> np.ndarray | float:
    """Unweighted mean of the accuracies of the non-empty groups."""
    return _per_split(_nanmean_groups(group_accuracies(correct, total)))


def train_weighted_accuracy(correct: Counts, total: Counts, train_group_counts: Sequence[float]) -> np.ndarray | float:
    """Group accuracies weighted by the training group proportions (WILDS ``adj_acc_avg``).

    Groups with training examples but none in this split make the value undefined (NaN).
    """
    weights = np.asarray(train_group_counts, dtype=float)
    accuracies = group_accuracies(correct, total)
    used = weights > 0
    # Boolean indexing of the last axis may lay the result out column-major; summing rows of a
    # row-major array keeps numpy's summation order that of one split, so a batch equals its rows.
    used_accuracies = np.ascontiguousarray(accuracies[..., used])
    with np.errstate(invalid="ignore", divide="ignore"):
        weighted = np.sum(weights[used] * used_accuracies, axis=-1) / weights[used].sum()
    return _per_split(np.where(np.isnan(used_accuracies).any(axis=-1), np.nan, weighted))


def class_accuracies(correct: Counts, total: Counts, structure: GroupStructure) -> np.ndarray:
    """Accuracy of each class (pooled over its groups), ``[..., n_classes]``; NaN for a class with no example."""
    correct_array, total_array = _as_counts(correct, total)
    classes = structure.class_of_group()
    if correct_array.shape[-1] != len(classes):
        raise ValueError(f"{correct_array.shape[-1]} group counts for {len(classes)} groups")
    # Summing counts is exact in float64 (integers), so the matrix product pools them exactly.
    membership = (classes[:, None] == np.arange(structure.n_classes)[None, :]).astype(float)
    return _ratio(correct_array @ membership, total_array @ membership)


def predicts_one_class(correct: Counts, total: Counts, structure: GroupStructure) -> np.ndarray | bool:
    """Whether a model predicted (nearly) one class for every example of a split: that class's accuracy
    is at least 1 - :data:`ONE_CLASS_MARGIN` and every other class's at most the margin.

    Such a model has collapsed (e.g. a teacher that never learned): ``bench run`` and ``bench report`` warn
    about a model that does this in every evaluation. Unlike a balanced accuracy near 1 / n_classes, this
    does not flag a model that follows a shortcut on a split where the shortcut is independent of the
    class (which also scores 1 / n_classes there, with every class half right)."""
    accuracies = class_accuracies(correct, total, structure)
    high = accuracies >= 1.0 - ONE_CLASS_MARGIN
    low = accuracies <= ONE_CLASS_MARGIN
    one = (high.sum(axis=-1) == 1) & ((high | low).sum(axis=-1) == accuracies.shape[-1])
    return bool(one) if one.ndim == 0 else one


def worst_class_accuracy(correct: Counts, total: Counts, structure: GroupStructure) -> np.ndarray | float:
    """Minimum per-class accuracy; needs no attribute labels (used for label-free model selection)."""
    return _per_split(_nanmin_groups(class_accuracies(correct, total, structure)))


def urbancars_metrics(
    correct: Counts, total: Counts, ratio: float = URBANCARS_TRAIN_RATIO
) -> dict[str, np.ndarray | float]:
    """UrbanCars' metrics exactly as Whac-A-Mole defines them (urbancars_trainers/base_trainer.py).

    Groups are ``g = 4*obj + 2*bg + co``. A cue is "present" (aligned) when its value equals the
    object class. ``A(bg, co)`` is the unweighted mean over the two object classes of the accuracy
    on the cell with that alignment. I.D. Acc weights the four A's by the training ratios
    ``w(present) = ratio``, ``w(absent) = 1 - ratio``; each gap is an A minus I.D. Acc.
    """
    accuracies = group_accuracies(correct, total)
    if accuracies.shape[-1] != 8:
        raise ValueError(f"UrbanCars has 8 groups, got {accuracies.shape[-1]} counts")
    cells = accuracies.reshape(*accuracies.shape[:-1], 2, 2, 2)  # [..., obj, bg, co]

    def alignment_mean(bg_aligned: bool, co_aligned: bool) -> np.ndarray:
        per_object = []
        for obj in (0, 1):
            bg = obj if bg_aligned else 1 - obj
            co = obj if co_aligned else 1 - obj
            per_object.append(cells[..., obj, bg, co])
        return (per_object[0] + per_object[1]) / 2

    weight = {True: ratio, False: 1.0 - ratio}
    id_acc = sum(
        alignment_mean(bg, co) * weight[bg] * weight[co] for bg in (True, False) for co in (True, False)
    )
    return {
        "id_acc": _per_split(np.asarray(id_acc)),
        "bg_gap": _per_split(alignment_mean(False, True) - id_acc),
        "coobj_gap": _per_split(alignment_mean(True, False) - id_acc),
        "bg_coobj_gap": _per_split(alignment_mean(False, False) - id_acc),
    }


@dataclass(frozen=True)
class Average:
    """A kind of "average accuracy": its labels, how it is computed, and the metric sets it implies."""

    label: str
    short_label: str  # a table column's header
    compute: Callable[[Counts, Counts, GroupStructure], np.ndarray | float]
    # Metric sets every dataset with this average reports (declared in the dataset's extra_metrics too).
    metric_sets: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricSpec:
    """One declared metric: its key in ``summarize``'s result, its table label, and what is better."""

    key: str
    label: str
    better: str = "higher"  # or "closer_to_zero" (a gap)


@dataclass(frozen=True)
class MetricSet:
    """Metrics a dataset reports beside worst-group accuracy and its average, computed together."""

    title: str  # of the tables that show them
    metrics: tuple[MetricSpec, ...]
    compute: Callable[[Counts, Counts], dict[str, np.ndarray | float]]
    n_groups: int | None  # the group count the set is defined for (None: any)
    note: str  # one sentence for the tables that show them


AVERAGES: dict[str, Average] = {
    "plain": Average("average accuracy (plain, over examples)", "avg (plain)", lambda c, t, s: plain_accuracy(c, t)),
    "train_weighted": Average(
        "average accuracy (weighted by training group proportions)", "avg (train-weighted)",
        lambda c, t, s: train_weighted_accuracy(c, t, s.train_group_counts),
    ),
    "group_mean": Average("average accuracy (mean over groups)", "avg (group-mean)",
                          lambda c, t, s: group_mean_accuracy(c, t)),
    "urbancars_id": Average(
        "I.D. Acc (UrbanCars, weighted by training alignment ratios)", "I.D. Acc",
        lambda c, t, s: urbancars_metrics(c, t)["id_acc"],
        metric_sets=("urbancars",),
    ),
}
AVERAGE_LABELS = {kind: average.label for kind, average in AVERAGES.items()}

METRIC_SETS: dict[str, MetricSet] = {
    "urbancars": MetricSet(
        title="UrbanCars metrics",
        metrics=(
            MetricSpec("id_acc", "I.D. Acc"),
            MetricSpec("bg_gap", "BG Gap", "closer_to_zero"),
            MetricSpec("coobj_gap", "CoObj Gap", "closer_to_zero"),
            MetricSpec("bg_coobj_gap", "BG+CoObj Gap", "closer_to_zero"),
        ),
        compute=lambda c, t: urbancars_metrics(c, t),
        n_groups=8,
        note="UrbanCars (Whac-A-Mole): I.D. Acc weights the group accuracies by the training alignment ratios "
             "(0.95); each gap is the accuracy on the cue-conflicting cells minus I.D. Acc, closer to 0 is better.",
    ),
}


def metric_set_problem(names: Sequence[str], n_groups: int) -> str | None:
    """Why these metric set names cannot be declared by a dataset of ``n_groups`` groups (None: they can)."""
    for name in names:
        if name not in METRIC_SETS:
            return f"unknown metric set {name!r}; known: {', '.join(METRIC_SETS)}"
        needed = METRIC_SETS[name].n_groups
        if needed is not None and needed != n_groups:
            return f"metric set {name!r} needs {needed} groups, the dataset has {n_groups}"
    return None


def extra_metrics(correct: Counts, total: Counts, structure: GroupStructure) -> dict[str, np.ndarray | float]:
    """Every metric of the dataset's declared metric sets (``[...]`` arrays or floats, as the inputs)."""
    values: dict[str, np.ndarray | float] = {}
    for name in structure.extra_metrics:
        values.update(METRIC_SETS[name].compute(correct, total))
    return values


def average_accuracy(correct: Counts, total: Counts, structure: GroupStructure) -> np.ndarray | float:
    """The dataset's headline average accuracy, of the kind ``structure.average_kind``."""
    if structure.average_kind not in AVERAGES:
        raise ValueError(f"unknown average kind {structure.average_kind!r}")
    return AVERAGES[structure.average_kind].compute(correct, total, structure)


def summarize(correct: Counts, total: Counts, structure: GroupStructure) -> dict[str, Any]:
    """Every metric of one split, each named by what it is.

    For one split, ``group_accuracies`` is a list with None for an empty group (for JSON); for a
    batch ``[..., G]``, every value is an array and ``group_accuracies`` the ``[..., G]`` array (NaN).
    """
    accuracies = group_accuracies(correct, total)
    shown_accuracies: Any = accuracies
    if accuracies.ndim == 1:  # one split: JSON-ready, None for an empty group
        shown_accuracies = [None if np.isnan(a) else float(a) for a in accuracies]
    result: dict[str, Any] = {
        "worst_group_accuracy": worst_group_accuracy(correct, total),
        "average_accuracy": average_accuracy(correct, total, structure),
        "average_kind": structure.average_kind,
        "plain_accuracy": plain_accuracy(correct, total),
        "group_mean_accuracy": group_mean_accuracy(correct, total),
        "train_weighted_accuracy": train_weighted_accuracy(correct, total, structure.train_group_counts),
        "worst_class_accuracy": worst_class_accuracy(correct, total, structure),
        "group_accuracies": shown_accuracies,
    }
    result.update(extra_metrics(correct, total, structure))
    return result
