"""``bench report``: leaderboard tables (markdown, LaTeX, CSV, HTML) and plots from a results folder.

Everything is recomputed from the per-group correct/total counts in each run's ``metrics.jsonl``;
``final.json`` only marks a run as done (and tells how many evaluations it wrote), its summaries are
never read. The pipeline is a chain of pure functions:

1. :func:`load_results`: walk the folder, read every run with plain :mod:`json`, count (and skip)
   failed, unfinished, corrupt and duplicate runs, and compute every metric of every evaluation of
   every predictor (one row per run x evaluation x predictor) with :mod:`bench.metrics` and
   :func:`bench.selection.rule_scores`, called once per dataset on all rows: the report has no
   formula of its own.
2. :func:`aggregate`: apply a selection rule. Within each run the rule picks an epoch per predictor
   (:func:`bench.selection.select`'s choice, made for all runs at once with
   :func:`bench.selection.best_per_group`); then, for each (method, dataset), the hyperparameter
   configuration whose primary predictor has the best mean over seeds of the rule's score at the
   picked epochs (see :data:`CONFIG_SCORE`); then mean, sample std (ddof=1) and n over the seeds of
   that configuration, the best method per column, and Welch's t-test against ERM on worst-group
   accuracy.
3. :func:`to_markdown`, :func:`to_latex`, :func:`to_csv`, :func:`to_html` render the result;
   :mod:`bench.plots` draws it.

Multi-model methods (ULE: teacher + student, LfF: debiased + biased) are ranked by their primary
predictor. Each secondary predictor gets its own row, ``method (predictor)``, taken from the
configuration chosen for the primary (the models are trained together, so there is one
configuration) at its own selected epoch; such rows are shown for information, are never marked
best, and can be left out with ``--primary-only``.
"""

from __future__ import annotations

import argparse
import base64
import gc
import html
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import metrics
from bench.errors import BenchError
from bench.metrics import AVERAGE_LABELS, GroupStructure
from bench.records import CONFIG, FAILED, FINAL, METRICS
from bench.selection import DEFAULT_RULE, RULE_SPLITS, RULES, best_per_group, check_rule, describe, rule_scores

# The column of the evaluation table that holds each rule's score (computed by
# bench.selection.rule_scores from the rule's split); None: the rule has no score and picks the last
# selectable evaluation.
EPOCH_SCORE: dict[str, str | None] = {
    "val-worst-group": "val_worst_group",
    "val-avg": "val_average",
    "val-worst-class": "val_worst_class",
    "last": None,
    "oracle-test": "test_worst_group",
}

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
ORACLE_MARK = "ORACLE (model selected on the test set; an upper bound, not a valid result)"
REFERENCE_METHOD = "erm"
UNAVAILABLE = "n/a"
MISSING = "–"

# Test metrics shown in the tables: column of the evaluation table, label, how "best" is decided.
URBANCARS_METRICS: list[tuple[str, str]] = [
    ("test_id_acc", "I.D. Acc"),
    ("test_bg_gap", "BG Gap"),
    ("test_coobj_gap", "CoObj Gap"),
    ("test_bg_coobj_gap", "BG+CoObj Gap"),
]
METRIC_NAMES: dict[str, str] = {
    "test_worst_group": "worst_group_accuracy",
    "test_average": "average_accuracy",
    "test_id_acc": "id_acc",
    "test_bg_gap": "bg_gap",
    "test_coobj_gap": "coobj_gap",
    "test_bg_coobj_gap": "bg_coobj_gap",
}
GAP_COLUMNS = {"test_bg_gap", "test_coobj_gap", "test_bg_coobj_gap"}  # best = closest to 0
EVALUATION_COLUMNS = ["run", "position", "predictor", "stage", "epoch", "selectable", "dataset", "ga_row",
                      "val_worst_group", "val_average", "val_worst_class", "test_worst_group", "test_average",
                      "test_worst_class"] + [c for c, _ in URBANCARS_METRICS]

_SEED_DIR = re.compile(r"seed\d+$")
_RUN_FILES = (CONFIG, METRICS, FINAL, FAILED)


# --------------------------------------------------------------------------------------------
# Metrics of every evaluation: bench.metrics and bench.selection.rule_scores on all rows at once.


