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
not). Ties go to the earliest evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench.errors import ConfigError
from bench.metrics import GroupStructure, average_accuracy, worst_class_accuracy, worst_group_accuracy

DEFAULT_RULE = "val-worst-group"

_Score = Callable[[dict[str, Any], GroupStructure], float]


def _counts(record: dict[str, Any], predictor: str, split: str) -> tuple[list[float], list[float]]:
    counts = record["eval"][predictor][split]
    return counts["correct"], counts["total"]


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


def describe(rule: str) -> str:
    check_rule(rule)
    return RULES[rule][0]


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ConfigError(f"unknown selection rule {rule!r}; choose one of: {', '.join(RULES)}")


def select(records: Sequence[dict[str, Any]], predictor: str, structure: GroupStructure, rule: str) -> int:
    """Index (into ``records``) of the evaluation the rule picks for ``predictor``."""
    check_rule(rule)
    candidates = [i for i, r in enumerate(records) if r.get("selectable", True) and predictor in r.get("eval", {})]
    if not candidates:
        raise ValueError(f"no selectable evaluation of {predictor!r} in the records")
    _, score = RULES[rule]
    if score is None:
        return candidates[-1]
    split = "test" if rule == "oracle-test" else "val"
    scores = []
    for i in candidates:
        value = score(_counts(records[i], predictor, split), structure)
        scores.append(-np.inf if np.isnan(value) else value)
    return candidates[int(np.argmax(scores))]
