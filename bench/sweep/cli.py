"""``bench sweep`` and ``bench status``: their arguments, and the commands (see bench.cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.core.precision_names import PRECISIONS
from bench.core.selection import DEFAULT_RULE
from bench.display import display_path
from bench.sweep.launchers import LAUNCHERS, REGISTRY
from bench.sweep.plan import PlannedRun, best_draws, plan, short_value
from bench.sweep.presets import resolve_sweep_file
from bench.sweep.settings import (
    LAUNCH_KEYS,
    SPEC_KEYS,
    STAGES,
    SWEEP_RULES,
    LaunchOptions,
    SweepSpec,
    build_settings,
    load_sweep_file,
)
from bench.sweep.state import LAUNCHABLE, STATE_ORDER, SUBMITTED, RunState, classify_runs
from bench.sweep.status import format_report, status_reports, sweep_report, write_manifest

FAILED_BEFORE = "failed.previous.json"  # failed.json of a run relaunched by --retry-failed


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are None: a flag given on the command line overrides the sweep file, others do not.
    parser.add_argument("file", nargs="?", help="sweep file (.yaml/.yml/.toml) with the settings below, or a preset "
                                                "(presets/NAME.yaml or NAME; see `bench list --presets`)")
    what = parser.add_argument_group("what to run")
    what.add_argument("--methods", help="comma-separated method names (see `bench list`)")
    what.add_argument("--datasets", help="comma-separated dataset names")
    what.add_argument("--seeds", type=int, help="seeds 0..N-1 per draw (stages all and seeds; default 1)")
    what.add_argument("--n-hparams", type=int, help="hyperparameter draws 0..N-1; draw 0 = defaults (default 1)")
    what.add_argument("--stage", choices=STAGES,
                      help="all: every draw x every seed (default); search: every draw at --search-seeds seeds; "
                           "seeds: the best search draw (by --select) at --seeds seeds")
    what.add_argument("--search-seeds", type=int, help="seeds of the search stage (default 1)")
    what.add_argument("--select", choices=SWEEP_RULES,
                      help=f"rule ranking the search draws by mean validation score (default {DEFAULT_RULE})")
    what.add_argument("--epochs", type=int, help="override the epochs of every run")
    what.add_argument("--hparams", nargs="*", metavar="KEY=VALUE", help="hyperparameters fixed in every run")
    what.add_argument("--backbone", help="override the backbone of every run")
    what.add_argument("--weights", help="local backbone weights file")
    what.add_argument("--data-root", help="folder holding the datasets (default: $BENCH_DATA_ROOT)")
    what.add_argument("--data-option", dest="data_options", nargs="*", metavar="KEY=VALUE", help="dataset options")
    what.add_argument("--out", help="results folder (default results/)")
    what.add_argument("--device", help="auto (default), cpu, cuda")
    what.add_argument("--workers", type=int, help="data loading worker processes per run")
    what.add_argument("--deterministic", action="store_true", default=None,
                      help="deterministic CUDA kernels in every run (see bench run --deterministic)")
    what.add_argument("--precision", choices=PRECISIONS, help="the networks' arithmetic in every run: fp32 "
                                                               "(default), bf16 or fp16 (see bench run --precision)")
    what.add_argument("--compile", action="store_true", default=None, help="torch.compile the models of every run")
    how = parser.add_argument_group("how to launch")
    how.add_argument("--launcher", choices=LAUNCHERS,
                     help="local: one run after another here (default); local-parallel: local processes "
                          "(submitit LocalExecutor); slurm: job arrays (submitit)")
    how.add_argument("--partition", help="SLURM partition")
    how.add_argument("--slurm-account", dest="account", help="SLURM account")
    how.add_argument("--slurm-qos", dest="qos", help="SLURM quality of service")
    how.add_argument("--constraint", help="SLURM node constraint")
    how.add_argument("--gpus-per-task", type=int, help="GPUs per run")
    how.add_argument("--cpus-per-task", type=int, help="CPUs per run (also torch's thread count)")
    how.add_argument("--mem", help="memory per run, e.g. 32G")
    how.add_argument("--time", help="time limit per job, e.g. 12:00:00 (default 24:00:00); a run that hits it "
                                    "is requeued and resumes from its checkpoint")
    how.add_argument("--array-parallelism", type=int, help="runs at the same time (SLURM: array throttle)")
    how.add_argument("--max-timeouts", type=int, help="requeues after time-outs before a run fails (default 3)")
    how.add_argument("--sbatch-arg", dest="sbatch_args", action="append", metavar="KEY=VALUE",
                     help="extra sbatch option, repeatable (e.g. --sbatch-arg reservation=mine)")
    control = parser.add_argument_group("control")
    control.add_argument("--dry-run", action="store_true", help="list what would be launched; write nothing")
    control.add_argument("--retry-failed", action="store_true", help="relaunch failed runs too")
    control.add_argument("--wait", action="store_true", help="slurm: wait until every launched run has ended")
    control.add_argument("--show", type=int, default=10, metavar="N",
                         help="(dataset, method, draw) rows listed by --dry-run (default 10)")
    control.add_argument("--quiet", action="store_true", help="no progress bars (local launcher)")


FLAG_KEYS = sorted(SPEC_KEYS | LAUNCH_KEYS)


def settings_from_args(args: argparse.Namespace) -> tuple[SweepSpec, LaunchOptions]:
    settings: dict[str, Any] = load_sweep_file(resolve_sweep_file(args.file)) if args.file else {}
    for key in FLAG_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    return build_settings(settings)


def _seed_ranges(seeds: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    parts: list[str] = []
    for seed in sorted(seeds):
        if parts and parts[-1].split("-")[-1] == str(seed - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{seed}"
        else:
            parts.append(str(seed))
    return ",".join(parts)


def launch_table(runs: list[PlannedRun], show: int, out: str) -> str:
    """What a dry run would launch, one row per (dataset, method, draw) with its config folder and seeds,
    then the drawn hyperparameters of draws other than 0; at most ``show`` rows. Fits 100 columns."""
    from tabulate import tabulate

    groups: dict[tuple[str, str, int], list[PlannedRun]] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.method, run.draw), []).append(run)
    rows, drawn = [], []
    for (dataset, method, draw), members in list(groups.items())[:show]:
        config = members[0].run_dir.path.parent.name
        rows.append([dataset, method, draw, config, _seed_ranges([run.seed for run in members])])
        if draw > 0:
            values = " ".join(f"{k}={short_value(v)}" for k, v in members[0].tuned)
            drawn.append(textwrap.fill(f"{method} on {dataset}, draw {draw} ({config}): {values}", 100,
                                       initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False))
    lines = [tabulate(rows, headers=["dataset", "method", "draw", "config", "seeds"], tablefmt="github"),
             f"run folders: {out}/DATASET/METHOD/CONFIG/seedK; draw 0 is each method's defaults"]
    if len(groups) > show:
        lines.append(f"... and {len(groups) - show} more (dataset, method, draw) rows (--show N lists more)")
    if drawn:
        lines += ["drawn hyperparameters:", *drawn]
    return "\n".join(lines)


def _retry(run: PlannedRun) -> None:
    """Set a failed run up for relaunch: its failed.json is kept aside as failed.previous.json."""
    if run.run_dir.failed.exists():
        os.replace(run.run_dir.failed, run.run_dir.path / FAILED_BEFORE)
    (run.run_dir.path / SUBMITTED).unlink(missing_ok=True)


def cmd_sweep(args: argparse.Namespace) -> int:
    spec, options = settings_from_args(args)
    started = time.perf_counter()
    best = best_draws(spec) if spec.stage == "seeds" else None
    runs = plan(spec, best)
    statuses = classify_runs(runs)
    counts = Counter(s.state for s in statuses)
    relaunch = LAUNCHABLE + ((RunState.FAILED,) if args.retry_failed else ())
    to_launch = [run for run, status in zip(runs, statuses) if status.state in relaunch]
    planned_in = time.perf_counter() - started
    out = display_path(Path(spec.out).expanduser().resolve())
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATE_ORDER)
    print(f"sweep {spec.sweep_id}: {len(runs)} runs in {out}; planned in {planned_in:.2f} s")
    print(f"  {summary}")
    if best is not None:
        for (method, dataset), (draw, score) in sorted(best.items()):
            print(f"  best draw of {method} on {dataset}: {draw} (mean {spec.select} {100 * score:.1f})")
    if counts.get(RunState.FAILED) and not args.retry_failed:
        print(f"  {counts[RunState.FAILED]} failed runs are left alone (see `bench status {out}`; --retry-failed "
              "relaunches them)")
    if args.dry_run:
        print(f"would launch {len(to_launch)} runs with --launcher {options.launcher}" + (":" if to_launch else ""))
        if to_launch:
            print(launch_table(to_launch, args.show, out))
        return 0
    if not to_launch:
        print("nothing to launch")
        return 0
    write_manifest(spec, runs)
    for run in to_launch:
        _retry(run)
    if not REGISTRY[options.launcher](spec, options, to_launch, quiet=args.quiet, wait=args.wait):
        return 0  # handed off to jobs that are not waited for (slurm without --wait)
    report = sweep_report(f"sweep {spec.sweep_id}", Path(spec.out).expanduser().resolve(), runs, lines=5)
    print(format_report(report))
    return 1 if report["counts"][RunState.FAILED] else 0


def cmd_status(args: argparse.Namespace) -> int:
    reports = status_reports(args.target, lines=args.lines)
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return 0


def register(subparsers: dict[str, Any]) -> dict[str, Any]:
    """Adds ``bench sweep`` and ``bench status`` (see bench.cli.COMMAND_MODULES)."""
    sweep = subparsers["top"].add_parser(
        "sweep", help="run methods x datasets x hparam draws x seeds, locally or on SLURM; reruns resume",
        description="Plan a sweep and launch what is not finished. Settings come from flags and/or a sweep file "
                    "(flags win).")
    _add_sweep_arguments(sweep)
    status = subparsers["top"].add_parser("status", help="state of a sweep's runs: done, running, failed, ...")
    status.add_argument("target", nargs="?", default="results", help="results folder or sweep file (default results/)")
    status.add_argument("--lines", type=int, default=5, help="error lines shown per failed run (default 5)")
    status.add_argument("--json", action="store_true", help="print the reports as JSON")
    return {"sweep": cmd_sweep, "status": cmd_status}
