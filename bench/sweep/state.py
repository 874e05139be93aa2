"""A planned run's state, read from its run folder (the single source of truth) and from the state of
the job its files name: :class:`RunState`, :func:`classify`, :func:`classify_runs`."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from bench.core.records import RunDir
from bench.run_lock import (
    RUNNING,
    SLURM_FAILURE_STATES,
    SLURM_RUNNING_STATES,
    holder_alive,
    pid_alive,
    read_json,
    slurm_job_states,
)

SUBMITTED = "submitted.json"


class RunState(str, Enum):
    """A run's state. A ``str``: each state is its printed name, in output and in ``bench status --json``."""

    DONE = "done"
    RUNNING = "running"
    PENDING = "pending"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    NOT_LAUNCHED = "not launched"

    def __str__(self) -> str:
        return self.value

    def __format__(self, format_spec: str) -> str:
        return format(self.value, format_spec)


# Run states, in the order status prints them.
STATE_ORDER = tuple(RunState)
LAUNCHABLE = (RunState.INTERRUPTED, RunState.NOT_LAUNCHED)


class HasRunDir(Protocol):
    """What :func:`classify_runs` needs of a run (a bench.sweep.plan.PlannedRun, say): its folder."""

    @property
    def run_dir(self) -> RunDir: ...


@dataclass
class RunStatus:
    """A planned run's state, the job that runs (or ran) it, and one line on why."""

    state: RunState
    job_id: str | None = None
    detail: str = ""
    submitted: dict[str, Any] | None = None


def _job_ids_of(run_dirs: Iterable[RunDir]) -> tuple[dict[Path, dict], dict[Path, dict], set[str]]:
    submitted, running, slurm_ids = {}, {}, set()
    for run_dir in run_dirs:
        if not run_dir.path.is_dir():
            continue
        sub = read_json(run_dir.path / SUBMITTED)
        if sub is not None:
            submitted[run_dir.path] = sub
            if sub.get("launcher") == "slurm" and sub.get("job_id"):
                slurm_ids.add(str(sub["job_id"]))
        held = read_json(run_dir.path / RUNNING)
        if held is not None:
            running[run_dir.path] = held
            if held.get("slurm_job_id"):
                slurm_ids.add(str(held["slurm_job_id"]))
    return submitted, running, slurm_ids


def classify(run_dir: RunDir, submitted: dict | None, held: dict | None, job_states: dict[str, str]) -> RunStatus:
    """State of one run from its folder (and the states of the jobs its files name)."""
    job_id = str(submitted["job_id"]) if submitted and submitted.get("job_id") else None
    if run_dir.is_done():
        return RunStatus(RunState.DONE, job_id, submitted=submitted)
    problem = run_dir.final_problem()
    if problem is not None:  # a final.json that records no finished run: its result is lost
        return RunStatus(RunState.FAILED, job_id, f"{problem}; delete it (or `bench run --force`) to train the run "
                                                  "again", submitted)
    failure = read_json(run_dir.failed)
    if failure is not None:
        return RunStatus(RunState.FAILED, job_id, f"{failure.get('error_type')}: {failure.get('reason')}", submitted)
    if held is not None and holder_alive(held, job_states):
        where = f"{held.get('host')} pid {held.get('pid')}"
        return RunStatus(RunState.RUNNING, held.get("slurm_job_id") or job_id, where, submitted)
    if submitted is not None:
        if submitted.get("launcher") == "slurm" and job_id:
            state = job_states.get(job_id)
            if state in SLURM_RUNNING_STATES:
                return RunStatus(RunState.RUNNING, job_id, f"SLURM {state}, starting", submitted)
            if state is not None and state not in SLURM_FAILURE_STATES | {"COMPLETED", "CANCELLED", "PREEMPTED"}:
                return RunStatus(RunState.PENDING, job_id, f"SLURM {state}", submitted)
            if state in SLURM_FAILURE_STATES:
                return RunStatus(RunState.FAILED, job_id, f"SLURM job {job_id} ended {state} without a result",
                                 submitted)
        elif submitted.get("host") == socket.gethostname() and pid_alive(submitted.get("pid"),
                                                                          submitted.get("pid_start")):
            return RunStatus(RunState.PENDING, job_id, f"{submitted.get('launcher')} job {job_id}", submitted)
    started = held is not None or submitted is not None or run_dir.config.exists() or run_dir.checkpoint.exists()
    if started:
        return RunStatus(RunState.INTERRUPTED, job_id, "started, not running: a rerun resumes it", submitted)
    return RunStatus(RunState.NOT_LAUNCHED)


def classify_runs(runs: Sequence[HasRunDir]) -> list[RunStatus]:
    submitted, running, slurm_ids = _job_ids_of(r.run_dir for r in runs)
    job_states = slurm_job_states(slurm_ids)
    return [classify(r.run_dir, submitted.get(r.run_dir.path), running.get(r.run_dir.path), job_states)
            for r in runs]
