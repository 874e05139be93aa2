"""What the report shows: its tables as cells (value, suffix, bold), independent of the format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bench.core.metrics import AVERAGE_LABELS, METRIC_SETS, ONE_CLASS_MARGIN
from bench.core.selection import describe
from bench.display import CAVEAT_MARK, display_path
from bench.report.aggregate import CONFIG_SCORE, REFERENCE_METHOD, Leaderboard

ORACLE_MARK = "ORACLE (model selected on the test set; an upper bound, not a valid result)"
UNAVAILABLE = "n/a"
MISSING = "–"


@dataclass
class Cell:
    """One table cell: ``main`` (bold when best) then ``suffix``; ``±`` is rendered per format."""

    main: str
    suffix: str = ""
    bold: bool = False


@dataclass
class Table:
    """A table as cells; ``keys``: how many leading columns label a row (repeated when a renderer
    splits a wide table into narrower ones); ``notes`` are one paragraph, ``footnotes`` one each."""

    key: str
    title: str
    header: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    keys: int = 1
    footnotes: list[str] = field(default_factory=list)  # one paragraph each (e.g. a source's reference)


def _kind_name(kind: str) -> str:
    return kind.replace("_", "-")


def format_mean_std(mean: float, std: float, n: int) -> tuple[str, str]:
    if np.isnan(mean):
        return UNAVAILABLE, f"(n={n})"
    if n < 2 or np.isnan(std):
        return f"{mean:.1f}", f"(n={n})"
    return f"{mean:.1f} ± {std:.1f}", f"(n={n})"


def format_p_value(p: float) -> str:
    if np.isnan(p):
        return UNAVAILABLE
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _cell_lookup(cells: pd.DataFrame, metric: str) -> dict[tuple[str, str], pd.Series]:
    subset = cells[cells["metric"] == metric]
    return {(r.dataset, r.row): r for r in subset.itertuples(index=False)}


def _metric_table(board: Leaderboard, key: str, metric: str, title: str, datasets: list[str],
                  header: list[str], notes: list[str]) -> Table:
    lookup = _cell_lookup(board.cells, metric)
    rows = []
    for row in board.rows.itertuples(index=False):
        line = [row_cell(board, row)]
        for dataset in datasets:
            found = lookup.get((dataset, row.row))
            if found is None:
                line.append(Cell(MISSING))
                continue
            main, suffix = format_mean_std(found.mean, found.std, found.n)
            line.append(Cell(main, suffix, bool(found.best)))
        rows.append(line)
    return Table(key, title, ["method"] + header, rows, notes)


def selection_lines(board: Leaderboard) -> list[str]:
    _, config_score_text = CONFIG_SCORE[board.rule]
    lines = [
        f"Model selection `{board.rule}`: {describe(board.rule)} within each run (per predictor); for each method "
        f"and dataset, the hyperparameter configuration with the highest mean over seeds of {config_score_text} "
        "at those epochs (ties: more seeds, then the smaller config hash).",
    ]
    if board.oracle:
        lines.insert(0, f"**{ORACLE_MARK}.**")
    return lines


def _title(board: Leaderboard, text: str) -> str:
    return f"{text} [ORACLE test selection]" if board.oracle else text


def build_tables(board: Leaderboard) -> list[Table]:
    """The report's tables, in order: worst-group, average, each dataset's declared metric sets (e.g.
    UrbanCars'), vs ERM, configurations."""
    common = "Test accuracy in %, mean ± sample std (ddof=1) over seeds, n = number of seeds."
    secondary = board.rows["is_primary"].eq(False).any()
    best_note = "Bold: best method per dataset (at the precision shown; ties all bold)" + (
        "; rows `method (predictor)` are a multi-model method's secondary model, shown for information, "
        "never marked best." if secondary else ".")
    tables = [
        _metric_table(board, "worst_group", "worst_group_accuracy", _title(board, "Worst-group accuracy (test, %)"),
                      board.datasets, board.datasets, [common, best_note, *caveat_notes(board)]),
    ]
    kinds = sorted({board.average_kind(d) for d in board.datasets})
    tables.append(_metric_table(
        board, "average", "average_accuracy", _title(board, "Average accuracy (test, %)"), board.datasets,
        [f"{d} ({_kind_name(board.average_kind(d))})" for d in board.datasets],
        [common, "Each dataset reports its own kind of average (in brackets): "
         + "; ".join(f"{_kind_name(k)} = {AVERAGE_LABELS[k]}" for k in kinds) + ".", best_note],
    ))
    for dataset in board.datasets:
        for name in board.metric_sets(dataset):
            tables.append(_metric_set_table(board, dataset, name, common))
    tables.append(_versus_erm_table(board))
    tables.append(_configs_table(board))
    chosen = _chosen_values_table(board)
    if chosen.rows:
        tables.append(chosen)
    return tables


def row_cell(board: Leaderboard, row: Any) -> Cell:
    """A table's first cell: the row's label, marked when its method carries a caveat."""
    return Cell(f"{row.row} {CAVEAT_MARK}" if board.caveats.get(row.method) else row.row)


def caveat_notes(board: Leaderboard) -> list[str]:
    return [f"{CAVEAT_MARK} {method}: {caveat}" for method, caveat in sorted(board.caveats.items())]


def _metric_set_table(board: Leaderboard, dataset: str, name: str, common: str) -> Table:
    """One row per method run on ``dataset``, one column per metric of the set ``name``."""
    metric_set = METRIC_SETS[name]
    lookups = [_cell_lookup(board.cells, spec.key) for spec in metric_set.metrics]
    rows = []
    for row in board.rows.itertuples(index=False):
        if not any((dataset, row.row) in lookup for lookup in lookups):
            continue  # not run on this dataset
        line = [row_cell(board, row)]
        for lookup in lookups:
            found = lookup.get((dataset, row.row))
            if found is None:
                line.append(Cell(MISSING))
            else:
                main, suffix = format_mean_std(found.mean, found.std, found.n)
                line.append(Cell(main, suffix, bool(found.best)))
        rows.append(line)
    bold = "; ".join(f"{spec.label}: {'closest to 0' if spec.better == 'closer_to_zero' else 'highest'}"
                     for spec in metric_set.metrics)
    return Table(f"{name}_{dataset}", _title(board, f"{dataset}: {metric_set.title} (test, %)"),
                 ["method"] + [spec.label for spec in metric_set.metrics], rows,
                 [common, metric_set.note, f"Bold: the best of each column ({bold})."])


def _versus_erm_table(board: Leaderboard) -> Table:
    lookup = _cell_lookup(board.cells, "worst_group_accuracy")
    has_reference = {d for (d, row) in lookup if row == REFERENCE_METHOD}
    rows = []
    for row in board.rows.itertuples(index=False):
        line = [row_cell(board, row)]
        for dataset in board.datasets:
            found = lookup.get((dataset, row.row))
            if found is None:
                line.append(Cell(MISSING))
            elif row.row == REFERENCE_METHOD:
                line.append(Cell("reference"))
            elif dataset not in has_reference:
                line.append(Cell(UNAVAILABLE, "(no ERM)"))
            else:
                diff = f"{found.diff_vs_erm:+.1f}" if not np.isnan(found.diff_vs_erm) else UNAVAILABLE
                line.append(Cell(diff, f"(p={format_p_value(found.p_vs_erm)})"))
        rows.append(line)
    return Table("vs_erm", _title(board, "Worst-group accuracy vs ERM (test, points; Welch's t-test)"),
                 ["method"] + board.datasets, rows,
                 ["Difference of the mean worst-group accuracy from ERM's, in percentage points, and the two-sided "
                  "p-value of Welch's t-test (scipy.stats.ttest_ind, equal_var=False) over seeds; n/a with fewer "
                  "than 2 seeds on either side or no spread at all."])


def _configs_table(board: Leaderboard) -> Table:
    _, score_text = CONFIG_SCORE[board.rule]
    rows = []
    for config in board.configs.itertuples(index=False):
        score = UNAVAILABLE if np.isnan(config.score) else f"{100 * config.score:.1f}"
        rows.append([Cell(config.dataset), Cell(config.method), Cell(config.config_hash), Cell(str(config.n_seeds)),
                     Cell(str(config.n_configs)), Cell(score)])
    return Table("configs", _title(board, "Selected configurations"),
                 ["dataset", "method", "config", "seeds", "configs compared", "score (%)"], rows,
                 [f"score: mean over seeds of {score_text} at the selected epochs (primary predictor)."], keys=2)


def _chosen_values_table(board: Leaderboard) -> Table:
    """One row per hparam whose value differs between the configurations compared, with the chosen value."""
    rows = [[Cell(config.dataset), Cell(config.method), Cell(name), Cell(str(value))]
            for config in board.configs.itertuples(index=False) for name, value in config.varying_values.items()]
    return Table("chosen_values", _title(board, "Chosen values of the hparams that differ between configurations"),
                 ["dataset", "method", "hparam", "chosen value"], rows,
                 ["Only the hparams whose values differ between the configurations of a (method, dataset)."],
                 keys=2)


def header_lines(board: Leaderboard) -> list[str]:
    c = board.counts
    skipped = ", ".join(f"{c[state]} {state}" for state in ("failed", "unfinished", "corrupt", "duplicate")
                        if c[state])
    lines = [f"Results: `{display_path(board.root)}`: {c['found']} run folders, {c['used']} finished runs used"
             + (f"; skipped {skipped}." if skipped else ".")]
    warning = collapsed_warning(board)
    return lines + ([f"**{warning}**"] if warning else [])


COLLAPSED_LISTED = 5


def collapsed_warning(board: Leaderboard) -> str:
    """One sentence naming the models that collapsed to one class in every evaluation ("" when none did)."""
    found = board.collapsed
    if found.empty:
        return ""
    named = [f"{display_path(row.path)} ({row.row})" for row in found.head(COLLAPSED_LISTED).itertuples()]
    more = f" and {len(found) - COLLAPSED_LISTED} more" if len(found) > COLLAPSED_LISTED else ""
    margin = round(100 * ONE_CLASS_MARGIN)
    return (f"Warning: {len(found)} model(s) collapsed, predicting the same class for (nearly) every validation "
            f"example in every evaluation (each class's accuracy within {margin} points of 0 or 100%), and are "
            "averaged into the tables: "
            + ", ".join(named) + more + ".")