def _split_columns(split: str, correct: np.ndarray, total: np.ndarray, structure: GroupStructure) -> dict[str, Any]:
    """The evaluation table's columns of one split (``val`` or ``test``), one value per row of ``[N, G]`` counts.

    The score of every rule that scores this split (its :data:`EPOCH_SCORE` column, by
    :func:`bench.selection.rule_scores`) and, for the test split, the metrics the tables show. A row
    whose split has no example at all gets NaN everywhere (bench.metrics refuses to define its
    worst-group accuracy; the trainer never finishes such a run, so only hand-made records have one).
    """
    # One row-major copy here spares one in each of the bench.metrics calls below.
    correct, total = np.ascontiguousarray(correct), np.ascontiguousarray(total)
    has_examples = total.sum(axis=1) > 0
    if not has_examples.all():
        inner = _split_columns(split, correct[has_examples], total[has_examples], structure)
        columns = {}
        for name, values in inner.items():
            columns[name] = np.full(len(total), np.nan)
            columns[name][has_examples] = values
        return columns
    columns = {EPOCH_SCORE[rule]: rule_scores(correct, total, structure, rule)
               for rule in RULES if RULE_SPLITS[rule] == split}
    if split == "test":
        columns["test_average"] = metrics.average_accuracy(correct, total, structure)
        columns["test_worst_class"] = metrics.worst_class_accuracy(correct, total, structure)
        if structure.is_urbancars:
            urbancars = metrics.urbancars_metrics(correct, total)
            columns.update({f"test_{name}": values for name, values in urbancars.items()})
    return columns


# --------------------------------------------------------------------------------------------
# Loading


class CorruptRecord(Exception):
    """A run folder whose files cannot be read as a finished run's records (reason in the message)."""


@dataclass(frozen=True)
class RunIssue:
    """A run folder left out of the report, and why."""

    path: str
    state: str  # failed, unfinished, corrupt, duplicate
    reason: str


@dataclass
class Results:
    """Every usable run of a results folder, every evaluation's metrics, and what was skipped.

    ``runs``: one row per usable run (index: run id). ``evaluations``: one row per run x evaluation
    (metrics line) x predictor, with ``position`` (line number in metrics.jsonl, from 0) and the
    val/test metrics as fractions. ``group_accuracies[dataset]``: test accuracy of each group,
    ``[rows, G]``, row ``ga_row`` of the evaluation table. ``datasets[name]``: the dataset's info
    (from config.json) and its :class:`GroupStructure`.
    """

    root: Path
    runs: pd.DataFrame
    evaluations: pd.DataFrame
    group_accuracies: dict[str, np.ndarray]
    datasets: dict[str, dict[str, Any]]
    issues: list[RunIssue]
    n_found: int

    def count(self, state: str) -> int:
        return sum(1 for issue in self.issues if issue.state == state)


def find_run_folders(root: Path) -> list[tuple[Path, set[str]]]:
    """Every ``seed<k>`` folder under ``root`` holding at least one run file, with its file names."""
    found = []
    for folder, subfolders, files in os.walk(root):
        if _SEED_DIR.search(os.path.basename(folder)):
            names = set(files) & set(_RUN_FILES)
            if names:
                found.append((Path(folder), names))
                subfolders.clear()  # a run folder holds no other run
                continue
        subfolders.sort()
    found.sort(key=lambda item: str(item[0]))
    return found


