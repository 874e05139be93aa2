"""How long ``bench report`` takes to aggregate 10,000 run records, against a per-run baseline.

Writes N fake but well-formed run folders (config.json, metrics.jsonl, final.json and a
placeholder checkpoint.pt, laid out as bench.core.records does) into a temporary folder: four datasets
shaped like the benchmark's (Waterbirds 4 groups train-weighted, CelebA 4 groups plain, UrbanCars
8 groups, Spawrious 4 classes x 6 locations), six methods (JTT with a non-selectable first stage,
ULE and LfF with two predictors), realistic per-group totals and binomial correct counts.

Then times, side by side on the same folder:

* ``bench.report``: :func:`load_results` (walk + read + every metric of every evaluation, vectorised)
  and :func:`aggregate` (epoch selection, configuration selection, summaries, t-tests) for the
  default rule, and for all five rules;
* a per-run baseline, what a straightforward implementation does: read each run with
  ``bench.core.records`` and, per predictor, pick the epoch with ``bench.core.selection.select`` and compute
  the test metrics there with ``bench.core.metrics.summarize`` (default rule only, and nothing of the
  aggregation over seeds and configurations), on the first ``--baseline-runs`` runs, scaled to N.

Usage: ``python benchmarks/report_speed.py [--runs 10000] [--epochs 20] [--baseline-runs 2000]``.
Result recorded in docs/report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.core.selection import RULES
from bench.report import aggregate, load_results, to_csv, to_latex, to_markdown

DATASETS: list[dict[str, Any]] = [
    {"name": "waterbirds-fake", "n_classes": 2, "attr_value_names": [["land", "water"]],
     "average_kind": "train_weighted", "group_counts": {"train": [3498, 184, 56, 1057], "val": [467, 466, 133, 133],
                                                       "test": [2255, 2255, 642, 642]}},
    {"name": "celeba-fake", "n_classes": 2, "attr_value_names": [["female", "male"]], "average_kind": "plain",
     "group_counts": {"train": [71629, 66874, 22880, 1387], "val": [8535, 8276, 2874, 182],
                      "test": [9767, 7535, 2480, 180]}},
    {"name": "urbancars-fake", "n_classes": 2, "attr_value_names": [["urban", "country"], ["urban", "country"]],
     "average_kind": "urbancars_id", "group_counts": {"train": [3610, 190, 190, 10, 10, 190, 190, 3610],
                                                      "val": [125] * 8, "test": [125] * 8}},
    {"name": "spawrious-fake", "n_classes": 4, "attr_value_names": [["beach", "desert", "dirt", "jungle", "mountain",
                                                                     "snow"]],
     "average_kind": "plain", "group_counts": {"train": [1000, 0, 0, 0, 60, 0] * 4, "val": [200, 0, 0, 0, 12, 0] * 4,
                                               "test": [0, 0, 400, 400, 0, 0] * 4}},
]
METHODS: list[tuple[str, list[str], bool]] = [  # name, predictors (primary first), has an unselectable stage
    ("erm", ["model"], False), ("jtt", ["model"], True), ("groupdro", ["model"], False),
    ("dfr", ["model"], True), ("lff", ["debiased", "biased"], False), ("ule", ["teacher", "student"], False),
]
SEEDS = 5


def _info(dataset: dict[str, Any]) -> dict[str, Any]:
    classes = [f"class{k}" for k in range(dataset["n_classes"])]
    names = [f"{c}/{'/'.join(v)}" for c in classes for v in _product(dataset["attr_value_names"])]
    return {**dataset, "class_names": classes, "attr_names": [f"attr{k}" for k in range(len(
        dataset["attr_value_names"]))], "group_names": names, "n_groups": len(names), "image_shape": [3, 224, 224]}


def _product(values: list[list[str]]) -> list[list[str]]:
    combos: list[list[str]] = [[]]
    for options in values:
        combos = [c + [o] for c in combos for o in options]
    return combos


def write_fake_results(root: Path, n_runs: int, n_epochs: int, seed: int = 0) -> None:
    """``n_runs`` run folders, spread evenly over datasets, methods, configurations and seeds."""
    rng = np.random.default_rng(seed)
    infos = [_info(d) for d in DATASETS]
    for index in range(n_runs):
        info = infos[index % len(infos)]
        method, predictors, unselectable_stage = METHODS[(index // len(infos)) % len(METHODS)]
        config_number, run_seed = divmod(index // (len(infos) * len(METHODS)), SEEDS)
        config_hash = f"{config_number:010x}"
        folder = root / info["name"] / method / config_hash / f"seed{run_seed}"
        folder.mkdir(parents=True)
        hparams = {"lr": float(10 ** rng.uniform(-4, -2)), "weight_decay": float(10 ** rng.uniform(-6, -2)),
                   "batch_size": 64, "epochs": n_epochs, "backbone": "resnet50", "pretrained": True}
        config = {
            "method": method, "dataset": info["name"], "dataset_options": {}, "hparams": hparams, "seed": run_seed,
            "config_hash": config_hash, "dataset_info": info, "primary": predictors[0], "weights": None,
            "uses_train_group_labels": False, "paper": "", "device": "cuda", "versions": {}, "git_commit": None,
            "command": ["bench", "run"], "host": "fake", "created": 0.0,
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        quality = rng.uniform(0.3, 0.95, size=len(predictors))
        lines = []
        for epoch in range(n_epochs):
            stage_one = unselectable_stage and epoch < 2
            evaluation = {}
            for p, base in enumerate(quality):
                accuracy = np.clip(base + rng.normal(0, 0.05, size=info["n_groups"]), 0, 1)
                evaluation[predictors[p]] = {
                    split: {"correct": rng.binomial(info["group_counts"][split], accuracy).tolist(),
                            "total": info["group_counts"][split]} for split in ("val", "test")}
            lines.append(json.dumps({
                "stage": "identify" if stage_one else "train", "stage_index": 0 if stage_one else 1,
                "epoch": epoch + 1, "selectable": not stage_one, "train": {"loss": float(rng.uniform(0, 1))},
                "train_seconds": 10.0, "elapsed_seconds": 10.0 * (epoch + 1), "method": {}, "eval": evaluation,
            }, sort_keys=True))
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (folder / "checkpoint.pt").write_bytes(b"")
        (folder / "final.json").write_text(json.dumps({"status": "done", "n_evaluations": n_epochs}, indent=2))


def timed(work: Callable[[], Any]) -> tuple[Any, tuple[float, float]]:
    """(result, (wall seconds, CPU seconds of this process)); CPU time is what an idle machine's wall
    time would be, on a machine shared with other jobs."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, (time.perf_counter() - wall, time.process_time() - cpu)


