"""The benchmark table on the synthetic twins: every method, its defaults, N seeds, one command.

Runs ``bench run`` for each (dataset, method) into one results folder (finished seeds are skipped, so
an interrupted benchmark continues where it stopped), then ``bench report`` on that folder, and
writes the leaderboard with the command that made it to ``docs/benchmark-twins.md`` and the report's
files (tables, plots) to ``docs/benchmark-twins/``.

    python benchmarks/twin_leaderboard.py [--seeds 5] [--datasets waterbirds-synth,urbancars-synth]
                                          [--methods erm,groupdro,jtt,dfr,lff,ule] [--out results/twins]
                                          [--jobs 2]

``--jobs N`` runs N (dataset, method) pairs at once, each in its own process with cores/N torch
threads; DFR waits for ERM on the same dataset, whose finished runs it reuses. The numbers do not
depend on the number of jobs (each run is seeded); the wall-clock column does.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench.cli import main as bench
from bench.core.records import RunDir
from bench.runner import RunRequest, run_identity

ROOT = Path(__file__).resolve().parent.parent
NOTES_MARKER = "<!-- notes below are written by hand and kept when this file is regenerated -->"


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def run_chain(dataset: str, methods: list[str], seeds: int, out: str) -> list[tuple[str, str, float, int]]:
    """``bench run`` for each method in turn on one dataset; returns (dataset, method, seconds, exit)."""
    timings = []
    for method in methods:
        started = time.perf_counter()
        arguments = ["run", "--method", method, "--dataset", dataset, "--seeds", str(seeds), "--out", out, "--quiet"]
        status = bench(arguments)
        timings.append((dataset, method, time.perf_counter() - started, status))
        print(f"{dataset} {method}: exit {status}, {timings[-1][2]:.0f} s", file=sys.stderr, flush=True)
    return timings


def training_seconds(out: str, dataset: str, method: str, seeds: int) -> str:
    """Mean recorded training seconds per seed of the default config (DFR: its refit only)."""
    identity = run_identity(RunRequest(method=method, dataset=dataset))
    runs = [RunDir.for_run(out, dataset, method, identity, seed) for seed in range(seeds)]
    seconds = [run.read_final().get("train_seconds_total", 0.0) for run in runs if run.is_done()]
    return f"{sum(seconds) / len(seconds):.0f}" if seconds else "-"


def chains(datasets: list[str], methods: list[str]) -> list[tuple[str, list[str]]]:
    """Independent units of work: DFR reuses ERM's finished runs, so it follows ERM in one chain."""
    units = []
    for dataset in datasets:
        for method in methods:
            if method == "dfr" and "erm" in methods:
                continue
            units.append((dataset, [method, "dfr"] if method == "erm" and "dfr" in methods else [method]))
    # The costliest first, so that the pool is not left waiting on one long run at the end.
    cost_rank = {"ule": 0, "lff": 1, "jtt": 2}
    return sorted(units, key=lambda unit: cost_rank.get(unit[1][0], 3))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--datasets", default="waterbirds-synth,urbancars-synth,celeba-synth")
    parser.add_argument("--methods", default="erm,groupdro,jtt,dfr,lff,ule")
    parser.add_argument("--out", default=str(ROOT / "results" / "twins"))
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    parser.add_argument("--jobs", type=int, default=1, help="(dataset, method) pairs run at once")
    args = parser.parse_args()
    command = "python benchmarks/twin_leaderboard.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    units = chains(args.datasets.split(","), args.methods.split(","))
    started = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else torch.get_num_threads()
    if args.jobs <= 1:
        timings = [t for dataset, methods in units for t in run_chain(dataset, methods, args.seeds, args.out)]
    else:
        # spawn, not fork: a forked child of a process that already runs torch's thread pools can hang.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_set_threads, initargs=(threads,)) as pool:
            futures = [pool.submit(run_chain, dataset, methods, args.seeds, args.out) for dataset, methods in units]
            timings = [t for future in futures for t in future.result()]
    total = time.perf_counter() - started
    docs = Path(args.docs)
    report_dir = docs / "benchmark-twins"
    report_status = bench(["report", args.out, "--output", str(report_dir)])
    leaderboard = (report_dir / "leaderboard.md").read_text()
    lines = [
        "# Benchmark on the synthetic twins",
        "",
        f"Made by `{command.strip()}` (every method with its defaults, {args.seeds} seeds, CPU, "
        f"{args.jobs} job(s) at once; runs already finished are reused, so the cost of a run is in the last "
        f"table, not in this invocation's {total / 60:.1f} min).",
        "Tables: `bench report` on the results folder, model selection by validation worst-group accuracy.",
        "Plots and the LaTeX/CSV versions: [benchmark-twins/](benchmark-twins/).",
        "",
        leaderboard,
        "",
        "## Training time per run",
        "",
        f"Seconds of training and evaluation per seed as each run recorded it (`train_seconds_total` in "
        f"`final.json`, mean over the seeds; runs resumed or reused keep their own figure), with {args.jobs} "
        f"job(s) sharing {os.cpu_count()} cores, {threads} torch thread(s) each; and the exit status "
        "of each `bench run`.",
        "",
        "| dataset | method | s/run | exit status |",
        "| --- | --- | --- | --- |",
        *[f"| {d} | {m} | {training_seconds(args.out, d, m, args.seeds)} | {status} |" for d, m, _, status in timings],
    ]
    target = docs / "benchmark-twins.md"
    # The hand-written reading of the table (below NOTES_MARKER) survives a regeneration.
    previous = target.read_text() if target.exists() else ""
    notes = previous[previous.index(NOTES_MARKER):] if NOTES_MARKER in previous else ""
    target.write_text("\n".join(lines) + "\n" + ("\n" + notes if notes else ""))
    return report_status


if __name__ == "__main__":
    sys.exit(main())