def _read_json(path: str) -> Any:
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise CorruptRecord(
            f"{os.path.basename(path)}: not valid JSON ({error.msg} at line {error.lineno}; truncated?)"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise CorruptRecord(f"{os.path.basename(path)}: cannot be read ({error})") from None


def _read_metric_lines(path: str) -> list[dict[str, Any]]:
    """Every line of a finished run's metrics.jsonl; any unparsable line (even the last) is corruption."""
    try:
        with open(path) as handle:
            text = handle.read()
    except FileNotFoundError:
        raise CorruptRecord(f"{METRICS}: missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CorruptRecord(f"{METRICS}: cannot be read ({error})") from None
    lines = [line for line in text.split("\n") if line.strip()]
    # One parse of all lines is several times faster than one per line; the count check catches a
    # damaged line that would merge with its neighbour into one valid value.
    try:
        parsed = json.loads("[" + ",".join(lines) + "]")
        if len(parsed) == len(lines) and all(isinstance(record, dict) for record in parsed):
            return parsed
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CorruptRecord(f"{METRICS} line {number}: not valid JSON (truncated?)") from None
        if not isinstance(record, dict):
            raise CorruptRecord(f"{METRICS} line {number}: not a JSON object")
    raise CorruptRecord(f"{METRICS}: not one JSON object per line")  # defensive: the loop above names the line


def _require(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise CorruptRecord(f"{where}: missing field {key!r}")
    return mapping[key]


@dataclass
class _RunData:
    path: Path
    config: dict[str, Any]  # only the fields the report uses (see _RUN_FIELDS)
    info: dict[str, Any] | None  # dataset_info; dropped once matched to its dataset variant (memory)
    structure: GroupStructure
    # One entry per metrics line: its position, stage, epoch, selectable flag and number of predictors.
    line_positions: list[int]
    line_stages: list[str]
    line_epochs: list[Any]
    line_selectable: list[bool]
    line_widths: list[int]
    predictors: list[str]  # one per row of ``counts`` (lines in order, each line's predictors in order)
    counts: np.ndarray  # [rows, 4, G]: val correct, val total, test correct, test total


def _read_run(path: Path, names: set[str]) -> _RunData:
    """A finished run's config and metric lines, checked; raises CorruptRecord on any defect.

    ``names``: the run files present in the folder (known from the walk; saves a stat per file).
    """
    folder = str(path)
    if CONFIG not in names:
        raise CorruptRecord(f"{CONFIG}: missing")
    if METRICS not in names:
        raise CorruptRecord(f"{METRICS}: missing")
    config = _read_json(os.path.join(folder, CONFIG))
    for key in _RUN_FIELDS:
        _require(config, key, CONFIG)
    info = _require(config, "dataset_info", CONFIG)
    for key in ("n_classes", "attr_value_names", "average_kind", "group_counts"):
        _require(info, key, f"{CONFIG} dataset_info")
    _require(info["group_counts"], "train", f"{CONFIG} dataset_info.group_counts")
    for key, kind in (("seed", int), ("primary", str), ("method", str), ("dataset", str), ("config_hash", str),
                      ("hparams", dict)):
        if not isinstance(config[key], kind) or isinstance(config[key], bool):
            raise CorruptRecord(f"{CONFIG}: field {key!r} is not a {kind.__name__}")
    if not isinstance(info["n_classes"], int) or info["n_classes"] < 1:
        raise CorruptRecord(f"{CONFIG}: dataset_info.n_classes is not a positive integer")
    try:
        structure = GroupStructure.from_info(info)
        n_groups = structure.n_groups
    except (TypeError, ValueError) as error:
        raise CorruptRecord(f"{CONFIG}: malformed dataset_info ({error})") from None
    if len(structure.train_group_counts) != n_groups:
        raise CorruptRecord(f"{CONFIG}: dataset_info has {len(structure.train_group_counts)} train group counts "
                            f"for {n_groups} groups")
    if structure.average_kind not in AVERAGE_LABELS:
        raise CorruptRecord(f"{CONFIG}: unknown average_kind {structure.average_kind!r}")
    if structure.is_urbancars and n_groups != 8:
        raise CorruptRecord(f"{CONFIG}: an UrbanCars dataset needs 8 groups, this one has {n_groups}")

    final = _read_json(os.path.join(folder, FINAL))
    records = _read_metric_lines(os.path.join(folder, METRICS))
    if not records:
        raise CorruptRecord(f"{METRICS}: no evaluation")
    expected = final.get("n_evaluations") if isinstance(final, dict) else None
    if isinstance(expected, int) and expected != len(records):
        raise CorruptRecord(f"{METRICS} has {len(records)} lines but {FINAL} says {expected} evaluations")

    stages, epochs, selectable, widths, predictors, rows = [], [], [], [], [], []
    try:  # the fast path: no per-field checks; any defect is located by _diagnose_lines
        for record in records:
            evaluation = record["eval"]
            for splits in evaluation.values():
                val, test = splits["val"], splits["test"]
                rows.append([val["correct"], val["total"], test["correct"], test["total"]])
            predictors.extend(evaluation)
            widths.append(len(evaluation))
            stages.append(str(record["stage"]))
            epochs.append(record["epoch"])
            selectable.append(bool(record.get("selectable", True)))
    except (KeyError, TypeError, AttributeError):
        _diagnose_lines(records)
    positions = np.repeat(np.arange(len(records)), widths)
    if not rows:
        _diagnose_lines(records)
    try:
        counts = np.asarray(rows, dtype=float)
    except (TypeError, ValueError):
        counts = None
    if counts is None or counts.shape != (len(rows), 4, n_groups):
        for position, row in zip(positions, rows):
            if any(not isinstance(part, list) or len(part) != n_groups for part in row):
                raise CorruptRecord(f"{METRICS} line {position + 1}: counts are not lists of {n_groups} numbers")
        raise CorruptRecord(f"{METRICS}: counts are not numbers")
    if not np.isfinite(counts).all():
        raise CorruptRecord(f"{METRICS}: counts are not finite numbers")
    for split, offset in (("val", 0), ("test", 2)):
        bad = (counts[:, offset] < 0) | (counts[:, offset] > counts[:, offset + 1])
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise CorruptRecord(f"{METRICS} line {positions[row] + 1}: {predictors[row]} {split}: "
                                "a group has correct < 0 or correct > total")
    primary = config["primary"]
    if not any(primary in record["eval"] and s for record, s in zip(records, selectable)):
        raise CorruptRecord(f"{METRICS}: no selectable evaluation of the primary predictor {primary!r}")
    return _RunData(path, {k: config[k] for k in _RUN_FIELDS}, info, structure, list(range(len(records))), stages,
                    epochs, selectable, widths, predictors, counts)


_RUN_FIELDS = ("method", "dataset", "config_hash", "seed", "primary", "hparams")


def _diagnose_lines(records: list[dict[str, Any]]) -> None:
    """Raise CorruptRecord naming the first metrics line that lacks a field the report needs."""
    for position, record in enumerate(records):
        where = f"{METRICS} line {position + 1}"
        evaluation = _require(record, "eval", where)
        _require(record, "stage", where), _require(record, "epoch", where)
        if not isinstance(evaluation, dict) or not evaluation:
            raise CorruptRecord(f"{where}: 'eval' holds no predictor")
        for predictor, splits in evaluation.items():
            for split in ("val", "test"):
                counts = splits.get(split) if isinstance(splits, dict) else None
                if not isinstance(counts, dict) or "correct" not in counts or "total" not in counts:
                    raise CorruptRecord(f"{where}: {predictor} needs val and test 'correct'/'total' counts")
    raise CorruptRecord(f"{METRICS}: malformed evaluation records")


def _structure_signature(info: dict[str, Any]) -> dict[str, Any]:
    """The parts of dataset_info that define its groups (compared with ==, which is fast in C)."""
    return {k: info.get(k) for k in ("n_classes", "attr_value_names", "average_kind", "group_names", "group_counts")}


def _group_names(info: dict[str, Any], n_groups: int) -> list[str]:
    names = info.get("group_names")
    if isinstance(names, list) and len(names) == n_groups:
        return [str(n) for n in names]
    return [f"group {g}" for g in range(n_groups)]


def load_results(root: str | Path) -> Results:
    """Read every run under ``root`` and compute the metrics of every evaluation.

    Raises BenchError if ``root`` is not a folder. Runs that cannot be used are listed in
    ``issues`` (failed, unfinished, corrupt with the reason, or duplicate); none raises.
    """
    root = Path(root)
    if not root.is_dir():
        raise BenchError(f"{root}: no such results folder")
    # Parsed JSON holds no reference cycles, yet millions of new containers would trigger the cyclic
    # garbage collector over and over (about 10% of the loading time); pause it while reading.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _load(root)
    finally:
        if gc_was_enabled:
            gc.enable()


def _load(root: Path) -> Results:
    folders = find_run_folders(root)
    issues: list[RunIssue] = []
    loaded: list[tuple[_RunData, int]] = []  # each run with the index of its dataset variant
    # A dataset is named by its name; if runs of one name disagree on the group structure (a custom
    # dataset read from two folders), each structure becomes its own column, "name [k]". Each run's
    # dataset_info is matched as soon as it is read, so that only one copy per variant stays in memory.
    variants: dict[str, list[tuple[dict[str, Any], dict[str, Any], GroupStructure]]] = {}
    for path, names in folders:
        if FINAL not in names:
            if FAILED in names:
                reason = "failed"
                try:
                    failure = _read_json(os.path.join(path, FAILED))
                    reason = f"{failure.get('error_type', 'error')}: {failure.get('reason', '')}".strip()
                except (CorruptRecord, AttributeError):
                    pass
                issues.append(RunIssue(str(path), "failed", reason))
            else:
                issues.append(RunIssue(str(path), "unfinished", f"no {FINAL} (still running, killed or resumable)"))
            continue
        try:
            run = _read_run(path, names)
        except CorruptRecord as error:
            issues.append(RunIssue(str(path), "corrupt", str(error)))
            continue
        assert run.info is not None
        signature = _structure_signature(run.info)
        known = variants.setdefault(run.config["dataset"], [])
        index = next((i for i, (other, _, _) in enumerate(known) if other == signature), None)
        if index is None:
            known.append((signature, run.info, run.structure))
            index = len(known) - 1
        run.info, run.structure = None, known[index][2]
        loaded.append((run, index))

    run_rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, str, str, Any], str] = {}
    per_dataset: dict[str, list[tuple[int, _RunData]]] = {}
    datasets: dict[str, dict[str, Any]] = {}
    for run, variant in loaded:
        config = run.config
        name = config["dataset"]
        label = name if len(variants[name]) == 1 else f"{name} [{variant + 1}]"
        key = (label, config["method"], config["config_hash"], config["seed"])
        if key in seen:
            issues.append(RunIssue(str(run.path), "duplicate", f"same dataset, method, config and seed as {seen[key]}"))
            continue
        seen[key] = str(run.path)
        run_id = len(run_rows)
        run_rows.append({
            "run": run_id, "path": str(run.path), "dataset": label, "method": config["method"],
            "config_hash": config["config_hash"], "seed": config["seed"], "primary": config["primary"],
            "hparams": config["hparams"],
        })
        per_dataset.setdefault(label, []).append((run_id, run))
        if label not in datasets:
            _, info, _ = variants[name][variant]
            datasets[label] = {
                "info": info, "structure": run.structure, "average_kind": run.structure.average_kind,
                "group_names": _group_names(info, run.structure.n_groups),
            }

    frames, group_accuracies = [], {}
    for label, members in per_dataset.items():
        structure = datasets[label]["structure"]
        counts = np.concatenate([run.counts for _, run in members])
        widths = np.concatenate([run.line_widths for _, run in members]).astype(int)
        val = _split_columns("val", counts[:, 0], counts[:, 1], structure)
        test = _split_columns("test", counts[:, 2], counts[:, 3], structure)
        frame = pd.DataFrame({
            "run": np.repeat([run_id for run_id, _ in members], [len(run.predictors) for _, run in members]),
            "position": np.repeat(np.concatenate([run.line_positions for _, run in members]).astype(int), widths),
            "predictor": [p for _, run in members for p in run.predictors],
            "stage": np.repeat(np.array([s for _, run in members for s in run.line_stages]), widths),
            "epoch": np.repeat(np.array([e for _, run in members for e in run.line_epochs]), widths),
            "selectable": np.repeat(np.concatenate([run.line_selectable for _, run in members]).astype(bool), widths),
            "dataset": label,
            "ga_row": np.arange(len(counts)),
            **val,
            **test,
        })
        for column, _ in URBANCARS_METRICS:
            if column not in frame:
                frame[column] = np.nan
        frames.append(frame[EVALUATION_COLUMNS])
        group_accuracies[label] = metrics.group_accuracies(counts[:, 2], counts[:, 3])
    evaluations = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=EVALUATION_COLUMNS)
    runs = pd.DataFrame(run_rows, columns=["run", "path", "dataset", "method", "config_hash", "seed", "primary",
                                           "hparams"]).set_index("run", drop=False)
    return Results(root, runs, evaluations, group_accuracies, datasets, issues, len(folders))


