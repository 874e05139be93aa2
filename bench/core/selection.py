"""Model selection rules: which evaluation (epoch) of a run counts as its result.

Rules are applied to the records after training (and again at aggregation time), never baked into
training, so the same run can be reported under any rule:

* ``val-worst-group``: highest validation worst-group accuracy (needs validation group labels;
  the GroupDRO/JTT/DFR/Whac-A-Mole protocol). The default.
* ``val-avg``: highest validation average accuracy, of the dataset's kind.
* ``val-worst-class``: highest validation worst-class accuracy (needs no attribute labels at all).
* ``last``: the last evaluation.
* ``oracle-test``: highest *test* worst-group accuracy; an upper bound, only when asked, and marked.

Only evaluations of stages marked ``selectable`` are candidates (JTT's identification stage is
not). A NaN score (undefined, e.g. a train-weighted average with a trained group missing from the
split) counts as -inf. Ties go to the earliest evaluation.

:func:`rule_scores` (every evaluation's score under a rule, vectorised) and :func:`best_per_group`
(the pick) are the two halves of :func:`select`; ``bench report`` applies them to all runs at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.core.errors import ConfigError
from bench.core.metrics import Counts, GroupStructure, average_accuracy, worst_class_accuracy, worst_group_accuracy

DEFAULT_RULE = "val-worst-group"

_Score = Callable[[tuple[Counts, Counts], GroupStructure], np.ndarray | float]

RULES: dict[str, tuple[str, _Score | None]] = {
    "val-worst-group": ("best validation worst-group accuracy", lambda c, s: worst_group_accuracy(*c)),
    "val-avg": ("best validation average accuracy", lambda c, s: average_accuracy(*c, s)),
    "val-worst-class": (
        "best validation worst-class accuracy (no group labels)",
        lambda c, s: worst_class_accuracy(*c, s),
    ),
    "last": ("last epoch", None),
    "oracle-test": (
        "ORACLE: best test worst-group accuracy (not a valid protocol)",
        lambda c, s: worst_group_accuracy(*c),
    ),
}

# The split whose counts a rule's score is computed from (None: the rule has no score).
RULE_SPLITS: dict[str, str | None] = {
    "val-worst-group": "val",
    "val-avg": "val",
    "val-worst-class": "val",
    "last": None,
    "oracle-test": "test",
}


def describe(rule: str) -> str:
    check_rule(rule)
    return RULES[rule][0]


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ConfigError(f"unknown selection rule {rule!r}; choose one of: {', '.join(RULES)}")


def rule_scores(correct: Counts, total: Counts, structure: GroupStructure, rule: str) -> np.ndarray | float:
    """The score ``rule`` ranks evaluations by, from counts of the split ``RULE_SPLITS[rule]``.

    Vectorised like :mod:`bench.core.metrics`: counts ``[..., G]`` (e.g. one row per evaluation) give
    scores ``[...]``, a float for one evaluation. Higher is better; NaN means undefined (see
    :func:`best_per_group`). ValueError for a rule without a score (``last``).
    """
    check_rule(rule)
    _, score = RULES[rule]
    if score is None:
        raise ValueError(f"rule {rule!r} has no score: it picks the last selectable evaluation")
    return score((correct, total), structure)


def best_per_group(scores: npt.ArrayLike, groups: npt.ArrayLike) -> np.ndarray:
    """For each group of rows (equal ``groups`` values), the index of its best row: the highest
    score, where NaN counts as -inf, ties going to the earliest row. One index per group, in
    increasing order of group value."""
    ranking = np.asarray(scores, dtype=float)
    group_of_row = np.asarray(groups)
    if ranking.shape != group_of_row.shape or ranking.ndim != 1:
        raise ValueError(f"scores {ranking.shape} and groups {group_of_row.shape} must be one value per row")
    ranking = np.where(np.isnan(ranking), -np.inf, ranking)
    # lexsort sorts by the last key first (group, then highest score) and is stable: ties keep row order.
    order = np.lexsort((-ranking, group_of_row))
    sorted_groups = group_of_row[order]
    first_of_group = np.ones(len(order), dtype=bool)
    first_of_group[1:] = sorted_groups[1:] != sorted_groups[:-1]
    return order[first_of_group]


def select(records: Sequence[dict[str, Any]], predictor: str, structure: GroupStructure, rule: str) -> int:
    """Index (into ``records``) of the evaluation the rule picks for ``predictor``."""
    check_rule(rule)
    candidates = [i for i, r in enumerate(records) if r.get("selectable", True) and predictor in r.get("eval", {})]
    if not candidates:
        raise ValueError(f"no selectable evaluation of {predictor!r} in the records")
    split = RULE_SPLITS[rule]
    if split is None:
        return candidates[-1]
    counts = [records[i]["eval"][predictor][split] for i in candidates]
    scores = rule_scores([c["correct"] for c in counts], [c["total"] for c in counts], structure, rule)
    best = best_per_group(scores, np.zeros(len(candidates), dtype=int))  # one group: this run's candidates
    return candidates[int(best[0])]
