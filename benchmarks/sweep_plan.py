"""How long ``bench sweep --dry-run`` and ``bench status`` take on a sweep of about 2,000 runs.

The sweep: every registered method of the benchmark (erm, jtt, groupdro, dfr, lff, ule) x every built-in
synthetic twin x 5 seeds x enough hyperparameter draws for >= 2,000 runs. Planning resolves every run's
hyperparameters and folder but loads no data and trains nothing, so the command's time should be the
Python start-up and imports (torch) plus a small per-run cost. Measured side by side, each a fresh
process, median of ``--repeats``:

* ``imports``: a process that only imports what the dry run imports (the floor of any ``bench`` command);
* ``dry-run, fresh``: ``bench sweep ... --dry-run`` into an empty results folder;
* ``dry-run, half done``: the same after half of the runs have a final.json (what a rerun sees);
* ``status, half done``: ``bench status OUT`` on that folder (reads the sweep's manifest).

Usage: ``python benchmarks/sweep_plan.py [--runs 2000] [--repeats 3]``. Result recorded in docs/slurm.md.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["erm", "jtt", "groupdro", "dfr", "lff", "ule"]
SEEDS = 5


def _timed(command: list[str], repeats: int) -> tuple[float, float, str]:
    """Median wall-clock and CPU (user + system) seconds of a command, and its output."""
    walls, cpus, output = [], [], ""
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
        output = result.stdout
    return statistics.median(walls), statistics.median(cpus), output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from bench.core import records
    from bench.sweep.plan import plan
    from bench.sweep.settings import build_settings
    from bench.sweep.status import write_manifest
    from datasets import dataset_names, get_dataset
    from methods import method_names

    methods = [m for m in METHODS if m in method_names()]
    datasets = [d for d in dataset_names() if not get_dataset(d).needs_data_root]
    n_hparams = math.ceil(args.runs / (len(methods) * len(datasets) * SEEDS))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results"
        flags = ["--methods", ",".join(methods), "--datasets", ",".join(datasets), "--seeds", str(SEEDS),
                 "--n-hparams", str(n_hparams), "--out", str(out), "--launcher", "slurm", "--time", "12:00:00"]
        bench = [sys.executable, "-m", "bench.cli"]
        imports = [sys.executable, "-c", "import importlib, bench.cli, bench.runner, methods, datasets; "
                   "[importlib.import_module(m) for m in bench.cli.COMMAND_MODULES]; "
                   "methods.method_names(); datasets.dataset_names()"]
        floor = _timed(imports, args.repeats)
        fresh = _timed([*bench, "sweep", *flags, "--dry-run"], args.repeats)
        printed = fresh[2]
        assert not out.exists(), "a dry run wrote files"
        n_runs = int(printed.split(": ", 1)[1].split(" runs", 1)[0])

        spec, _ = build_settings({"methods": methods, "datasets": datasets, "seeds": SEEDS,
                                  "n_hparams": n_hparams, "out": str(out)})
        runs = plan(spec)
        write_manifest(spec, runs)
        for run in runs[::2]:
            records.atomic_write_json(run.run_dir.final, {"status": "done"})
        half = _timed([*bench, "sweep", *flags, "--dry-run"], args.repeats)
        assert f"would launch {n_runs - len(runs[::2])} runs" in half[2], half[2]
        status = _timed([*bench, "status", str(out)], args.repeats)
        planned_in = float(printed.split("planned in ", 1)[1].split(" s", 1)[0])

    print(f"sweep: {len(methods)} methods x {len(datasets)} datasets ({', '.join(datasets)}) x {SEEDS} seeds x "
          f"{n_hparams} draws = {n_runs} runs; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"median of {args.repeats}")
    rows = [("imports only (floor)", floor), ("dry-run, fresh folder", fresh), ("dry-run, half done", half),
            ("status, half done", status)]
    width = max(len(name) for name, _ in rows)
    print(f"  {'':<{width}}  {'wall':>7}  {'CPU':>7}  wall / floor")
    for name, (wall, cpu, _) in rows:
        print(f"  {name:<{width}}  {wall:6.2f}s  {cpu:6.2f}s  {wall / floor[0]:5.2f}x")
    print(f"  planning inside the dry run (its own report): {planned_in:.2f} s = "
          f"{1e3 * planned_in / n_runs:.3f} ms per run")


if __name__ == "__main__":
    main()