# --------------------------------------------------------------------------------------------
# Selection


def select_evaluations(evaluations: pd.DataFrame, rule: str) -> pd.DataFrame:
    """The evaluation the rule picks for each (run, predictor): one row each.

    :func:`bench.selection.select` for all runs at once, with the same two steps: the rule's score
    (its :data:`EPOCH_SCORE` column, computed by :func:`bench.selection.rule_scores`) and the pick
    (:func:`bench.selection.best_per_group`: NaN counts as -inf, ties go to the earliest evaluation)
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
    Columns: dataset, method, config_hash, score (mean), n_seeds, n_configs, varying (the hparams
    that differ between the configurations compared, with the chosen values).
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
    chosen["varying"] = [
        _varying_hparams(per_config, row.dataset, row.method, row.hparams) for row in chosen.itertuples()
    ]
    return chosen.drop(columns=["rank_score"]).reset_index(drop=True)


def _varying_hparams(per_config: pd.DataFrame, dataset: str, method: str, chosen: dict[str, Any]) -> str:
    compared = per_config[(per_config["dataset"] == dataset) & (per_config["method"] == method)]
    if len(compared) < 2:
        return ""
    all_hparams = list(compared["hparams"])
    keys = sorted({k for h in all_hparams for k in h})
    keys = [k for k in keys if len({json.dumps(h.get(k), sort_keys=True, default=str) for h in all_hparams}) > 1]
    return " ".join(f"{k}={chosen.get(k)}" for k in keys)


# --------------------------------------------------------------------------------------------
# Aggregation


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

    @property
    def oracle(self) -> bool:
        return self.rule == ORACLE_RULE

    def average_kind(self, dataset: str) -> str:
        return self.dataset_info[dataset]["average_kind"]

    def urbancars_datasets(self) -> list[str]:
        return [d for d in self.datasets if self.average_kind(d) == "urbancars_id"]


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

    dataset_info = {d: {k: v for k, v in results.datasets[d].items() if k != "structure"} for d in datasets}
    return Leaderboard(rule, str(results.root), datasets, dataset_info, rows, cells, configs, per_seed, curves,
                       group_accuracies, list(results.issues), counts)


def _summarise(per_seed: pd.DataFrame, datasets: list[str], dataset_meta: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Tidy summary: one row per (metric, dataset, row) with n, mean, std (%), best, diff and p vs ERM."""
    metric_columns = ["test_worst_group", "test_average"] + [c for c, _ in URBANCARS_METRICS]
    long = per_seed.melt(id_vars=["dataset", "row", "method", "predictor", "is_primary", "config_hash", "seed"],
                         value_vars=metric_columns, var_name="metric", value_name="value")
    urbancars = {d for d in datasets if dataset_meta[d]["average_kind"] == "urbancars_id"}
    long = long[~long["metric"].isin([c for c, _ in URBANCARS_METRICS]) | long["dataset"].isin(urbancars)]
    long["value"] = long["value"].astype(float) * 100
    grouped = long.groupby(["metric", "dataset", "row", "method", "predictor", "is_primary", "config_hash"],
                           sort=False)["value"]
    cells = grouped.agg(n="size", mean=lambda v: v.mean(skipna=False), std=lambda v: v.std(ddof=1, skipna=False))
    cells = cells.reset_index()
    cells["average_kind"] = cells["dataset"].map(lambda d: dataset_meta[d]["average_kind"])

    # Best per (metric, dataset) among primary rows, at the precision shown (ties all marked).
    shown = cells["mean"].round(1)
    cells["rank_value"] = np.where(cells["metric"].isin(GAP_COLUMNS), -shown.abs(), shown)
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
    cells["metric"] = cells["metric"].map(METRIC_NAMES)
    return cells


