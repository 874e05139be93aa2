"""``bench run``'s tables: the seeds it just finished, aggregated by :func:`.aggregate.aggregate`.

One row per seed and model (a multi-model method's second model is a second row, not more columns),
then a ``mean ± std (n=…)`` row per model, taken from the same cells ``bench report`` prints, so the
two commands cannot disagree. A dataset's declared metric sets (UrbanCars' gaps) get a small table of
their own. Everything fits a 100-column terminal.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np

from bench.core.metrics import AVERAGES, METRIC_SETS, ONE_CLASS_MARGIN
from bench.core.selection import describe
from bench.display import TERMINAL_WIDTH, display_path
from bench.report.aggregate import Leaderboard
from bench.report.tables import MISSING, format_mean_std


def _percent(value: float) -> str:
    return MISSING if value is None or np.isnan(value) else f"{100 * value:.1f}"


def _cell_text(board: Leaderboard, dataset: str, row: str, metric: str) -> str:
    found = board.cells[(board.cells["dataset"] == dataset) & (board.cells["row"] == row)
                        & (board.cells["metric"] == metric)]
    if found.empty:
        return MISSING
    cell = found.iloc[0]
    main, _ = format_mean_std(cell["mean"], cell["std"], int(cell["n"]))
    return main


def run_tables(board: Leaderboard) -> str:
    """The tables and notes ``bench run`` prints for its seeds (one dataset, one method)."""
    from tabulate import tabulate

    dataset = board.datasets[0]
    rows = board.rows.to_dict("records")
    multi = len(rows) > 1
    kind = board.average_kind(dataset)
    average_label = AVERAGES[kind].short_label
    headers = ["seed"] + (["model"] if multi else []) + ["worst-group", average_label, "epoch"]
    table: list[list[Any]] = []
    per_seed = board.per_seed
    for seed in sorted(per_seed["seed"].unique()):
        for row in rows:
            picked = per_seed[(per_seed["seed"] == seed) & (per_seed["row"] == row["row"])]
            if picked.empty:
                continue
            chosen = picked.iloc[0]
            table.append([seed] + ([row["predictor"]] if multi else [])
                         + [_percent(chosen["test_worst_group"]), _percent(chosen["test_average"]),
                            f"{chosen['stage']}:{chosen['epoch']}"])
    n = int(per_seed["seed"].nunique())
    for row in rows:
        table.append([f"mean ± std (n={n})"] + ([row["predictor"]] if multi else [])
                     + [_cell_text(board, dataset, row["row"], "worst_group_accuracy"),
                        _cell_text(board, dataset, row["row"], "average_accuracy"), ""])
    parts = [tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)]
    for name in board.metric_sets(dataset):
        metric_set = METRIC_SETS[name]
        extra_headers = (["model"] if multi else [""]) + [spec.label for spec in metric_set.metrics]
        extra_rows = [[row["predictor"] if multi else f"mean ± std (n={n})"]
                      + [_cell_text(board, dataset, row["row"], spec.key) for spec in metric_set.metrics]
                      for row in rows]
        parts += ["", f"{metric_set.title} (test, %, mean ± std over seeds)",
                  tabulate(extra_rows, headers=extra_headers, tablefmt="github", disable_numparse=True),
                  textwrap.fill(metric_set.note, TERMINAL_WIDTH)]
    primary = next(row["predictor"] for row in rows if row["is_primary"])
    notes = (f"Test accuracy in %, at the epoch picked by {board.rule} ({describe(board.rule)}); std is the sample "
             f"std over seeds. {average_label} = {AVERAGES[kind].label}."
             + (f" The method's result is the {primary}; the other model is recorded beside it." if multi else ""))
    parts += ["", textwrap.fill(notes, TERMINAL_WIDTH)]
    for method, caveat in sorted(board.caveats.items()):
        parts.append(textwrap.fill(f"Note on {method}: {caveat}", TERMINAL_WIDTH))
    for found in board.collapsed.itertuples():
        parts.append(textwrap.fill(
            f"warning: seed {found.seed}'s {found.predictor} collapsed: it predicted the same class for (nearly) "
            f"every validation example in every epoch (each class's accuracy within {round(100 * ONE_CLASS_MARGIN)} "
            f"points of 0 or 100%); its numbers are averaged above ({display_path(found.path)})", TERMINAL_WIDTH))
    return "\n".join(parts)

