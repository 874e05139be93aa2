"""The metrics of every evaluation: bench.core.metrics and bench.core.selection.rule_scores on all rows at once.

An evaluation is one (run, metrics line, predictor). Its columns: the score of every selection rule
(:data:`EPOCH_SCORE`) and the test metrics the tables show: worst-group accuracy, the dataset's
average, worst-class accuracy and every metric of the dataset's declared metric sets
(``test_<key>``, e.g. UrbanCars' ``test_bg_gap``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from bench.core import metrics
from bench.core.metrics import GroupStructure, MetricSpec
from bench.core.selection import RULE_SPLITS, RULES, rule_scores

# The column of the evaluation table that holds each rule's score (computed by
# bench.core.selection.rule_scores from the rule's split); None: the rule has no score and picks the last
# selectable evaluation.
EPOCH_SCORE: dict[str, str | None] = {
    "val-worst-group": "val_worst_group",
    "val-avg": "val_average",
    "val-worst-class": "val_worst_class",
    "last": None,
    "oracle-test": "test_worst_group",
}

# The test metrics every dataset has: column of the evaluation table -> metric name in the tables.
HEADLINE_METRICS: dict[str, str] = {
    "test_worst_group": "worst_group_accuracy",
    "test_average": "average_accuracy",
}
BASE_COLUMNS = ["run", "position", "predictor", "stage", "epoch", "selectable", "dataset", "ga_row",
                "val_worst_group", "val_average", "val_worst_class", "val_one_class", "test_worst_group",
                "test_average", "test_worst_class"]


def metric_column(spec: MetricSpec) -> str:
    """The evaluation table's column of a declared metric."""
    return f"test_{spec.key}"


def evaluation_columns(structures: Iterable[GroupStructure]) -> list[str]:
    """The evaluation table's columns for datasets of these structures (declared metrics last, in order)."""
    declared = [metric_column(spec) for structure in structures for spec in structure.metric_specs()]
    return BASE_COLUMNS + list(dict.fromkeys(declared))


def split_columns(split: str, correct: np.ndarray, total: np.ndarray, structure: GroupStructure) -> dict[str, Any]:
    """The evaluation table's columns of one split (``val`` or ``test``), one value per row of ``[N, G]`` counts.

    The score of every rule that scores this split (its :data:`EPOCH_SCORE` column, by
    :func:`bench.core.selection.rule_scores`) and, for the test split, the metrics the tables show. A row
    whose split has no example at all gets NaN everywhere (bench.core.metrics refuses to define its
    worst-group accuracy; the trainer never finishes such a run, so only hand-made records have one).
    """
    # One row-major copy here spares one in each of the bench.core.metrics calls below.
    correct, total = np.ascontiguousarray(correct), np.ascontiguousarray(total)
    has_examples = total.sum(axis=1) > 0
    if not has_examples.all():
        inner = split_columns(split, correct[has_examples], total[has_examples], structure)
        columns = {}
        for name, values in inner.items():
            columns[name] = np.full(len(total), np.nan)
            columns[name][has_examples] = values
        return columns
    columns = {EPOCH_SCORE[rule]: rule_scores(correct, total, structure, rule)
               for rule in RULES if RULE_SPLITS[rule] == split}
    if split == "val":
        columns["val_one_class"] = np.asarray(metrics.predicts_one_class(correct, total, structure), dtype=float)
    if split == "test":
        columns["test_average"] = metrics.average_accuracy(correct, total, structure)
        columns["test_worst_class"] = metrics.worst_class_accuracy(correct, total, structure)
        declared = metrics.extra_metrics(correct, total, structure)
        columns.update({metric_column(spec): declared[spec.key] for spec in structure.metric_specs()})
    return columns