# --------------------------------------------------------------------------------------------
# Tables


@dataclass
class Cell:
    """One table cell: ``main`` (bold when best) then ``suffix``; ``±`` is rendered per format."""

    main: str
    suffix: str = ""
    bold: bool = False


@dataclass
class Table:
    key: str
    title: str
    header: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)


def _kind_name(kind: str) -> str:
    return kind.replace("_", "-")


def _format_mean_std(mean: float, std: float, n: int) -> tuple[str, str]:
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
        line = [Cell(row.row)]
        for dataset in datasets:
            found = lookup.get((dataset, row.row))
            if found is None:
                line.append(Cell(MISSING))
                continue
            main, suffix = _format_mean_std(found.mean, found.std, found.n)
            line.append(Cell(main, suffix, bool(found.best)))
        rows.append(line)
    return Table(key, title, ["method"] + header, rows, notes)


def _selection_lines(board: Leaderboard) -> list[str]:
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
    """The report's tables, in order: worst-group, average, UrbanCars, vs ERM, configurations."""
    common = "Test accuracy in %, mean ± sample std (ddof=1) over seeds, n = number of seeds."
    secondary = board.rows["is_primary"].eq(False).any()
    best_note = "Bold: best method per dataset (at the precision shown; ties all bold)" + (
        "; rows `method (predictor)` are a multi-model method's secondary model, shown for information, "
        "never marked best." if secondary else ".")
    tables = [
        _metric_table(board, "worst_group", "worst_group_accuracy", _title(board, "Worst-group accuracy (test, %)"),
                      board.datasets, board.datasets, [common, best_note]),
    ]
    kinds = sorted({board.average_kind(d) for d in board.datasets})
    tables.append(_metric_table(
        board, "average", "average_accuracy", _title(board, "Average accuracy (test, %)"), board.datasets,
        [f"{d} ({_kind_name(board.average_kind(d))})" for d in board.datasets],
        [common, "Each dataset reports its own kind of average (in brackets): "
         + "; ".join(f"{_kind_name(k)} = {AVERAGE_LABELS[k]}" for k in kinds) + ".", best_note],
    ))
    for dataset in board.urbancars_datasets():
        lookup = {metric: _cell_lookup(board.cells, METRIC_NAMES[metric]) for metric, _ in URBANCARS_METRICS}
        rows = []
        for row in board.rows.itertuples(index=False):
            if (dataset, row.row) not in lookup["test_id_acc"]:
                continue  # not run on this dataset
            line = [Cell(row.row)]
            for metric, _ in URBANCARS_METRICS:
                found = lookup[metric].get((dataset, row.row))
                if found is None:
                    line.append(Cell(MISSING))
                else:
                    main, suffix = _format_mean_std(found.mean, found.std, found.n)
                    line.append(Cell(main, suffix, bool(found.best)))
            rows.append(line)
        tables.append(Table(
            f"urbancars_{dataset}", _title(board, f"{dataset}: UrbanCars metrics (test, %)"),
            ["method"] + [label for _, label in URBANCARS_METRICS], rows,
            [common, "I.D. Acc: group accuracies weighted by the training alignment ratios (0.95); each gap: accuracy "
             "on the cue-conflicting cells minus I.D. Acc (Whac-A-Mole); bold: highest I.D. Acc, gap closest to 0."],
        ))
    tables.append(_versus_erm_table(board))
    tables.append(_configs_table(board))
    return tables