def timed_baseline(root: Path, limit: int) -> tuple[tuple[float, float], int]:
    """Per-run reading, selection and metrics with the core's functions: ((wall, CPU) seconds, runs)."""
    from bench.core.metrics import GroupStructure, summarize
    from bench.core.records import RunDir
    from bench.core.selection import DEFAULT_RULE, select

    folders = sorted(root.glob("*/*/*/seed*"))[:limit]
    wall, cpu = time.perf_counter(), time.process_time()
    for folder in folders:
        run = RunDir(folder)
        config = run.read_config()
        lines = run.read_metrics()
        structure = GroupStructure.from_info(config["dataset_info"])
        for predictor in lines[-1]["eval"]:
            picked = lines[select(lines, predictor, structure, DEFAULT_RULE)]["eval"][predictor]["test"]
            summarize(picked["correct"], picked["total"], structure)
    return (time.perf_counter() - wall, time.process_time() - cpu), len(folders)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=20, help="evaluations per run")
    parser.add_argument("--baseline-runs", type=int, default=2_000, help="runs the per-run baseline processes")
    parser.add_argument("--keep", help="write the fake results here and keep them (default: a temporary folder)")
    args = parser.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="report-speed-"))
    try:
        started = time.perf_counter()
        write_fake_results(root / "results", args.runs, args.epochs)
        print(f"wrote {args.runs} run folders x {args.epochs} evaluations in {time.perf_counter() - started:.1f} s "
              f"({sum(f.stat().st_size for f in (root / 'results').rglob('*') if f.is_file()) / 1e6:.0f} MB)")

        results, load = timed(lambda: load_results(root / "results"))
        board, first = timed(lambda: aggregate(results))
        _, again = timed(lambda: aggregate(results))
        _, all_rules = timed(lambda: [aggregate(results, rule) for rule in RULES])
        _, render = timed(lambda: (to_markdown(board), to_latex(board), to_csv(board)))
        assert len(results.runs) == args.runs and not results.issues, "the fake records should all load"
        total = (load[0] + first[0], load[1] + first[1])

        (base_wall, base_cpu), base_runs = timed_baseline(root / "results", args.baseline_runs)
        scale = args.runs / base_runs
        print(f"bench.report, {args.runs} runs, {len(results.evaluations)} (run, evaluation, predictor) rows; "
              f"wall / CPU seconds (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
        rows = [
            ("load_results (walk, read, every metric)", load),
            ("aggregate, default rule (first call: imports scipy)", first),
            ("load + aggregate = `bench report` without plots", total),
            ("aggregate again, default rule", again),
            (f"aggregate, all {len(RULES)} rules", all_rules),
            ("markdown + LaTeX + CSV", render),
            (f"per-run baseline, {base_runs} runs scaled to {args.runs}", (base_wall * scale, base_cpu * scale)),
        ]
        for label, (wall, cpu) in rows:
            print(f"  {label:<58} {wall:7.2f} s wall {cpu:7.2f} s CPU")
        print(f"target: load + aggregate under 10 s; ratio baseline / bench.report: "
              f"{base_wall * scale / total[0]:.1f}x wall, {base_cpu * scale / total[1]:.1f}x CPU")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
