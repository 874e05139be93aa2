"""A sweep's manifest (``<out>/.sweeps/<sweep id>.json``: its settings and planned runs) and the reports of
``bench status``: counts per state, SLURM jobs, and the failed runs with the end of their error or log."""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from submitit.core.utils import JobPaths

from bench.core import records
from bench.core.errors import ConfigError
from bench.core.records import RunDir
from bench.display import TERMINAL_WIDTH, display_path
from bench.run_lock import read_json
from bench.sweep.plan import PlannedRun, plan
from bench.sweep.presets import find_preset
from bench.sweep.settings import SweepSpec, build_settings, load_sweep_file
from bench.sweep.state import STATE_ORDER, RunState, classify_runs


def manifest_path(out: str | Path, sweep_id: str) -> Path:
    return Path(out).expanduser().resolve() / ".sweeps" / f"{sweep_id}.json"


def write_manifest(spec: SweepSpec, runs: Sequence[PlannedRun]) -> None:
    """The sweep's settings and planned runs; the same content on every rerun, so written only if new."""
    out = Path(spec.out).expanduser().resolve()
    content = {
        "sweep_id": spec.sweep_id,
        "spec": spec.identity(),
        "runs": [{"method": r.method, "dataset": r.dataset, "draw": r.draw, "seed": r.seed,
                  "tuned": [list(pair) for pair in r.tuned], "run_dir": str(r.run_dir.path.relative_to(out))}
                 for r in runs],
    }
    path = manifest_path(out, spec.sweep_id)
    if read_json(path) != content:
        records.atomic_write_json(path, content)


def _runs_from_manifest(out: Path, manifest: dict[str, Any]) -> list[PlannedRun]:
    return [PlannedRun(r["method"], r["dataset"], r["draw"], r["seed"], None, RunDir(out / r["run_dir"]),
                       tuple((k, v) for k, v in r.get("tuned", ())))
            for r in manifest["runs"]]


def _job_log(submitted: dict[str, Any] | None, job_id: str | None) -> Path | None:
    """submitit's log of a run's job: its stderr, or its stdout when the stderr is empty or missing."""
    if not submitted or not job_id or not submitted.get("log_folder"):
        return None
    paths = JobPaths(submitted["log_folder"], job_id=job_id, task_id=0)
    for path in (paths.stderr, paths.stdout):
        if path.is_file() and path.stat().st_size > 0:
            return path
    return None


def _last_lines(path: Path | None, lines: int) -> list[str]:
    if path is None:
        return []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def sweep_report(name: str, out: Path, runs: Sequence[PlannedRun], lines: int) -> dict[str, Any]:
    """Counts per state, SLURM jobs, and the failed runs with the end of their error, as a dict."""
    statuses = classify_runs(runs)
    counts = Counter(s.state for s in statuses)
    jobs: dict[str, Counter] = {}
    failed = []
    for run, status in zip(runs, statuses):
        if status.submitted and status.submitted.get("launcher") == "slurm" and status.job_id:
            jobs.setdefault(status.job_id.split("_")[0], Counter())[status.state] += 1
        if status.state == RunState.FAILED:
            failure = read_json(run.run_dir.failed)
            traceback_lines = [line for line in str((failure or {}).get("traceback", "")).splitlines() if line.strip()]
            log = _job_log(status.submitted, status.job_id)
            failed.append({
                "run": run.describe() if run.draw >= 0 else f"{run.method} {run.dataset} seed {run.seed}",
                "run_dir": display_path(run.run_dir.path),
                "job_id": status.job_id,
                "error": status.detail,
                "traceback_tail": traceback_lines[-lines:],
                "log": display_path(log) if log else None,
                # without failed.json (a job killed by SLURM: out of memory, time, node failure) the log is
                # the only account of what happened
                "log_tail": _last_lines(log, lines) if failure is None else [],
            })
    return {
        "sweep": name,
        "out": str(out),
        "n_runs": len(runs),
        "counts": {state: counts.get(state, 0) for state in STATE_ORDER},
        "slurm_jobs": {job: dict(c) for job, c in sorted(jobs.items())},
        "failed": failed,
    }




def _wrap(text: str, indent: str, more: str) -> list[str]:
    return textwrap.wrap(text, TERMINAL_WIDTH, initial_indent=indent, subsequent_indent=more, break_long_words=False,
                         break_on_hyphens=False) or [indent.rstrip()]


def format_report(report: dict[str, Any]) -> str:
    counts = report["counts"]
    lines = [f"{report['sweep']}: {report['n_runs']} runs in {display_path(Path(report['out']))}",
             *_wrap(" | ".join(f"{state} {counts[state]}" for state in STATE_ORDER), "  ", "  ")]
    if report["slurm_jobs"]:
        jobs = "; ".join(f"{job} ({', '.join(f'{n} {s}' for s, n in sorted(c.items()))})"
                         for job, c in report["slurm_jobs"].items())
        lines += _wrap(f"SLURM jobs: {jobs}", "  ", "    ")
    for failure in report["failed"]:
        job = f" [job {failure['job_id']}]" if failure["job_id"] else ""
        lines += _wrap(f"FAILED {failure['run']}{job}: {failure['error']}", "  ", "    ")
        lines.append(f"    folder: {failure['run_dir']}")
        for line in failure["traceback_tail"]:
            lines += _wrap(line, "    | ", "    |   ")
        if failure["log"]:
            lines.append(f"    log: {failure['log']}")
        for line in failure["log_tail"]:
            lines += _wrap(line, "    log | ", "    log |   ")
    return "\n".join(lines)


def status_reports(target: str, lines: int = 5) -> list[dict[str, Any]]:
    """Reports for ``bench status``: one per sweep of a results folder, or the sweep of a sweep file."""
    path = Path(target).expanduser()
    if not path.exists() and find_preset(target) is not None:
        path = find_preset(target)  # type: ignore[assignment]
    if path.is_file():
        spec, _ = build_settings(load_sweep_file(path))
        out = Path(spec.out).expanduser().resolve()
        return [sweep_report(f"sweep {spec.sweep_id} ({path.name})", out, plan(spec), lines)]
    if not path.is_dir():
        raise ConfigError(f"bench status {target}: no such results folder or sweep file")
    out = path.resolve()
    reports, listed = [], set()
    for manifest_file in sorted((out / ".sweeps").glob("*.json")):
        manifest = read_json(manifest_file)
        if manifest is None or "runs" not in manifest:
            continue
        runs = _runs_from_manifest(out, manifest)
        listed.update(r.run_dir.path for r in runs)
        reports.append(sweep_report(f"sweep {manifest['sweep_id']}", out, runs, lines))
    others = []
    for seed_dir in sorted(out.glob("*/*/*/seed*")):
        if seed_dir.is_dir() and seed_dir not in listed and seed_dir.name[4:].isdigit():
            dataset, method = seed_dir.parts[-4], seed_dir.parts[-3]
            others.append(PlannedRun(method, dataset, -1, int(seed_dir.name[4:]), None, RunDir(seed_dir)))
    if others or not reports:
        reports.append(sweep_report("runs outside any sweep", out, others, lines))
    return reports
