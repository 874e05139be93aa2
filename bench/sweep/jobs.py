"""The job of a sweep: train one planned run, in this process or on a node, under its run lock.

:class:`RunJob` is what submitit pickles and runs (one run per job, one array task on SLURM); it is a
``submitit.helpers.Checkpointable``, so a time-out or a preemption requeues it, and the requeued job
resumes from the run's last epoch checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import submitit

from bench.core import records
from bench.core.records import RunDir
from bench.run_lock import RunHeldError, describe_holder, hold_run
from bench.sweep.plan import PlannedRun


@dataclass(frozen=True)
class RunTask:
    """What a job needs to train one run (pickled by submitit: plain data only)."""

    request: Any  # bench.runner.RunRequest
    seed: int
    run_dir: str
    threads: int | None = None
    label: str = ""


class RunFailedError(RuntimeError):
    """The run failed; its failed.json says why (raised so that SLURM and submitit record a failure)."""


def _limit_threads(threads: int | None) -> None:
    """As many torch threads as the job has CPUs: torch would otherwise use every core of the node in every
    job. The CPUs: OMP_NUM_THREADS if the user set it, else SLURM's allocation, else ``threads``."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    count = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0) or threads or 0
    if not count and os.environ.get("SLURM_JOB_ID") and hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))  # the CPUs a task/affinity or cgroup plugin bound the job to
    if count > 0:
        import torch

        torch.set_num_threads(count)


def run_task(task: RunTask, quiet: bool = True) -> dict[str, Any]:
    """Train one planned run under its lock; resumes from its checkpoint; records any failure in failed.json.

    Returns final.json's content (``skipped`` when it was already done), or ``status: skipped`` when
    another live process holds the run. Raises RunFailedError when the run failed.
    """
    from bench.runner import execute, prepare
    from bench.trainer import failure_record

    run_dir = RunDir(task.run_dir)
    if run_dir.is_done():
        return {**run_dir.read_final(), "skipped": True}
    try:
        with hold_run(run_dir):
            try:
                _limit_threads(task.threads)
                if run_dir.checkpoint.exists():
                    print(f"{run_dir.path}: resuming from its checkpoint", flush=True)
                prepared = prepare(task.request)
                actual = prepared.run_dir(task.seed).path
                if actual.resolve() != run_dir.path.resolve():
                    raise RuntimeError(f"this run now resolves to {actual}, not to the planned {run_dir.path}: the "
                                       "code, a dataset's defaults or its files changed since the sweep was planned; "
                                       "rerun `bench sweep`")
                result = execute(prepared, task.seed, quiet=quiet)
            except Exception as error:  # anything that escapes the runner (user errors, bugs): recorded for status
                records.atomic_write_json(run_dir.failed, failure_record(error))
                raise
    except RunHeldError as held:
        where = describe_holder(held.holder)
        print(f"{run_dir.path}: already running ({where}); not started twice", flush=True)
        return {"status": "skipped", "reason": f"already running on {where}"}
    if result.get("status") == "failed":
        raise RunFailedError(f"{run_dir.path}: {result['error_type']}: {result['reason']}")
    return result


class RunJob(submitit.helpers.Checkpointable):
    """The callable submitit runs: one run per job (one array task). Checkpointable: on a time-out or a
    preemption submitit calls :meth:`checkpoint` and requeues the returned submission; the run then
    resumes from the last epoch checkpoint in its folder, so nothing but the task needs pickling."""

    def __call__(self, task: RunTask) -> dict[str, Any]:
        return run_task(task, quiet=True)

    def checkpoint(self, task: RunTask) -> submitit.helpers.DelayedSubmission:
        print(f"{task.run_dir}: preempted or timed out; requeued, it resumes from its last epoch checkpoint",
              flush=True)
        return submitit.helpers.DelayedSubmission(self, task)


def task_for(run: PlannedRun, threads: int | None) -> RunTask:
    """The task of a planned run; ``threads``: the job's CPUs where the launcher knows them (else None)."""
    return RunTask(request=run.request, seed=run.seed, run_dir=str(run.run_dir.path), threads=threads,
                   label=run.describe())