def _versus_erm_table(board: Leaderboard) -> Table:
    lookup = _cell_lookup(board.cells, "worst_group_accuracy")
    has_reference = {d for (d, row) in lookup if row == REFERENCE_METHOD}
    rows = []
    for row in board.rows.itertuples(index=False):
        line = [Cell(row.row)]
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
                     Cell(str(config.n_configs)), Cell(score), Cell(config.varying or MISSING)])
    return Table("configs", _title(board, "Selected configurations"),
                 ["dataset", "method", "config", "seeds", "configs compared", "score (%)", "chosen values of the "
                  "hparams that differ"], rows,
                 [f"score: mean over seeds of {score_text} at the selected epochs (primary predictor)."])


def _header_lines(board: Leaderboard) -> list[str]:
    c = board.counts
    skipped = ", ".join(f"{c[state]} {state}" for state in ("failed", "unfinished", "corrupt", "duplicate")
                        if c[state])
    return [f"Results: `{board.root}`: {c['found']} run folders, {c['used']} finished runs used"
            + (f"; skipped {skipped}." if skipped else ".")]


def _markdown_cell(cell: Cell) -> str:
    main = f"**{cell.main}**" if cell.bold else cell.main
    return f"{main} {cell.suffix}".strip()


def to_markdown(board: Leaderboard) -> str:
    """The report as markdown: header, selection rule, then every table with its notes."""
    from tabulate import tabulate

    title = "# Leaderboard" + (" — ORACLE test selection" if board.oracle else "")
    parts = [title, "", *_header_lines(board), "", *_selection_lines(board)]
    for table in build_tables(board):
        rows = [[_markdown_cell(c) for c in row] for row in table.rows]
        parts += ["", f"## {table.title}", "",
                  tabulate(rows, headers=table.header, tablefmt="github", disable_numparse=True), ""]
        parts += [" ".join(table.notes)]
    return "\n".join(parts) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    escaped = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)
    return escaped.replace("±", r"$\pm$").replace("–", "--").replace("<", r"$<$").replace("`", "")


