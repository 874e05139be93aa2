"""``bench report --published``: our cells beside the published numbers (bench.report.published).

Each primary row of a real dataset is paired with every published number of its (method, dataset,
metric); the difference ``ours - published`` is given only when the two measure the same thing
under the same protocol. Otherwise the cell says why not (:data:`NOT_COMPARED`): a synthetic twin
(never compared with a paper: papers report real images), an "up to" bound, a source that does not
name the dataset, another kind of average, another selection rule or backbone, an oracle
selection. A comparison the source leaves partly unstated (its backbone or its selection rule) is
given, marked ``‡``.

A dataset is a synthetic twin when its records say so (``dataset_info["synthetic"]``: the twin's
name, also for a twin exported in a real dataset's layout; None for real data) or, in records
written before that field existed, when its name ends with ``-synth``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.core.metrics import METRIC_SETS
from bench.report.aggregate import REFERENCE_METHOD, Leaderboard
from bench.report.published import GAIN_METRIC, Published, PublishedNumber
from bench.report.tables import MISSING, UNAVAILABLE, Cell, Table, format_mean_std

CAVEAT = "‡"  # not "†", which marks a method's own caveat in the report's tables
# status -> (cell text, explanation); the explanation is printed under a table where the status occurs.
NOT_COMPARED = {
    "twin": ("n/c: twin", "a synthetic twin; the literature reports the real dataset, so no published number is "
                          "shown for it"),
    "none": (MISSING, "no published number recorded for this method and dataset"),
    "up_to": ("n/c: up to", "the source gives a maximum over its settings ('up to'), not a result"),
    "dataset": ("n/c: dataset", "the source does not say which dataset (here: which Spawrious challenge)"),
    "average": ("n/c: average", "the source reports another kind of average"),
    "selection": ("n/c: selection", "the source selected models by another rule than this report"),
    "backbone": ("n/c: backbone", "the source trained another backbone"),
    "oracle": ("n/c: oracle", "this report selects on the test set (oracle): never compared"),
    "no_erm": ("n/c: no ERM", "a gain needs our ERM runs on the dataset"),
    "ours_nan": ("n/c: n/a", "our value is not defined"),
}
LABELS = {
    "worst_group_accuracy": "worst-group accuracy",
    "average_accuracy": "average accuracy",
    **{spec.key: f"UrbanCars {spec.label}" for spec in METRIC_SETS["urbancars"].metrics},
    GAIN_METRIC: "worst-group gain over the baseline (ours: over ERM)",
}


@dataclass(frozen=True)
class Comparison:
    """One of our cells beside one published number (or beside none, with the reason)."""

    metric: str
    dataset: str
    row: str
    method: str
    ours_mean: float
    ours_std: float
    ours_n: int
    published: PublishedNumber | None
    diff: float | None  # ours - published, only when comparable
    status: str  # "" when compared, else a key of NOT_COMPARED
    caveats: tuple[str, ...] = ()


def twin_of(dataset: str, info: dict) -> str | None:
    """The synthetic twin a dataset's records come from, or None for real data (see the module doc)."""
    if "synthetic" in info:
        return info["synthetic"] or None
    return dataset if dataset.endswith("-synth") else None


def _base_name(label: str) -> str:
    return label.split(" [")[0]  # "custom [2]": two datasets of one name (bench.report.load)


def _our_backbone(board: Leaderboard, dataset: str, method: str) -> str:
    chosen = board.configs[(board.configs["dataset"] == dataset) & (board.configs["method"] == method)]
    return str(chosen.iloc[0]["hparams"].get("backbone", "")) if len(chosen) else ""


def _judge(board: Leaderboard, dataset: str, method: str, number: PublishedNumber, ours: float
           ) -> tuple[str, tuple[str, ...]]:
    if board.oracle:
        return "oracle", ()
    if number.bound == "up_to":
        return "up_to", ()
    if not number.names_dataset:
        return "dataset", ()
    if number.metric == "average_accuracy" and number.average_kind != board.average_kind(dataset):
        return "average", ()
    if number.selection and number.selection != board.rule:
        return "selection", ()
    backbone = _our_backbone(board, dataset, method)
    if number.backbone and backbone and number.backbone != backbone:
        return "backbone", ()
    if np.isnan(ours):  # a gain is ours over ERM: NaN without ERM runs
        return ("no_erm" if number.metric == GAIN_METRIC else "ours_nan"), ()
    caveats = tuple(f"the source does not state its {what}" for what, given in
                    (("selection rule", number.selection), ("backbone", number.backbone)) if not given)
    if number.metric == GAIN_METRIC:
        caveats += ("the source's baseline method is not named; ours is ERM",)
    return "", caveats


