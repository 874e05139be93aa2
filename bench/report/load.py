"""Reading a results folder: every finished run's records, checked, as one evaluation table.

:func:`load_results` walks a folder, :func:`load_runs` reads given run folders (``bench run``'s
table); both read every run with plain :mod:`json`, count (and skip) failed, unfinished, corrupt and
duplicate runs, and compute every metric of every evaluation of every predictor with
:mod:`.evaluations`.
"""

from __future__ import annotations

import gc
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.core import metrics
from bench.core.errors import BenchError
from bench.core.metrics import AVERAGE_LABELS, GroupStructure, metric_set_problem
from bench.core.records import CONFIG_FILE, FAILED_FILE, FINAL_FILE, METRICS_FILE
from bench.report.evaluations import evaluation_columns, split_columns

_SEED_DIR = re.compile(r"seed\d+$")
_RUN_FILES = (CONFIG_FILE, METRICS_FILE, FINAL_FILE, FAILED_FILE)

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
        raise CorruptRecord(f"{METRICS_FILE}: missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CorruptRecord(f"{METRICS_FILE}: cannot be read ({error})") from None
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
            raise CorruptRecord(f"{METRICS_FILE} line {number}: not valid JSON (truncated?)") from None
        if not isinstance(record, dict):
            raise CorruptRecord(f"{METRICS_FILE} line {number}: not a JSON object")
    raise CorruptRecord(f"{METRICS_FILE}: not one JSON object per line")  # defensive: the loop above names the line


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
    if CONFIG_FILE not in names:
        raise CorruptRecord(f"{CONFIG_FILE}: missing")
    if METRICS_FILE not in names:
        raise CorruptRecord(f"{METRICS_FILE}: missing")
    config = _read_json(os.path.join(folder, CONFIG_FILE))
    for key in _RUN_FIELDS:
        _require(config, key, CONFIG_FILE)
    info = _require(config, "dataset_info", CONFIG_FILE)
    for key in ("n_classes", "attr_value_names", "average_kind", "group_counts"):
        _require(info, key, f"{CONFIG_FILE} dataset_info")
    _require(info["group_counts"], "train", f"{CONFIG_FILE} dataset_info.group_counts")
    for key, kind in (("seed", int), ("primary", str), ("method", str), ("dataset", str), ("config_hash", str),
                      ("hparams", dict)):
        if not isinstance(config[key], kind) or isinstance(config[key], bool):
            raise CorruptRecord(f"{CONFIG_FILE}: field {key!r} is not a {kind.__name__}")
    if not isinstance(info["n_classes"], int) or info["n_classes"] < 1:
        raise CorruptRecord(f"{CONFIG_FILE}: dataset_info.n_classes is not a positive integer")
    try:
        structure = GroupStructure.from_info(info)
        n_groups = structure.n_groups
    except (TypeError, ValueError) as error:
        raise CorruptRecord(f"{CONFIG_FILE}: malformed dataset_info ({error})") from None
    if len(structure.train_group_counts) != n_groups:
        raise CorruptRecord(f"{CONFIG_FILE}: dataset_info has {len(structure.train_group_counts)} train group counts "
                            f"for {n_groups} groups")
    if structure.average_kind not in AVERAGE_LABELS:
        raise CorruptRecord(f"{CONFIG_FILE}: unknown average_kind {structure.average_kind!r}")
    problem = metric_set_problem(structure.extra_metrics, n_groups)
    if problem:
        raise CorruptRecord(f"{CONFIG_FILE}: dataset_info.extra_metrics: {problem}")

    final = _read_json(os.path.join(folder, FINAL_FILE))
    records = _read_metric_lines(os.path.join(folder, METRICS_FILE))
    if not records:
        raise CorruptRecord(f"{METRICS_FILE}: no evaluation")
    expected = final.get("n_evaluations") if isinstance(final, dict) else None
    if isinstance(expected, int) and expected != len(records):
        raise CorruptRecord(f"{METRICS_FILE} has {len(records)} lines but {FINAL_FILE} says {expected} evaluations")

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
                raise CorruptRecord(f"{METRICS_FILE} line {position + 1}: counts are not lists of {n_groups} numbers")
        raise CorruptRecord(f"{METRICS_FILE}: counts are not numbers")
    if not np.isfinite(counts).all():
        raise CorruptRecord(f"{METRICS_FILE}: counts are not finite numbers")
    for split, offset in (("val", 0), ("test", 2)):
        bad = (counts[:, offset] < 0) | (counts[:, offset] > counts[:, offset + 1])
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise CorruptRecord(f"{METRICS_FILE} line {positions[row] + 1}: {predictors[row]} {split}: "
                                "a group has correct < 0 or correct > total")
    primary = config["primary"]
    if not any(primary in record["eval"] and s for record, s in zip(records, selectable)):
        raise CorruptRecord(f"{METRICS_FILE}: no selectable evaluation of the primary predictor {primary!r}")
    kept = {k: config[k] for k in _RUN_FIELDS}
    caveat = config.get("method_caveat")
    kept["method_caveat"] = caveat if isinstance(caveat, str) else ""
    return _RunData(path, kept, info, structure, list(range(len(records))), stages, epochs, selectable, widths,
                    predictors, counts)


_RUN_FIELDS = ("method", "dataset", "config_hash", "seed", "primary", "hparams")


def _diagnose_lines(records: list[dict[str, Any]]) -> None:
    """Raise CorruptRecord naming the first metrics line that lacks a field the report needs."""
    for position, record in enumerate(records):
        where = f"{METRICS_FILE} line {position + 1}"
        evaluation = _require(record, "eval", where)
        _require(record, "stage", where), _require(record, "epoch", where)
        if not isinstance(evaluation, dict) or not evaluation:
            raise CorruptRecord(f"{where}: 'eval' holds no predictor")
        for predictor, splits in evaluation.items():
            for split in ("val", "test"):
                counts = splits.get(split) if isinstance(splits, dict) else None
                if not isinstance(counts, dict) or "correct" not in counts or "total" not in counts:
                    raise CorruptRecord(f"{where}: {predictor} needs val and test 'correct'/'total' counts")
    raise CorruptRecord(f"{METRICS_FILE}: malformed evaluation records")


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
    return _without_gc(root, find_run_folders(root))


def load_runs(run_dirs: Sequence[str | Path], root: str | Path) -> Results:
    """The same for the given run folders only (``bench run``'s own runs); ``root`` names them in issues."""
    folders = []
    for path in run_dirs:
        names = set(os.listdir(path)) & set(_RUN_FILES) if os.path.isdir(path) else set()
        folders.append((Path(path), names))
    return _without_gc(Path(root), folders)


def _without_gc(root: Path, folders: list[tuple[Path, set[str]]]) -> Results:
    # Parsed JSON holds no reference cycles, yet millions of new containers would trigger the cyclic
    # garbage collector over and over (about 10% of the loading time); pause it while reading.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _load(root, folders)
    finally:
        if gc_was_enabled:
            gc.enable()


def _load(root: Path, folders: list[tuple[Path, set[str]]]) -> Results:
    issues: list[RunIssue] = []
    loaded: list[tuple[_RunData, int]] = []  # each run with the index of its dataset variant
    # A dataset is named by its name; if runs of one name disagree on the group structure (a custom
    # dataset read from two folders), each structure becomes its own column, "name [k]". Each run's
    # dataset_info is matched as soon as it is read, so that only one copy per variant stays in memory.
    variants: dict[str, list[tuple[dict[str, Any], dict[str, Any], GroupStructure]]] = {}
    for path, names in folders:
        if FINAL_FILE not in names:
            if FAILED_FILE in names:
                reason = "failed"
                try:
                    failure = _read_json(os.path.join(path, FAILED_FILE))
                    reason = f"{failure.get('error_type', 'error')}: {failure.get('reason', '')}".strip()
                except (CorruptRecord, AttributeError):
                    pass
                issues.append(RunIssue(str(path), "failed", reason))
            else:
                reason = f"no {FINAL_FILE} (still running, killed or resumable)"
                issues.append(RunIssue(str(path), "unfinished", reason))
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
            "hparams": config["hparams"], "method_caveat": config["method_caveat"],
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
        val = split_columns("val", counts[:, 0], counts[:, 1], structure)
        test = split_columns("test", counts[:, 2], counts[:, 3], structure)
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
        frames.append(frame)
        group_accuracies[label] = metrics.group_accuracies(counts[:, 2], counts[:, 3])
    columns = evaluation_columns(datasets[label]["structure"] for label in per_dataset)
    # A declared metric of one dataset is NaN in the rows of the others.
    evaluations = pd.concat(frames, ignore_index=True).reindex(columns=columns) if frames else pd.DataFrame(
        columns=columns)
    runs = pd.DataFrame(run_rows, columns=["run", "path", "dataset", "method", "config_hash", "seed", "primary",
                                           "hparams", "method_caveat"]).set_index("run", drop=False)
    return Results(root, runs, evaluations, group_accuracies, datasets, issues, len(folders))