def _latex_cell(cell: Cell) -> str:
    main = latex_escape(cell.main)
    if cell.bold:
        main = rf"\textbf{{{main}}}"
    return f"{main} {latex_escape(cell.suffix)}".strip()


def to_latex(board: Leaderboard) -> str:
    """The report's tables as LaTeX ``table`` environments with booktabs rules."""
    header = ["% Generated by `bench report`; needs \\usepackage{booktabs}.",
              "% " + _header_lines(board)[0].replace("`", "")]
    header += ["% " + line.replace("`", "").replace("**", "") for line in _selection_lines(board)]
    parts = ["\n".join(header)]
    for table in build_tables(board):
        caption = latex_escape(table.title) + ". " + latex_escape(" ".join(table.notes))
        lines = [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{caption.replace('**', '')}}}",
            rf"\label{{tab:{re.sub(r'[^A-Za-z0-9]+', '-', table.key)}}}",
            rf"\begin{{tabular}}{{l{'c' * (len(table.header) - 1)}}}",
            r"\toprule",
            " & ".join(latex_escape(h) for h in table.header) + r" \\",
            r"\midrule",
        ]
        lines += [" & ".join(_latex_cell(c) for c in row) + r" \\" for row in table.rows]
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


CSV_COLUMNS = ["selection", "oracle", "dataset", "average_kind", "metric", "row", "method", "predictor", "primary",
               "config_hash", "n", "mean_pct", "std_pct", "best", "diff_vs_erm_pct", "p_vs_erm"]


def csv_frame(board: Leaderboard) -> pd.DataFrame:
    """Tidy leaderboard: one row per (metric, dataset, row); percentages rounded to 4 decimals."""
    order = {row: i for i, row in enumerate(board.rows["row"])}
    metric_order = {name: i for i, name in enumerate(METRIC_NAMES.values())}
    cells = board.cells.assign(
        _metric=board.cells["metric"].map(metric_order), _row=board.cells["row"].map(order)
    ).sort_values(["_metric", "dataset", "_row"])
    frame = pd.DataFrame({
        "selection": f"{board.rule} (ORACLE)" if board.oracle else board.rule,
        "oracle": board.oracle,
        "dataset": cells["dataset"],
        "average_kind": cells["average_kind"],
        "metric": cells["metric"],
        "row": cells["row"],
        "method": cells["method"],
        "predictor": cells["predictor"],
        "primary": cells["is_primary"],
        "config_hash": cells["config_hash"],
        "n": cells["n"],
        "mean_pct": cells["mean"].round(4),
        "std_pct": cells["std"].round(4),
        "best": cells["best"],
        "diff_vs_erm_pct": cells["diff_vs_erm"].round(4),
        "p_vs_erm": cells["p_vs_erm"].map(lambda p: float(f"{p:.4g}") if not np.isnan(p) else np.nan),
    })
    return frame[CSV_COLUMNS].reset_index(drop=True)