def compare(board: Leaderboard, published: Published) -> list[Comparison]:
    """Every primary cell of the worst-group table, and of the other metrics that have published numbers
    for the dataset, beside each published number that applies (rows in the board's order)."""
    comparisons: list[Comparison] = []
    cells = board.cells.set_index(["metric", "dataset", "row"])
    primary = board.rows[board.rows["is_primary"]]
    for dataset in board.datasets:
        name = _base_name(dataset)
        twin = twin_of(name, board.dataset_info[dataset]["info"])
        metrics = ["worst_group_accuracy"]
        if twin is None:
            metrics += [m for m in LABELS if m != "worst_group_accuracy"
                        and any(n.metric == m and n.covers(name) for n in published.numbers)]
        for metric in metrics:
            cell_metric = "worst_group_accuracy" if metric == GAIN_METRIC else metric
            for row in primary.itertuples(index=False):
                key = (cell_metric, dataset, row.row)
                if key not in cells.index:
                    continue
                cell = cells.loc[key]
                if metric == GAIN_METRIC:
                    ours, std, n = float(cell["diff_vs_erm"]), float("nan"), int(cell["n"])
                else:
                    ours, std, n = float(cell["mean"]), float(cell["std"]), int(cell["n"])
                base = dict(metric=metric, dataset=dataset, row=row.row, method=row.method, ours_mean=ours,
                            ours_std=std, ours_n=n)
                if twin is not None:
                    comparisons.append(Comparison(**base, published=None, diff=None, status="twin"))
                    continue
                numbers = published.lookup(row.method, name, metric)
                if not numbers:
                    if metric != GAIN_METRIC:
                        comparisons.append(Comparison(**base, published=None, diff=None, status="none"))
                    continue
                for number in numbers:
                    if metric == GAIN_METRIC and row.method == REFERENCE_METHOD:
                        continue
                    status, caveats = _judge(board, dataset, row.method, number, ours)
                    diff = ours - number.value if not status else None
                    comparisons.append(Comparison(**base, published=number, diff=diff, status=status,
                                                  caveats=caveats if not status else ()))
    return comparisons


def _published_text(number: PublishedNumber | None) -> str:
    if number is None:
        return MISSING
    text = number.shown
    if number.metric == GAIN_METRIC and not text.startswith("-"):
        text = "+" + text
    return f"up to {text}" if number.bound == "up_to" else text


def _ours_text(comparison: Comparison) -> str:
    if comparison.metric == GAIN_METRIC:
        return UNAVAILABLE if np.isnan(comparison.ours_mean) else f"{comparison.ours_mean:+.1f}"
    main, _ = format_mean_std(comparison.ours_mean, comparison.ours_std, comparison.ours_n)
    return main


def _diff_text(comparison: Comparison) -> str:
    if comparison.status:
        return NOT_COMPARED[comparison.status][0]
    assert comparison.diff is not None
    return f"{comparison.diff:+.1f}" + (CAVEAT if comparison.caveats else "")


def source_notes(published: Published, keys: list[str]) -> list[str]:
    """The footnote: one sentence per source used, its reference and where it was read."""
    return [f"[{key}] {published.sources[key].reference} Read at: {published.sources[key].location}."
            for key in keys]


def published_tables(board: Leaderboard, published: Published) -> list[Table]:
    """One table per metric: method, dataset, ours, published, ours - published, source; the last table's
    footnotes list the sources."""
    comparisons = compare(board, published)
    tables: list[Table] = []
    for metric in LABELS:
        chosen = [c for c in comparisons if c.metric == metric]
        if not chosen:
            continue
        rows = [[Cell(c.row), Cell(c.dataset), Cell(_ours_text(c)), Cell(_published_text(c.published)),
                 Cell(_diff_text(c)), Cell(c.published.source if c.published else "")] for c in chosen]
        notes = ["Ours: the report's cell (test, mean ± sample std over seeds, model selection "
                 f"{board.rule}); published: as the source prints it; ours - published in points, only where "
                 "both measure the same thing under the same protocol."]
        notes += [f"{NOT_COMPARED[s][0]}: {NOT_COMPARED[s][1]}." for s in dict.fromkeys(c.status for c in chosen)
                  if s]
        caveats = sorted({caveat for c in chosen for caveat in c.caveats})
        if caveats:
            notes.append(f"{CAVEAT}: compared, but " + "; ".join(caveats) + ".")
        unit = "points" if metric == GAIN_METRIC else "%"
        tables.append(Table(f"published_{metric}", f"Published and ours: {LABELS[metric]} (test, {unit})",
                            ["method", "dataset", "ours", "published", "ours - published", "source"], rows, notes))
    keys = list(dict.fromkeys(c.published.source for c in comparisons if c.published))
    if tables and keys:
        tables[-1].footnotes += ["Sources of the published numbers:", *source_notes(published, keys)]
    return tables


def comparison_frame(board: Leaderboard, published: Published) -> pd.DataFrame:
    """The comparisons as CSV columns, keyed by (metric, dataset, row) like the tidy leaderboard."""
    records = []
    for c in compare(board, published):
        number = c.published
        records.append({
            "metric": c.metric, "dataset": c.dataset, "row": c.row, "method": c.method,
            "ours_pct": round(c.ours_mean, 4) if not np.isnan(c.ours_mean) else np.nan,
            "published_pct": number.value if number else np.nan,
            "published_std_pct": number.std if number and number.std is not None else np.nan,
            "published_bound": number.bound if number else "",
            "published_source": number.source if number else "",
            "published_reference": (f"{published.sources[number.source].reference} Read at: "
                                    f"{published.sources[number.source].location}") if number else "",
            "published_diff_pct": round(c.diff, 4) if c.diff is not None else np.nan,
            "published_comparison": ("compared" + (" (" + "; ".join(c.caveats) + ")" if c.caveats else "")
                                     if not c.status else "not compared: " + NOT_COMPARED[c.status][1]),
        })
    return pd.DataFrame(records)
