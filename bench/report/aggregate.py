"""The one aggregator: model selection over the evaluation table, then summaries over seeds.

:func:`aggregate` applies a selection rule. Within each run the rule picks an epoch per predictor
(:func:`bench.core.selection.select`'s choice, made for all runs at once with
:func:`bench.core.selection.best_per_group`); then, for each (method, dataset), the hyperparameter
configuration whose primary predictor has the best mean over seeds of the rule's score at the picked
epochs (see :data:`CONFIG_SCORE`); then mean, sample std (ddof=1) and n over the seeds of that
configuration, the best method per column, and Welch's t-test against ERM on worst-group accuracy.
``bench report`` and ``bench run``'s table both come from here, so they cannot disagree.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bench.core.errors import BenchError
from bench.core.metrics import METRIC_SETS, MetricSpec
from bench.core.selection import DEFAULT_RULE, best_per_group, check_rule
from bench.report.evaluations import EPOCH_SCORE, HEADLINE_METRICS, metric_column
from bench.report.load import Results, RunIssue

# Which score, averaged over the seeds of a configuration at the epochs the rule picked, picks the
# configuration of each (method, dataset). ``last`` has no score of its own; it uses validation
# worst-group accuracy (at the last epoch), the criterion of the default protocol.
CONFIG_SCORE: dict[str, tuple[str, str]] = {
    "val-worst-group": ("val_worst_group", "validation worst-group accuracy"),
    "val-avg": ("val_average", "validation average accuracy"),
    "val-worst-class": ("val_worst_class", "validation worst-class accuracy"),
    "last": ("val_worst_group", "validation worst-group accuracy (at the last epoch)"),
    "oracle-test": ("test_worst_group", "TEST worst-group accuracy"),
}

ORACLE_RULE = "oracle-test"
REFERENCE_METHOD = "erm"


def select_evaluations(evaluations: pd.DataFrame, rule: str) -> pd.DataFrame:
    """The evaluation the rule picks for each (run, predictor): one row each.

    :func:`bench.core.selection.select` for all runs at once, with the same two steps: the rule's score
    (its :data:`EPOCH_SCORE` column, computed by :func:`bench.core.selection.rule_scores`) and the pick
    (:func:`bench.core.selection.best_per_group`: NaN counts as -inf, ties go to the earliest evaluation)
    among the selectable evaluations; a rule without a score picks the last of them.
    """
    check_rule(rule)
    candidates = np.flatnonzero(evaluations["selectable"].to_numpy(dtype=bool))
    predictor_codes, predictor_names = pd.factorize(evaluations["predictor"].to_numpy()[candidates])
    groups = evaluations["run"].to_numpy(dtype=np.int64)[candidates] * max(len(predictor_names), 1) + predictor_codes
    column = EPOCH_SCORE[rule]
    # Within a (run, predictor), positions increase with the evaluation: the last one has the highest.
    scores = evaluations["position" if column is None else column].to_numpy(dtype=float)[candidates]
    picked = candidates[best_per_group(scores, groups)]
    return evaluations.iloc[np.sort(picked)]


def select_configs(selected: pd.DataFrame, runs: pd.DataFrame, rule: str) -> pd.DataFrame:
    """For each (dataset, method): the configuration with the best mean over seeds of the rule's
    configuration score (:data:`CONFIG_SCORE`) of the primary predictor at the picked epochs.

    Ties go to the configuration with more finished seeds, then to the smaller config hash.
    Columns: dataset, method, config_hash, score (mean), n_seeds, n_configs, varying_values (the hparams
    that differ between the configurations compared, with the chosen values) and varying (the same as text).
    """
    score_column, _ = CONFIG_SCORE[rule]
    primary = selected.join(runs[["method", "config_hash", "seed", "primary", "hparams"]], on="run")
    primary = primary[primary["predictor"] == primary["primary"]]
    per_config = (
        primary.groupby(["dataset", "method", "config_hash"], sort=True)
        .agg(score=(score_column, "mean"), n_seeds=("seed", "size"), hparams=("hparams", "first"))
        .reset_index()
    )
    per_config["rank_score"] = per_config["score"].fillna(-np.inf)
    ordered = per_config.sort_values(["dataset", "method", "rank_score", "n_seeds", "config_hash"],
                                     ascending=[True, True, False, False, True])
    chosen = ordered.groupby(["dataset", "method"], sort=True).head(1).copy()
    n_configs = per_config.groupby(["dataset", "method"]).size().rename("n_configs")
    chosen = chosen.join(n_configs, on=["dataset", "method"])
    chosen["varying_values"] = [
        _varying_hparams(per_config, row.dataset, row.method, row.hparams) for row in chosen.itertuples()
    ]
    chosen["varying"] = [" ".join(f"{k}={v}" for k, v in values.items()) for values in chosen["varying_values"]]
    return chosen.drop(columns=["rank_score"]).reset_index(drop=True)


def _varying_hparams(per_config: pd.DataFrame, dataset: str, method: str, chosen: dict[str, Any]) -> dict[str, Any]:
    """The chosen values of the hparams whose values differ between the configurations compared."""
    compared = per_config[(per_config["dataset"] == dataset) & (per_config["method"] == method)]
    if len(compared) < 2:
        return {}
    all_hparams = list(compared["hparams"])
    keys = sorted({k for h in all_hparams for k in h})
    keys = [k for k in keys if len({json.dumps(h.get(k), sort_keys=True, default=str) for h in all_hparams}) > 1]
    return {k: chosen.get(k) for k in keys}


@dataclass
class Leaderboard:
    """Everything the tables and plots show, as DataFrames; see :func:`aggregate`.

    ``cells``: one row per (metric, dataset, row) with n, mean and std (in %, std with ddof=1),
    best, and (worst-group only) the difference from ERM and Welch's p-value. ``per_seed``: the
    picked evaluation of every seed of every chosen configuration. ``curves``: every evaluation of
    those runs (for the plots). ``group_accuracies[dataset]``: mean test accuracy (%) per group,
    rows x group names. ``rows``: the row labels in display order with method/predictor/primary.
    """

    rule: str
    root: str
    datasets: list[str]
    dataset_info: dict[str, dict[str, Any]]
    rows: pd.DataFrame
    cells: pd.DataFrame
    configs: pd.DataFrame
    per_seed: pd.DataFrame
    curves: pd.DataFrame
    group_accuracies: dict[str, pd.DataFrame]
    issues: list[RunIssue]
    counts: dict[str, int]
    # Models of the chosen configurations that predicted one class in every evaluation (collapsed): path,
    # dataset, row, seed, predictor.
    collapsed: pd.DataFrame
    # Per method, the caveat its runs recorded (Method.caveat, e.g. ULE's: a reconstruction), if any.
    caveats: dict[str, str]

    @property
    def oracle(self) -> bool:
        return self.rule == ORACLE_RULE

    def average_kind(self, dataset: str) -> str:
        return self.dataset_info[dataset]["average_kind"]

    def metric_order(self) -> list[str]:
        """Every metric name of the summaries, in display order: the headline ones, then the declared."""
        declared = [spec.key for d in self.datasets for spec in declared_specs(self.metric_sets(d))]
        return list(HEADLINE_METRICS.values()) + list(dict.fromkeys(declared))

    def metric_sets(self, dataset: str) -> list[str]:
        """The metric sets a dataset declares (bench.core.metrics.METRIC_SETS), in order."""
        return list(self.dataset_info[dataset]["structure"].extra_metrics)


def _row_order(methods: Sequence[str]) -> list[str]:
    return sorted(set(methods), key=lambda m: (m != REFERENCE_METHOD, m))


def _row_labels(frame: pd.DataFrame) -> np.ndarray:
    """``method`` for a primary predictor, ``method (predictor)`` for a secondary one."""
    return np.where(frame["is_primary"], frame["method"], frame["method"] + " (" + frame["predictor"] + ")")


def welch_p_value(values: Sequence[float], reference: Sequence[float]) -> float:
    """Two-sided Welch's t-test p-value; NaN when either side has fewer than 2 values or both have
    no spread (the test is undefined there)."""
    from scipy import stats

    a = np.asarray(values, dtype=float)
    b = np.asarray(reference, dtype=float)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def aggregate(results: Results, rule: str = DEFAULT_RULE, primary_only: bool = False) -> Leaderboard:
    """Apply the selection ``rule`` and summarise every (method, dataset) over seeds."""
    check_rule(rule)
    counts = {
        "found": results.n_found,
        "used": len(results.runs),
        **{state: results.count(state) for state in ("failed", "unfinished", "corrupt", "duplicate")},
    }
    if results.runs.empty:
        raise BenchError(
            f"{results.root}: no finished run to report ({counts['failed']} failed, {counts['unfinished']} "
            f"unfinished, {counts['corrupt']} corrupt)"
        )
    runs = results.runs
    selected = select_evaluations(results.evaluations, rule)
    configs = select_configs(selected, runs, rule)

    chosen_runs = runs.merge(configs[["dataset", "method", "config_hash"]], on=["dataset", "method", "config_hash"])
    chosen_ids = set(chosen_runs["run"])
    meta = runs[["method", "config_hash", "seed", "primary"]]
    per_seed = selected[selected["run"].isin(chosen_ids)].join(meta, on="run")
    per_seed["is_primary"] = per_seed["predictor"] == per_seed["primary"]
    if primary_only:
        per_seed = per_seed[per_seed["is_primary"]]
    per_seed["row"] = _row_labels(per_seed)
    per_seed = per_seed.sort_values(["dataset", "method", "seed", "predictor"]).reset_index(drop=True)

    # Display order: ERM first, then methods alphabetically, each followed by its secondary rows.
    rows = (per_seed[["row", "method", "predictor", "is_primary"]].drop_duplicates("row")
            .assign(method_rank=lambda f: f["method"].map({m: i for i, m in enumerate(_row_order(f["method"]))}))
            .sort_values(["method_rank", "is_primary", "predictor"], ascending=[True, False, True])
            .drop(columns="method_rank").reset_index(drop=True))
    datasets = sorted(per_seed["dataset"].unique())

    cells = _summarise(per_seed, datasets, results.datasets)
    curves = results.evaluations[results.evaluations["run"].isin(chosen_ids)].join(meta, on="run")
    curves = curves[curves["predictor"].isin(per_seed["predictor"].unique())]
    curves = curves.assign(
        is_primary=curves["predictor"] == curves["primary"],
        evaluation=curves.groupby(["run", "predictor"]).cumcount() + 1,
    )
    curves["row"] = _row_labels(curves)
    curves = curves[curves["row"].isin(rows["row"])].reset_index(drop=True)

    group_accuracies = {}
    for dataset in datasets:
        subset = per_seed[per_seed["dataset"] == dataset]
        matrix = results.group_accuracies[dataset][subset["ga_row"].to_numpy()] * 100
        frame = pd.DataFrame(matrix, columns=results.datasets[dataset]["group_names"])
        frame["row"] = subset["row"].to_numpy()
        means = frame.groupby("row", sort=False).mean()
        group_accuracies[dataset] = means.reindex([r for r in rows["row"] if r in means.index])

    dataset_info = {d: results.datasets[d] for d in datasets}
    return Leaderboard(rule, str(results.root), datasets, dataset_info, rows, cells, configs, per_seed, curves,
                       group_accuracies, list(results.issues), counts, collapsed_models(curves, runs),
                       {m: c for m, c in chosen_runs[["method", "method_caveat"]].itertuples(index=False) if c})


def collapsed_models(curves: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """(run, predictor) pairs that predicted one class on the validation set in every selectable
    evaluation (bench.core.metrics.predicts_one_class): warned about wherever they are averaged."""
    columns = ["path", "dataset", "row", "seed", "predictor"]
    selectable = curves[curves["selectable"]]
    if selectable.empty:
        return pd.DataFrame(columns=columns)
    always = selectable.groupby(["run", "predictor", "row", "dataset"], sort=True)["val_one_class"].min()
    dead = always[always == 1.0].reset_index()
    dead["path"] = dead["run"].map(runs["path"])
    dead["seed"] = dead["run"].map(runs["seed"])
    return dead[columns].reset_index(drop=True)


def _summarise(per_seed: pd.DataFrame, datasets: list[str], dataset_meta: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Tidy summary: one row per (metric, dataset, row) with n, mean, std (%), best, diff and p vs ERM."""
    declared = {d: {metric_column(spec): spec for spec in dataset_meta[d]["structure"].metric_specs()}
                for d in datasets}
    specs = {column: spec for columns in declared.values() for column, spec in columns.items()}
    metric_columns = list(HEADLINE_METRICS) + list(specs)
    long = per_seed.melt(id_vars=["dataset", "row", "method", "predictor", "is_primary", "config_hash", "seed"],
                         value_vars=metric_columns, var_name="metric", value_name="value")
    # A declared metric only for the datasets that declare it.
    keep = [metric in HEADLINE_METRICS or metric in declared[dataset]
            for metric, dataset in zip(long["metric"], long["dataset"])]
    long = long[np.asarray(keep, dtype=bool)]
    long["value"] = long["value"].astype(float) * 100
    grouped = long.groupby(["metric", "dataset", "row", "method", "predictor", "is_primary", "config_hash"],
                           sort=False)["value"]
    cells = grouped.agg(n="size", mean=lambda v: v.mean(skipna=False), std=lambda v: v.std(ddof=1, skipna=False))
    cells = cells.reset_index()
    cells["average_kind"] = cells["dataset"].map(lambda d: dataset_meta[d]["average_kind"])

    # Best per (metric, dataset) among primary rows, at the precision shown (ties all marked).
    shown = cells["mean"].round(1)
    closer_to_zero = [c for c, spec in specs.items() if spec.better == "closer_to_zero"]
    cells["rank_value"] = np.where(cells["metric"].isin(closer_to_zero), -shown.abs(), shown)
    eligible = cells["is_primary"] & cells["rank_value"].notna()
    best_value = cells[eligible].groupby(["metric", "dataset"])["rank_value"].max()
    cells["best"] = eligible & (cells["rank_value"] == cells.set_index(["metric", "dataset"]).index.map(best_value))
    cells = cells.drop(columns="rank_value")

    # Welch's t-test against ERM's primary row, on worst-group accuracy over seeds.
    cells["diff_vs_erm"] = np.nan
    cells["p_vs_erm"] = np.nan
    worst = long[long["metric"] == "test_worst_group"]
    reference = worst[(worst["method"] == REFERENCE_METHOD) & worst["is_primary"]].groupby("dataset")["value"]
    reference_values = {dataset: values.to_numpy() for dataset, values in reference}
    values_by_cell = {key: v.to_numpy() for key, v in worst.groupby(["dataset", "row"])["value"]}
    for index in cells.index[cells["metric"] == "test_worst_group"]:
        dataset, row = cells.at[index, "dataset"], cells.at[index, "row"]
        if row == REFERENCE_METHOD or dataset not in reference_values:
            continue
        values, ref = values_by_cell[(dataset, row)], reference_values[dataset]
        cells.at[index, "diff_vs_erm"] = np.mean(values) - np.mean(ref)
        cells.at[index, "p_vs_erm"] = welch_p_value(values, ref)
    cells["metric"] = cells["metric"].map(lambda column: metric_name(column))
    return cells




def metric_name(column: str) -> str:
    """The name of an evaluation-table column in the summaries (``test_bg_gap`` -> ``bg_gap``)."""
    return HEADLINE_METRICS.get(column, column.removeprefix("test_"))


def declared_specs(metric_sets: Sequence[str]) -> list[MetricSpec]:
    """The metrics of the named metric sets, in order."""
    return [spec for name in metric_sets for spec in METRIC_SETS[name].metrics]
