"""``bench report``: loading, selection, aggregation, tables (golden files), plots and the CLI.

The results folder of the golden tests is written by hand below: every group of every split has 10
examples, so each accuracy is ``correct / 10`` and the expected numbers can be checked by hand (the
comments do it for the cells the tests assert directly).

Regenerate the golden files after an intended change of the output with
``BENCH_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_report.py`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.cli import main
from bench.core.errors import ConfigError
from bench.core.metrics import GroupStructure, summarize
from bench.core.records import CONFIG_FILE, FAILED_FILE, FINAL_FILE, METRICS_FILE
from bench.core.selection import RULE_SPLITS, RULES, best_per_group, rule_scores, select
from bench.report.aggregate import aggregate, select_evaluations, welch_p_value
from bench.report.evaluations import EPOCH_SCORE
from bench.report.load import load_results
from bench.report.render import to_csv, to_html, to_latex, to_markdown, write_report

GOLDEN = Path(__file__).parent / "golden" / "report"
UPDATE_GOLDEN = os.environ.get("BENCH_UPDATE_GOLDEN") == "1"
TEN = 10  # examples per group in every val/test split below

BIRDS_INFO: dict[str, Any] = {
    "name": "toy-birds",
    "class_names": ["landbird", "waterbird"],
    "attr_names": ["place"],
    "attr_value_names": [["land", "water"]],
    "group_names": ["landbird/land", "landbird/water", "waterbird/land", "waterbird/water"],
    "n_classes": 2,
    "n_groups": 4,
    "average_kind": "train_weighted",
    # Training proportions 0.5, 0.1, 0.1, 0.3: the weights of the train-weighted average.
    "group_counts": {"train": [50, 10, 10, 30], "val": [TEN] * 4, "test": [TEN] * 4},
    "image_shape": [3, 8, 8],
}

# UrbanCars layout: g = 4*obj + 2*bg + co; a cue is aligned when it equals the object class.
CARS_INFO: dict[str, Any] = {
    "name": "toy-cars",
    "class_names": ["urban", "country"],
    "attr_names": ["bg", "co_occur_obj"],
    "attr_value_names": [["urban", "country"], ["urban", "country"]],
    "group_names": [f"{o}/{b}/{c}" for o in ("urban", "country") for b in ("urban", "country")
                    for c in ("urban", "country")],
    "n_classes": 2,
    "n_groups": 8,
    "average_kind": "urbancars_id",
    "group_counts": {"train": [361, 19, 19, 1, 1, 19, 19, 361], "val": [TEN] * 8, "test": [TEN] * 8},
    "image_shape": [3, 8, 8],
}


def counts(correct: list[int]) -> dict[str, list[int]]:
    return {"correct": list(correct), "total": [TEN] * len(correct)}


def evaluation(stage: str, epoch: int, predictors: dict[str, tuple[list[int], list[int]]],
               selectable: bool = True) -> dict[str, Any]:
    """One metrics.jsonl line; ``predictors[name] = (val correct, test correct)``."""
    return {
        "stage": stage, "stage_index": 0, "epoch": epoch, "selectable": selectable,
        "train": {"loss": 0.5}, "method": {},
        "eval": {name: {"val": counts(val), "test": counts(test)} for name, (val, test) in predictors.items()},
    }


def write_run(root: Path, info: dict[str, Any], method: str, config_hash: str, seed: int,
              evaluations: list[dict[str, Any]], primary: str = "model", state: str = "done",
              hparams: dict[str, Any] | None = None) -> Path:
    """A run folder as bench.runner writes it (state: done, failed or unfinished)."""
    folder = root / info["name"] / method / config_hash / f"seed{seed}"
    folder.mkdir(parents=True)
    config = {
        "method": method, "dataset": info["name"], "dataset_options": {}, "seed": seed,
        "config_hash": config_hash, "dataset_info": info, "primary": primary,
        "hparams": hparams or {"lr": 0.001, "epochs": len(evaluations)},
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    (folder / METRICS_FILE).write_text("".join(json.dumps(e) + "\n" for e in evaluations))
    if state == "done":
        (folder / FINAL_FILE).write_text(json.dumps({"status": "done", "n_evaluations": len(evaluations)}))
    elif state == "failed":
        (folder / FAILED_FILE).write_text(json.dumps({"status": "failed", "error_type": "NonFiniteLossError",
                                                 "reason": "loss = nan"}))
    return folder


def model(val: list[int], test: list[int]) -> dict[str, tuple[list[int], list[int]]]:
    return {"model": (val, test)}


def build_results(root: Path) -> Path:
    """The hand-made results folder of the golden tests (expected values worked out in comments)."""
    birds, cars = BIRDS_INFO, CARS_INFO
    # ERM on toy-birds, 3 seeds. val-worst-group picks (val wg in brackets):
    #   seed0: e2 (0.4 > 0.3) -> test [10,4,5,10]: wg 0.4, train-weighted .5+.04+.05+.3 = 0.89
    #   seed1: e1 (0.6 > 0.5) -> test [9,6,5,9]:   wg 0.5, .45+.06+.05+.27 = 0.83
    #   seed2: tie 0.4/0.4 -> earliest e1 -> test [9,4,4,8]: wg 0.4, .45+.04+.04+.24 = 0.77
    #   worst-group 43.3 ± 5.8 (n=3), average 83.0 ± 6.0 (n=3)
    erm = [
        [([9, 3, 4, 9], [10, 2, 3, 9]), ([9, 5, 4, 9], [10, 4, 5, 10])],
        [([9, 6, 6, 9], [9, 6, 5, 9]), ([10, 5, 5, 10], [10, 6, 6, 10])],
        [([8, 4, 5, 8], [9, 4, 4, 8]), ([8, 4, 5, 8], [10, 7, 7, 10])],
    ]
    for seed, epochs in enumerate(erm):
        write_run(root, birds, "erm", "e000000000", seed,
                  [evaluation("train", i + 1, model(*e)) for i, e in enumerate(epochs)])
    write_run(root, birds, "erm", "e000000000", 3, [evaluation("train", 1, model([9] * 4, [9] * 4))], state="failed")

    # JTT on toy-birds, two configurations, 2 seeds each; the identification stage is not selectable
    # (its perfect scores must never be picked).
    identify = evaluation("identify", 1, model([10] * 4, [10] * 4), selectable=False)
    # config a: seed0 picks upweight e1 (val wg 0.7): test wg 0.7, avg .45+.08+.07+.27 = 0.87
    #           seed1 picks upweight e2 (0.8):        test wg 0.8, avg .45+.08+.08+.27 = 0.88
    #           score (mean val wg) 0.75 -> chosen; worst-group 75.0 ± 7.1, average 87.5 ± 0.7
    jtt_a = [
        [([8, 7, 7, 8], [9, 8, 7, 9]), ([8, 6, 6, 8], [9, 9, 9, 9])],
        [([8, 6, 7, 8], [8, 6, 7, 8]), ([9, 8, 8, 9], [9, 8, 8, 9])],
    ]
    # config b: val wg 0.5 at both epochs (tie -> e1), score 0.5 -> not chosen (but its test wg 0.9
    # makes it the oracle's choice).
    jtt_b = [[([9, 5, 5, 9], [10, 9, 9, 10]), ([9, 6, 5, 9], [10, 9, 9, 10])]] * 2
    for config_hash, runs, lr in (("aaaaaaaaaa", jtt_a, 0.001), ("bbbbbbbbbb", jtt_b, 0.01)):
        for seed, epochs in enumerate(runs):
            write_run(root, birds, "jtt", config_hash, seed,
                      [identify] + [evaluation("upweight", i + 1, model(*e)) for i, e in enumerate(epochs)],
                      hparams={"lr": lr, "epochs": 2, "upweight": 20})
    write_run(root, birds, "jtt", "aaaaaaaaaa", 2, [identify], state="unfinished")

    # ULE on toy-birds: teacher (primary) and student.
    #   seed0: teacher e2 (0.8): test [10,9,8,10] wg 0.8, avg .5+.09+.08+.3 = 0.97;
    #          student e2 (0.6): test [9,7,6,9]   wg 0.6, avg .45+.07+.06+.27 = 0.85
    #   seed1: teacher e1 (0.8): test [10,9,9,10] wg 0.9, avg 0.98; student e1 (0.7): [8,7,7,8] wg 0.7, avg 0.78
    #   teacher: worst-group 85.0 ± 7.1 (best), average 97.5 ± 0.7 (best); student 65.0 ± 7.1, 81.5 ± 4.9
    ule = [
        [{"teacher": ([9, 7, 8, 9], [9, 8, 8, 9]), "student": ([9, 5, 6, 9], [9, 6, 6, 9])},
         {"teacher": ([9, 8, 8, 9], [10, 9, 8, 10]), "student": ([9, 6, 6, 9], [9, 7, 6, 9])}],
        [{"teacher": ([9, 9, 8, 9], [10, 9, 9, 10]), "student": ([8, 7, 7, 8], [8, 7, 7, 8])},
         {"teacher": ([9, 7, 8, 9], [9, 7, 8, 9]), "student": ([8, 6, 7, 8], [8, 6, 6, 8])}],
    ]
    for seed, epochs in enumerate(ule):
        write_run(root, birds, "ule", "uuuuuuuuuu", seed,
                  [evaluation("train", i + 1, e) for i, e in enumerate(epochs)], primary="teacher")

    # toy-cars (UrbanCars metrics), one evaluation per run, val = test.
    #   ERM seed0 test [10,8,6,2,2,6,8,10]: A(both aligned) 1.0, A(co conflict) .8, A(bg conflict) .6,
    #     A(both conflict) .2; I.D. = .9025 + .8*.0475 + .6*.0475 + .2*.0025 = 0.9695;
    #     BG gap .6-.9695 = -0.3695, CoObj gap -0.1695, BG+CoObj gap -0.7695; worst-group 0.2
    #   ERM seed1 test [10,9,7,3,3,7,9,10]: I.D. 0.97925; gaps -0.27925, -0.07925, -0.67925; worst-group 0.3
    #   -> I.D. 97.4 ± 0.7, BG Gap -32.4 ± 6.4, CoObj Gap -12.4 ± 6.4, BG+CoObj -72.4 ± 6.4
    #   ULE seed0 teacher [10,9,8,6,6,8,9,10]: I.D. .9025+.9*.0475+.8*.0475+.6*.0025 = 0.98475, worst-group 0.6
    for seed, test in enumerate(([10, 8, 6, 2, 2, 6, 8, 10], [10, 9, 7, 3, 3, 7, 9, 10])):
        write_run(root, cars, "erm", "c000000000", seed, [evaluation("train", 1, model(test, test))])
    write_run(root, cars, "ule", "cuuuuuuuuu", 0, [evaluation("train", 1, {
        "teacher": ([10, 9, 8, 6, 6, 8, 9, 10], [10, 9, 8, 6, 6, 8, 9, 10]),
        "student": ([9, 8, 7, 5, 5, 7, 8, 9], [9, 8, 7, 5, 5, 7, 8, 9]),
    })], primary="teacher")
    return root


@pytest.fixture(scope="module")
def results_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_results(tmp_path_factory.mktemp("report") / "results")


@pytest.fixture(scope="module")
def board(results_root: Path):  # type: ignore[no-untyped-def]
    return aggregate(load_results(results_root), "val-worst-group")


def cell(board, metric: str, dataset: str, row: str):  # type: ignore[no-untyped-def]
    found = board.cells[(board.cells["metric"] == metric) & (board.cells["dataset"] == dataset)
                        & (board.cells["row"] == row)]
    assert len(found) == 1
    return SimpleNamespace(**found.iloc[0].to_dict())


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing; generate it with BENCH_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden file (BENCH_UPDATE_GOLDEN=1 to accept)"


# --------------------------------------------------------------------------------------------
# Numbers checked by hand


def test_report_starts_without_torch() -> None:
    # `bench report` must not pay torch's import (seconds, hundreds of MB) to read JSON files.
    code = "import sys, bench.cli, bench.report.cli, bench.report.plots; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_counts_failed_and_unfinished_runs(board) -> None:  # type: ignore[no-untyped-def]
    assert board.counts == {"found": 14, "used": 12, "failed": 1, "unfinished": 1, "corrupt": 0, "duplicate": 0}
    states = {Path(i.path).relative_to(board.root).as_posix(): i.state for i in board.issues}
    assert states == {"toy-birds/erm/e000000000/seed3": "failed", "toy-birds/jtt/aaaaaaaaaa/seed2": "unfinished"}
    # The markdown wraps its text at 100 columns: compare with the line breaks undone.
    flat = " ".join(to_markdown(board).split())
    assert "14 run folders, 12 finished runs used; skipped 1 failed, 1 unfinished." in flat


def test_hand_checked_cells(board) -> None:  # type: ignore[no-untyped-def]
    erm = cell(board, "worst_group_accuracy", "toy-birds", "erm")
    assert (erm.n, erm.mean) == (3, pytest.approx(130 / 3))
    assert erm.std == pytest.approx(np.std([40, 50, 40], ddof=1))  # sample std
    assert cell(board, "average_accuracy", "toy-birds", "erm").mean == pytest.approx(83.0)
    jtt = cell(board, "worst_group_accuracy", "toy-birds", "jtt")
    assert (jtt.config_hash, jtt.mean) == ("aaaaaaaaaa", pytest.approx(75.0))
    assert cell(board, "average_accuracy", "toy-birds", "jtt").mean == pytest.approx(87.5)
    teacher = cell(board, "worst_group_accuracy", "toy-birds", "ule")
    student = cell(board, "worst_group_accuracy", "toy-birds", "ule (student)")
    assert (teacher.mean, teacher.best, student.mean, student.best) == (pytest.approx(85.0), True,
                                                                        pytest.approx(65.0), False)
    assert not erm.best and not jtt.best
    assert cell(board, "average_accuracy", "toy-birds", "ule (student)").mean == pytest.approx(81.5)
    assert cell(board, "id_acc", "toy-cars", "erm").mean == pytest.approx(100 * (0.9695 + 0.97925) / 2)
    assert cell(board, "bg_gap", "toy-cars", "erm").mean == pytest.approx(100 * (-0.3695 - 0.27925) / 2)
    assert cell(board, "coobj_gap", "toy-cars", "erm").mean == pytest.approx(100 * (-0.1695 - 0.07925) / 2)
    assert cell(board, "bg_coobj_gap", "toy-cars", "erm").mean == pytest.approx(100 * (-0.7695 - 0.67925) / 2)
    ule_cars = cell(board, "id_acc", "toy-cars", "ule")
    assert (ule_cars.n, ule_cars.mean, ule_cars.best) == (1, pytest.approx(98.475), True)
    # Gaps: best is the one closest to 0, here ULE's (-18.5 vs ERM's -32.4).
    assert cell(board, "bg_gap", "toy-cars", "ule").best and not cell(board, "bg_gap", "toy-cars", "erm").best


def test_welch_t_test_against_erm(board) -> None:  # type: ignore[no-untyped-def]
    from scipy import stats

    jtt = cell(board, "worst_group_accuracy", "toy-birds", "jtt")
    expected = stats.ttest_ind([70, 80], [40, 50, 40], equal_var=False).pvalue
    assert jtt.p_vs_erm == pytest.approx(expected) and jtt.diff_vs_erm == pytest.approx(75 - 130 / 3)
    assert np.isnan(cell(board, "worst_group_accuracy", "toy-birds", "erm").p_vs_erm)  # the reference
    assert np.isnan(cell(board, "worst_group_accuracy", "toy-cars", "ule").p_vs_erm)  # one seed
    assert np.isnan(welch_p_value([0.5, 0.5], [0.4, 0.4]))  # no spread at all: undefined
    assert np.isnan(welch_p_value([0.5, 0.6], [0.4]))


def test_configuration_choice_follows_the_rule(results_root: Path) -> None:
    results = load_results(results_root)
    chosen = {rule: aggregate(results, rule).configs.set_index(["dataset", "method"])["config_hash"]
              for rule in ("val-worst-group", "oracle-test", "last")}
    assert chosen["val-worst-group"][("toy-birds", "jtt")] == "aaaaaaaaaa"
    assert chosen["oracle-test"][("toy-birds", "jtt")] == "bbbbbbbbbb"  # test wg 0.9
    assert chosen["last"][("toy-birds", "jtt")] == "aaaaaaaaaa"  # val wg at the last epoch: 0.7 vs 0.55
    configs = aggregate(results, "val-worst-group").configs.set_index(["dataset", "method"])
    assert configs.loc[("toy-birds", "jtt"), "n_configs"] == 2
    assert configs.loc[("toy-birds", "jtt"), "varying"] == "lr=0.001"


def test_primary_only_drops_secondary_rows(results_root: Path) -> None:
    board = aggregate(load_results(results_root), primary_only=True)
    assert list(board.rows["row"]) == ["erm", "jtt", "ule"]


# --------------------------------------------------------------------------------------------
# Golden tables


def _named(board):  # type: ignore[no-untyped-def]
    # The report names its results folder relative to the working directory, and wraps its text
    # at 100 columns: a fixed name keeps the golden files independent of the temporary folder.
    return dataclasses.replace(board, root="RESULTS")


@pytest.mark.parametrize("name,render", [("leaderboard.md", to_markdown), ("leaderboard.tex", to_latex),
                                         ("leaderboard.csv", to_csv)])
def test_golden_tables(board, name: str, render) -> None:  # type: ignore[no-untyped-def]
    check_golden(name, render(_named(board)))


def test_golden_oracle_markdown_is_marked(results_root: Path) -> None:
    board = aggregate(load_results(results_root), "oracle-test")
    markdown = to_markdown(_named(board))
    check_golden("leaderboard_oracle-test.md", markdown)
    for text in (markdown, to_latex(board), to_csv(board), to_html(board)):
        assert "ORACLE" in text
    assert all("[ORACLE test selection]" in line for line in markdown.splitlines() if line.startswith("## "))
    assert all(line.startswith("oracle-test (ORACLE),True,") for line in to_csv(board).splitlines()[1:])


# --------------------------------------------------------------------------------------------
# Selection rules


def _rule_records() -> list[dict[str, Any]]:
    """Plain-average 4-group records where every rule picks a different evaluation.

    position 0: not selectable, best at everything (never picked)
    position 1: val [6,6,6,6]   wg .6 (best)   avg .6     worst-class .6
    position 2: val [10,10,10,3] wg .3          avg .825 (best)  classes 1.0/.65 -> .65
    position 3: val [8,8,4,10]  wg .4          avg .75    classes .8/.7 -> .7 (best)
    position 4: val [5,5,5,5]   wg .5          avg .5     .5; test [9,9,9,9] (best test wg)
    position 5: val [1,1,1,1]   (the last)
    """
    test_low = [2, 2, 2, 2]
    return [
        evaluation("warmup", 1, model([10] * 4, [10] * 4), selectable=False),
        evaluation("train", 1, model([6, 6, 6, 6], test_low)),
        evaluation("train", 2, model([10, 10, 10, 3], test_low)),
        evaluation("train", 3, model([8, 8, 4, 10], test_low)),
        evaluation("train", 4, model([5, 5, 5, 5], [9, 9, 9, 9])),
        evaluation("train", 5, model([1, 1, 1, 1], test_low)),
    ]


def test_each_rule_picks_its_own_epoch(tmp_path: Path) -> None:
    info = {**BIRDS_INFO, "name": "toy-plain", "average_kind": "plain"}
    evaluations = _rule_records()
    write_run(tmp_path, info, "erm", "r000000000", 0, evaluations)
    results = load_results(tmp_path)
    structure = GroupStructure.from_info(info)
    expected = {"val-worst-group": 1, "val-avg": 2, "val-worst-class": 3, "oracle-test": 4, "last": 5}
    assert set(expected) == set(RULES)
    for rule, position in expected.items():
        picked = select_evaluations(results.evaluations, rule)
        assert list(picked["position"]) == [position], rule
        assert select(evaluations, "model", structure, rule) == position, rule  # the core agrees


STRUCTURES = {
    "plain": {**BIRDS_INFO, "name": "r-plain", "average_kind": "plain"},
    "train_weighted": {**BIRDS_INFO, "name": "r-weighted"},
    "group_mean": {**BIRDS_INFO, "name": "r-mean", "average_kind": "group_mean"},
    "urbancars_id": {**CARS_INFO, "name": "r-cars"},
    "three_classes": {
        **BIRDS_INFO, "name": "r-three", "average_kind": "group_mean", "class_names": ["a", "b", "c"],
        "attr_value_names": [["x", "y"]], "n_classes": 3, "n_groups": 6,
        "group_names": ["a/x", "a/y", "b/x", "b/y", "c/x", "c/y"],
        "group_counts": {"train": [30, 3, 3, 30, 30, 0]},
    },
}


def _random_counts(rng: np.random.Generator, n_groups: int) -> dict[str, list[int]]:
    total = rng.integers(0, 4, size=n_groups)  # small totals: many ties, some empty groups
    total[rng.integers(n_groups)] += 1  # at least one example
    correct = rng.binomial(total, 0.6)
    return {"correct": correct.tolist(), "total": total.tolist()}


def test_evaluation_table_and_selection_follow_the_records(tmp_path: Path) -> None:
    """Every row of the evaluation table holds the metrics of its own record (run, line, predictor,
    split), and each rule picks, per (run, predictor), the line :func:`bench.core.selection.select` picks
    from that run's records: the loader's stacking of all runs' counts and the grouped pick lose no
    row and mix up none. Computed the slow way: one core call per record, one select() per run."""
    rng = np.random.default_rng(0)
    written: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for info in STRUCTURES.values():
        for seed in range(6):
            lines = []
            for position in range(int(rng.integers(1, 7))):
                predictors = ["teacher", "student"] if seed % 2 else ["teacher"]
                lines.append({
                    "stage": "s", "epoch": position + 1, "selectable": bool(position == 0 or rng.random() < 0.8),
                    "eval": {p: {s: _random_counts(rng, info["n_groups"]) for s in ("val", "test")}
                             for p in predictors},
                })
            lines[-1]["selectable"] = True
            write_run(tmp_path, info, "m", "h", seed, lines, primary="teacher")
            written[(info["name"], seed)] = lines
    results = load_results(tmp_path)
    assert results.issues == []
    runs = results.runs.set_index("run")
    evaluations = results.evaluations
    assert len(evaluations) == sum(len(line["eval"]) for lines in written.values() for line in lines)
    # The records exercise what selection must get right: undefined (NaN) scores, ties, unselectable lines.
    assert evaluations["val_average"].isna().any() and not evaluations["selectable"].all()
    assert evaluations.duplicated(["run", "predictor", "val_worst_group"]).any()
    for row in evaluations.itertuples(index=False):
        info = results.datasets[row.dataset]["info"]
        record = written[(row.dataset, int(runs.at[row.run, "seed"]))][row.position]["eval"][row.predictor]
        structure = GroupStructure.from_info(info)
        expected = {split: summarize(record[split]["correct"], record[split]["total"], structure)
                    for split in ("val", "test")}
        for split in ("val", "test"):
            for column, key in (("worst_group", "worst_group_accuracy"), ("average", "average_accuracy"),
                                ("worst_class", "worst_class_accuracy")):
                # Exact: a batch gives bit for bit what one call per split gives (NaN equal to NaN).
                np.testing.assert_array_equal(getattr(row, f"{split}_{column}"), expected[split][key])
        for key in ("id_acc", "bg_gap", "coobj_gap", "bg_coobj_gap"):
            np.testing.assert_array_equal(getattr(row, f"test_{key}"), expected["test"].get(key, np.nan))
        np.testing.assert_array_equal(results.group_accuracies[row.dataset][row.ga_row],
                                      [np.nan if a is None else a for a in expected["test"]["group_accuracies"]])
    for rule in RULES:
        picked = select_evaluations(evaluations, rule)
        assert len(picked) == evaluations.groupby(["run", "predictor"]).ngroups
        for row in picked.itertuples(index=False):
            info = results.datasets[row.dataset]["info"]
            lines = written[(row.dataset, int(runs.at[row.run, "seed"]))]
            assert row.position == select(lines, row.predictor, GroupStructure.from_info(info), rule), rule


def test_rule_scores_and_the_pick() -> None:
    structure = GroupStructure.from_info({**BIRDS_INFO, "average_kind": "plain"})
    correct, total = [[6, 6, 6, 6], [10, 10, 10, 3], [8, 8, 4, 10]], [[TEN] * 4] * 3
    np.testing.assert_allclose(rule_scores(correct, total, structure, "val-worst-group"), [0.6, 0.3, 0.4])
    np.testing.assert_allclose(rule_scores(correct, total, structure, "val-avg"), [0.6, 0.825, 0.75])
    np.testing.assert_allclose(rule_scores(correct, total, structure, "val-worst-class"), [0.6, 0.65, 0.7])
    assert rule_scores(correct[1], total[1], structure, "oracle-test") == pytest.approx(0.3)  # one split: a float
    with pytest.raises(ValueError, match="no score"):
        rule_scores(correct, total, structure, "last")
    with pytest.raises(ConfigError):
        rule_scores(correct, total, structure, "best-test")
    # NaN counts as -inf, ties go to the earliest row, an all-NaN group picks its first row; groups
    # need not be contiguous and come back in increasing order.
    scores = [0.5, np.nan, 0.7, 0.2, 0.7, np.nan, np.nan, 0.1]
    groups = [3, 3, 3, 1, 3, 2, 2, 1]
    assert best_per_group(scores, groups).tolist() == [3, 5, 2]
    # The report stores each rule's score in one column of its evaluation table, named by the split scored.
    assert set(EPOCH_SCORE) == set(RULE_SPLITS) == set(RULES)
    for rule, split in RULE_SPLITS.items():
        assert (EPOCH_SCORE[rule] is None) == (split is None)
        assert split is None or EPOCH_SCORE[rule].startswith(f"{split}_")


def test_a_split_without_examples_has_no_metrics_and_is_not_picked(tmp_path: Path) -> None:
    # Hand-made records (the trainer cannot finish such a run): line 1's validation split is empty.
    empty = {"correct": [0] * 4, "total": [0] * 4}
    lines = [evaluation("train", 1, model([5, 5, 5, 5], [6] * 4)), evaluation("train", 2, model([9] * 4, [7] * 4)),
             evaluation("train", 3, model([4, 4, 4, 4], [8] * 4))]
    lines[1]["eval"]["model"]["val"] = empty
    write_run(tmp_path, BIRDS_INFO, "erm", "n000000000", 0, lines)
    results = load_results(tmp_path)
    table = results.evaluations.set_index("position")
    assert table.loc[1, ["val_worst_group", "val_average", "val_worst_class"]].isna().all()
    assert table.loc[1, "test_worst_group"] == pytest.approx(0.7)
    for rule, position in (("val-worst-group", 0), ("val-avg", 0), ("last", 2), ("oracle-test", 2)):
        assert list(select_evaluations(results.evaluations, rule)["position"]) == [position], rule
    # bench.core.selection refuses to score a split without examples; the report leaves it out instead.
    with pytest.raises(ValueError, match="no group has any example"):
        select(lines, "model", GroupStructure.from_info(BIRDS_INFO), "val-worst-group")


# --------------------------------------------------------------------------------------------
# Damaged records


def test_corrupted_records_are_reported_and_skipped(tmp_path: Path) -> None:
    good = [evaluation("train", 1, model([5] * 4, [6] * 4))]
    write_run(tmp_path, BIRDS_INFO, "erm", "good000000", 0, good)

    def damaged(seed: int, evaluations: list[dict[str, Any]] | None = None, **kwargs: Any) -> Path:
        return write_run(tmp_path, BIRDS_INFO, "erm", "bad0000000", seed, evaluations or good, **kwargs)

    folder = damaged(0)  # truncated config.json
    (folder / CONFIG_FILE).write_text((folder / CONFIG_FILE).read_text()[:100])
    folder = damaged(1, good * 3)  # torn last line of metrics.jsonl
    text = (folder / METRICS_FILE).read_text()
    (folder / METRICS_FILE).write_text(text[: len(text) - 40])
    damaged(2, [{k: v for k, v in good[0].items() if k != "eval"}])  # a line without "eval"
    folder = damaged(3)  # config.json without "primary"
    config = json.loads((folder / CONFIG_FILE).read_text())
    del config["primary"]
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    damaged(4, [evaluation("train", 1, model([5] * 3, [6] * 3))])  # 3 counts for 4 groups
    damaged(5, [evaluation("train", 1, model([11, 5, 5, 5], [6] * 4))])  # correct > total
    folder = damaged(6)  # truncated final.json
    (folder / FINAL_FILE).write_text('{"status": "do')
    damaged(7, primary="teacher")  # the primary predictor was never evaluated
    folder = damaged(8, good * 2)  # a damaged line in the middle
    lines = (folder / METRICS_FILE).read_text().split("\n")
    (folder / METRICS_FILE).write_text(lines[0][:30] + "\n" + lines[1] + "\n")

    results = load_results(tmp_path)
    reasons = {int(Path(i.path).name.removeprefix("seed")): i.reason for i in results.issues
               if i.state == "corrupt"}
    assert sorted(reasons) == list(range(9))
    assert "config.json: not valid JSON" in reasons[0]
    assert "metrics.jsonl line 3: not valid JSON" in reasons[1]
    assert "missing field 'eval'" in reasons[2]
    assert "missing field 'primary'" in reasons[3]
    assert "4 numbers" in reasons[4]
    assert "correct > total" in reasons[5]
    assert "final.json: not valid JSON" in reasons[6]
    assert "primary predictor 'teacher'" in reasons[7]
    assert "metrics.jsonl line 1: not valid JSON" in reasons[8]
    board = aggregate(results)
    assert board.counts["corrupt"] == 9 and board.counts["used"] == 1
    assert "skipped 9 corrupt" in to_markdown(board)


def test_same_name_different_groups_become_separate_columns(tmp_path: Path) -> None:
    # Two custom datasets (different folders, different group counts) both called "custom".
    first = {**BIRDS_INFO, "name": "custom"}
    second = {**BIRDS_INFO, "name": "custom", "group_counts": {"train": [5, 5, 5, 5]}}
    write_run(tmp_path / "a", first, "erm", "x000000000", 0, [evaluation("train", 1, model([5] * 4, [6] * 4))])
    write_run(tmp_path / "b", second, "erm", "y000000000", 0, [evaluation("train", 1, model([5] * 4, [7] * 4))])
    board = aggregate(load_results(tmp_path))
    assert board.datasets == ["custom [1]", "custom [2]"]
    assert cell(board, "worst_group_accuracy", "custom [2]", "erm").mean == pytest.approx(70.0)


def test_duplicate_runs_are_counted_once(tmp_path: Path) -> None:
    for copy in ("a", "b"):
        write_run(tmp_path / copy, BIRDS_INFO, "erm", "d000000000", 0, [evaluation("train", 1, model([5] * 4,
                                                                                                      [6] * 4))])
    results = load_results(tmp_path)
    assert len(results.runs) == 1 and [i.state for i in results.issues] == ["duplicate"]


# --------------------------------------------------------------------------------------------
# Files, plots and the command line


def test_report_files_and_plots(board, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    written = write_report(board, tmp_path / "out", with_html=True)
    names = {p.relative_to(tmp_path / "out").as_posix() for p in written}
    expected_plots = ["accuracy_bars", "group_heatmap_toy-birds", "group_heatmap_toy-cars", "val_curves_toy-birds",
                      "val_curves_toy-cars", "student_teacher_toy-birds_ule", "student_teacher_toy-cars_ule"]
    assert {f"plots/{p}.{ext}" for p in expected_plots for ext in ("png", "pdf")} <= names
    assert {"leaderboard.md", "leaderboard.tex", "leaderboard.csv", "skipped_runs.csv", "report.html"} <= names
    for path in written:
        assert path.stat().st_size > 0, path
        if path.suffix == ".png":
            with Image.open(path) as image:
                assert image.width > 300 and image.height > 200
                assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something is drawn
        if path.suffix == ".pdf":
            assert path.read_bytes().startswith(b"%PDF")
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(expected_plots)
    assert "<b>85.0 ± 7.1</b>" in page and 'src="http' not in page


def test_cli_report(results_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["report", str(results_root), "--output", str(out), "--format", "csv", "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("selection,oracle,dataset,")
    assert "skipped failed run" in captured.err and "skipped unfinished run" in captured.err
    assert (out / "leaderboard.tex").exists() and not (out / "plots").exists()
    assert main(["report", str(results_root), "--no-files", "--select", "val-worst-class"]) == 0
    assert "Model selection `val-worst-class`" in capsys.readouterr().out


def test_cli_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such results folder" in capsys.readouterr().err
    write_run(tmp_path, BIRDS_INFO, "erm", "f000000000", 0, [], state="failed")
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished run to report (1 failed" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Collapsed models


def test_predicts_one_class_flags_a_constant_model_not_a_shortcut() -> None:
    from bench.core.metrics import predicts_one_class

    structure = GroupStructure.from_info(BIRDS_INFO)  # groups 2y + place
    total = [TEN] * 4
    assert predicts_one_class([TEN, TEN, 0, 0], total, structure)  # always "landbird"
    assert predicts_one_class([0, 1, TEN, TEN], total, structure)  # 5% of landbirds right: within the margin
    assert predicts_one_class([0, 2, TEN, TEN], total, structure) is False  # 10%: it tells landbirds apart
    assert predicts_one_class([0, 0, 9, 10], [TEN, 30, TEN, TEN], structure)  # 95% one class
    # A shortcut on a split where the place is independent of the class: half of each class right.
    assert predicts_one_class([TEN, 0, 0, TEN], total, structure) is False
    batch = predicts_one_class([[TEN, TEN, 0, 0], [TEN, 0, 0, TEN]], [total, total], structure)
    assert batch.tolist() == [True, False]


def test_a_model_collapsed_in_every_evaluation_is_named_by_report_and_run(tmp_path: Path, capsys) -> None:
    root = tmp_path / "results"
    collapsed = [evaluation("train", e, {"teacher": ([TEN, TEN, 0, 0], [TEN, TEN, 0, 0]),
                                         "student": ([9, 2, 3, 9], [9, 2, 3, 9])}) for e in (1, 2)]
    # Collapsed in the first evaluation only: it learned afterwards, no warning.
    recovered = [evaluation("train", 1, {"teacher": ([TEN, TEN, 0, 0], [TEN, TEN, 0, 0]),
                                         "student": ([9, 2, 3, 9], [9, 2, 3, 9])}),
                 evaluation("train", 2, {"teacher": ([8, 4, 5, 8], [8, 4, 5, 8]),
                                         "student": ([9, 2, 3, 9], [9, 2, 3, 9])})]
    dead = write_run(root, BIRDS_INFO, "ule", "u000000000", 0, collapsed, primary="teacher")
    write_run(root, BIRDS_INFO, "ule", "u000000000", 1, recovered, primary="teacher")
    board = aggregate(load_results(root))
    assert board.collapsed[["seed", "predictor"]].values.tolist() == [[0, "teacher"]]
    markdown = " ".join(to_markdown(board).split())  # the report wraps its text at 100 columns
    assert "1 model(s) collapsed" in markdown and "seed0 (ule)" in markdown
    assert main(["report", str(root), "--no-files"]) == 0
    assert "collapsed" in capsys.readouterr().err

    from bench.cli import seed_tables

    printed = seed_tables([dead, dead.parent / "seed1"], str(root), "val-worst-group")
    assert "warning: seed 0's teacher collapsed" in printed and "seed 1's" not in printed
    assert max(len(line) for line in printed.splitlines()) <= 100


def test_a_methods_caveat_marks_its_rows_and_is_printed_under_the_tables(tmp_path: Path) -> None:
    root = tmp_path / "results"
    runs = [write_run(root, BIRDS_INFO, "ule", "u000000000", seed,
                      [evaluation("train", 1, {"teacher": ([9, 5, 5, 9], [9, 5, 5, 9]),
                                               "student": ([9, 2, 3, 9], [9, 2, 3, 9])})], primary="teacher")
            for seed in (0, 1)]
    for folder in runs:
        config = json.loads((folder / CONFIG_FILE).read_text())
        config["method_caveat"] = "a reconstruction; it did not beat ERM here"
        (folder / CONFIG_FILE).write_text(json.dumps(config))
    board = aggregate(load_results(root))
    markdown = to_markdown(board)
    assert "| ule † " in markdown
    assert "† ule: a reconstruction; it did not beat ERM here" in " ".join(markdown.split())
    from bench.cli import seed_tables

    assert "Note on ule: a reconstruction" in seed_tables(runs, str(root), "val-worst-group")