def to_csv(board: Leaderboard) -> str:
    """The tidy leaderboard as CSV; an oracle report says so in its ``selection``/``oracle`` columns."""
    return csv_frame(board).to_csv(index=False, lineterminator="\n")


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = []
    for row in table.rows:
        cells = []
        for cell in row:
            main = html.escape(cell.main)
            if cell.bold:
                main = f"<b>{main}</b>"
            cells.append(f"<td>{main} {html.escape(cell.suffix)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = html.escape(" ".join(table.notes)).replace("`", "")
    return (f"<h2>{html.escape(table.title)}</h2>\n<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
            + "\n".join(body) + f"\n</tbody>\n</table>\n<p class=\"note\">{notes}</p>")


def to_html(board: Leaderboard, pngs: Sequence[Path] = ()) -> str:
    """One self-contained page: the tables and every PNG embedded as base64."""
    title = "Leaderboard" + (" — ORACLE test selection" if board.oracle else "")
    intro = [html.escape(line.replace("`", "").replace("**", "")) for line in
             _header_lines(board) + _selection_lines(board)]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:0.5em 0}th,td{border-bottom:1px solid #ccc;padding:4px 10px;"
        "text-align:center}td:first-child,th:first-child{text-align:left}.note{color:#444;font-size:90%}"
        "img{max-width:100%;border:1px solid #eee;margin:0.5em 0}.oracle{color:#b00;font-weight:bold}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if board.oracle:
        parts.append(f'<p class="oracle">{html.escape(ORACLE_MARK)}</p>')
    parts += [f"<p>{line}</p>" for line in intro]
    parts += [_html_table(table) for table in build_tables(board)]
    if pngs:
        parts.append("<h2>Plots</h2>")
    for png in pngs:
        encoded = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        parts.append(f'<figure><img alt="{html.escape(Path(png).stem)}" src="data:image/png;base64,{encoded}">'
                     f"<figcaption>{html.escape(Path(png).name)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# Files and command line


def skipped_frame(issues: Sequence[RunIssue]) -> pd.DataFrame:
    return pd.DataFrame([{"path": i.path, "state": i.state, "reason": i.reason} for i in issues],
                        columns=["path", "state", "reason"])


def write_report(board: Leaderboard, folder: Path, with_html: bool = False, with_plots: bool = True) -> list[Path]:
    """Write leaderboard.{md,tex,csv}, skipped_runs.csv, the plots (PNG + PDF) and optionally report.html."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("leaderboard.md", to_markdown(board)), ("leaderboard.tex", to_latex(board)),
                       ("leaderboard.csv", to_csv(board))):
        (folder / name).write_text(text)
        written.append(folder / name)
    skipped = folder / "skipped_runs.csv"
    skipped_frame(board.issues).to_csv(skipped, index=False, lineterminator="\n")
    written.append(skipped)
    pngs: list[Path] = []
    if with_plots:
        from bench.plots import write_plots

        figures = write_plots(board, folder / "plots")
        written += figures
        pngs = [p for p in figures if p.suffix == ".png"]
    if with_html:
        (folder / "report.html").write_text(to_html(board, pngs))
        written.append(folder / "report.html")
    return written


def _print_issues(issues: Sequence[RunIssue], limit: int = 20) -> None:
    if not issues:
        return
    for issue in issues[:limit]:
        print(f"skipped {issue.state} run {issue.path}: {issue.reason}", file=sys.stderr)
    if len(issues) > limit:
        print(f"... and {len(issues) - limit} more skipped runs (all listed in skipped_runs.csv)", file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> int:
    results = load_results(args.results)
    _print_issues(results.issues)
    board = aggregate(results, args.select, primary_only=args.primary_only)
    renderers = {"markdown": to_markdown, "latex": to_latex, "csv": to_csv}
    sys.stdout.write(renderers[args.format](board))
    if not args.no_files:
        folder = Path(args.output) if args.output else Path(args.results) / f"report-{args.select}"
        try:
            write_report(board, folder, with_html=args.html, with_plots=not args.no_plots)
        except OSError as error:
            raise BenchError(f"cannot write the report to {folder} ({error.strerror}); choose --output") from None
        print(f"report written to {folder}", file=sys.stderr)
    return 0


def register(subparsers: dict[str, Any]) -> dict[str, Any]:
    """Add ``bench report`` (see bench/cli.py, COMMAND_MODULES)."""
    parser = subparsers["top"].add_parser(
        "report", help="leaderboard tables and plots from a results folder",
        description="Aggregate every finished run under a results folder into leaderboard tables (printed) and "
                    "write them with plots to --output (default RESULTS/report-RULE).",
    )
    parser.add_argument("results", nargs="?", default="results", help="results folder (default: results/)")
    parser.add_argument("--select", default=DEFAULT_RULE, choices=list(RULES),
                        help=f"model selection rule (default {DEFAULT_RULE}); oracle-test is an upper bound, marked "
                             "as such everywhere")
    parser.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv"],
                        help="format printed to stdout (default markdown); the files hold all three")
    parser.add_argument("--output", help="folder for tables, plots and HTML (default: RESULTS/report-RULE)")
    parser.add_argument("--html", action="store_true", help="also write one self-contained report.html")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    parser.add_argument("--no-files", action="store_true", help="print the table only, write nothing")
    parser.add_argument("--primary-only", action="store_true",
                        help="leave out the secondary models of multi-model methods (ULE's student, LfF's biased)")
    return {"report": cmd_report}
