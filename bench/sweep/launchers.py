"""Launchers: how a sweep's runs are started. :data:`REGISTRY` maps each ``--launcher`` name to a
function that launches the runs and says whether they have ended:

* ``local``: one run after another in this process;
* ``local-parallel``: local processes through submitit's LocalExecutor, waited for;
* ``slurm``: SLURM job arrays through submitit; waited for only with ``--wait``.

Each launcher writes a run's ``submitted.json`` when it hands the run to a job (bench.sweep.state), and
submitit's logs go to ``<out>/.submitit/<sweep id>/``.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import submitit
from submitit.core.utils import FailedJobError

from bench.core import records
from bench.core.errors import BenchError
from bench.display import display_path
from bench.run_lock import process_start
from bench.sweep.jobs import RunFailedError, RunJob, run_task, task_for
from bench.sweep.plan import PlannedRun
from bench.sweep.settings import LAUNCHER_NAMES, LaunchOptions, SweepSpec
from bench.sweep.state import SUBMITTED, RunState, RunStatus, classify, classify_runs

MAX_ARRAY_SIZE = 1000  # SLURM's default MaxArraySize is 1001: larger sweeps are split into several arrays


def _logs_folder(spec: SweepSpec) -> Path:
    return Path(spec.out).expanduser().resolve() / ".submitit" / spec.sweep_id


def _write_submitted(run: PlannedRun, spec: SweepSpec, launcher: str, job: Any, extra: dict[str, Any]) -> None:
    records.atomic_write_json(run.run_dir.path / SUBMITTED, {
        "launcher": launcher,
        "job_id": str(job.job_id),
        "sweep_id": spec.sweep_id,
        "log_folder": str(_logs_folder(spec) / "%j"),
        "submitted": time.time(),
        "host": socket.gethostname(),
        **extra,
    })


def launch_local(spec: SweepSpec, runs: Sequence[PlannedRun], quiet: bool) -> None:
    """One run after another in this process (Ctrl-C stops; rerunning resumes)."""
    for index, run in enumerate(runs, 1):
        print(f"[{index}/{len(runs)}] {run.describe()}", file=sys.stderr, flush=True)
        try:
            result = run_task(task_for(run, None), quiet=quiet)
        except RunFailedError as error:
            print(f"  failed: {error}", file=sys.stderr)
            continue
        except Exception as error:  # recorded in failed.json by run_task; the sweep goes on
            print(f"  failed: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        if result.get("status") == "skipped":
            print(f"  skipped: {result.get('reason', 'already done')}", file=sys.stderr)


def _local_gpus() -> list[int]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(x) for x in visible.split(",") if x.strip().isdigit()]
    import torch

    return list(range(torch.cuda.device_count()))


def launch_local_parallel(spec: SweepSpec, options: LaunchOptions, runs: Sequence[PlannedRun]) -> None:
    """Runs in parallel local processes through submitit's LocalExecutor, and waits for them.

    At most ``array_parallelism`` at a time; by default one per GPU when GPUs are visible (each process
    sees only its own ``gpus_per_task`` GPUs; ``--gpus-per-task 0`` trains on CPUs), else one per
    ``cpus_per_task`` CPUs.
    """
    cpus = options.cpus_per_task or 1
    gpus_per_task = options.gpus_per_task
    gpu_pool = _local_gpus() if gpus_per_task != 0 else []
    if gpus_per_task is None:
        gpus_per_task = 1 if gpu_pool else 0
    if gpus_per_task:
        if len(gpu_pool) < gpus_per_task:
            raise BenchError(f"--gpus-per-task {gpus_per_task}: only {len(gpu_pool)} GPUs are visible")
        slots = len(gpu_pool) // gpus_per_task
    else:
        slots = max(1, (os.cpu_count() or 1) // cpus)
    parallelism = min(slots, options.array_parallelism or slots)
    executor = submitit.LocalExecutor(folder=_logs_folder(spec) / "%j", max_num_timeout=options.max_timeouts)
    queue = list(runs)
    active: list[tuple[Any, PlannedRun, list[int]]] = []
    print(f"running {len(queue)} run(s), {parallelism} at a time; logs in {display_path(_logs_folder(spec))}",
          file=sys.stderr)
    finished = 0
    try:
        while queue or active:
            while queue and len(active) < parallelism:
                run = queue.pop(0)
                gpus = [gpu_pool.pop(0) for _ in range(gpus_per_task)]
                executor.update_parameters(timeout_min=options.timeout_min, gpus_per_node=len(gpus),
                                           visible_gpus=tuple(gpus))
                job = executor.submit(RunJob(), task_for(run, cpus))
                controller = int(job.job_id)  # the LocalExecutor's job id is its controller's pid
                _write_submitted(run, spec, "local-parallel", job,
                                 {"pid": controller, "pid_start": process_start(controller)})
                active.append((job, run, gpus))
            time.sleep(0.5)
            for entry in [e for e in active if e[0].done()]:
                job, run, gpus = entry
                active.remove(entry)
                gpu_pool.extend(gpus)
                finished += 1
                status = classify(run.run_dir, None, None, {})
                print(f"[{finished}/{len(runs)}] {run.describe()}: {status.state} {status.detail}".rstrip(),
                      file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        for job, _, _ in active:
            job.cancel()
        raise
    finally:
        literal = _logs_folder(spec) / "%j"  # created empty by submitit's local controllers
        if literal.is_dir() and not any(literal.iterdir()):
            literal.rmdir()


def _slurm_executor(spec: SweepSpec, options: LaunchOptions) -> Any:
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise BenchError("--launcher slurm: sbatch/srun not found; run this on a SLURM login node "
                         "(scripts/local-slurm.sh start brings up a single-node cluster here)")
    executor = submitit.AutoExecutor(folder=_logs_folder(spec) / "%j", cluster="slurm",
                                     slurm_max_num_timeout=options.max_timeouts)
    parameters: dict[str, Any] = {
        "name": f"bench-{spec.sweep_id}",
        "timeout_min": options.timeout_min,
        "slurm_array_parallelism": options.array_parallelism or 256,
    }
    optional = {
        "cpus_per_task": options.cpus_per_task,
        "slurm_gpus_per_task": options.gpus_per_task,
        "slurm_mem": options.mem,
        "slurm_partition": options.partition,
        "slurm_account": options.account,
        "slurm_qos": options.qos,
        "slurm_constraint": options.constraint,
        "slurm_additional_parameters": dict(options.sbatch_args) or None,
    }
    parameters.update({k: v for k, v in optional.items() if v is not None})
    executor.update_parameters(**parameters)
    return executor


def launch_slurm(spec: SweepSpec, options: LaunchOptions, runs: Sequence[PlannedRun]) -> list[str]:
    """Submit the runs as SLURM job arrays (one run per array task); returns the array job ids."""
    executor = _slurm_executor(spec, options)
    array_ids = []
    for start in range(0, len(runs), MAX_ARRAY_SIZE):
        chunk = runs[start : start + MAX_ARRAY_SIZE]
        try:
            jobs = executor.map_array(RunJob(), [task_for(run, None) for run in chunk])
        except FailedJobError as error:  # sbatch refused: its message (already printed by submitit)
            reason = str(error).strip().splitlines()
            raise BenchError(f"sbatch refused the job array: {reason[-1] if reason else error}") from None
        for run, job in zip(chunk, jobs):
            _write_submitted(run, spec, "slurm", job, {})
        array_ids.append(str(jobs[0].job_id).split("_")[0])
    return array_ids


def wait_for(runs: Sequence[PlannedRun], poll_seconds: float = 2.0) -> list[RunStatus]:
    """Block until none of the runs is pending or running; returns their final states."""
    started = time.time()
    while True:
        statuses = classify_runs(runs)
        if not any(s.state in (RunState.PENDING, RunState.RUNNING) for s in statuses):
            return statuses
        time.sleep(min(15.0, poll_seconds + (time.time() - started) / 60))


# --------------------------------------------------------------------------------------------
# The registry


class Launcher(Protocol):
    def __call__(self, spec: SweepSpec, options: LaunchOptions, runs: Sequence[PlannedRun], *, quiet: bool,
                 wait: bool) -> bool:
        """Launch the runs; True when they have ended (the caller then reports them), False when they were
        handed off to jobs that are not waited for. ``quiet``: no progress bars; ``wait``: wait for jobs
        that would otherwise be left to run (slurm)."""
        ...


def _local(spec: SweepSpec, options: LaunchOptions, runs: Sequence[PlannedRun], *, quiet: bool,
           wait: bool) -> bool:
    launch_local(spec, runs, quiet)
    return True


def _local_parallel(spec: SweepSpec, options: LaunchOptions, runs: Sequence[PlannedRun], *, quiet: bool,
                    wait: bool) -> bool:
    launch_local_parallel(spec, options, runs)
    return True


def _slurm(spec: SweepSpec, options: LaunchOptions, runs: Sequence[PlannedRun], *, quiet: bool,
           wait: bool) -> bool:
    array_ids = launch_slurm(spec, options, runs)
    print(f"submitted {len(runs)} runs as SLURM job array(s) {', '.join(array_ids)}; "
          f"logs in {display_path(_logs_folder(spec))}")
    if not wait:
        print(f"follow with: bench status {display_path(Path(spec.out).expanduser().resolve())}")
        return False
    wait_for(runs)
    return True


REGISTRY: dict[str, Launcher] = {"local": _local, "local-parallel": _local_parallel, "slurm": _slurm}
LAUNCHERS = tuple(REGISTRY)  # the choices of --launcher
# The settings check a launcher's name without importing this module (and submitit): the names must agree.
if LAUNCHERS != LAUNCHER_NAMES:
    raise RuntimeError(f"bench.sweep.launchers.REGISTRY has {LAUNCHERS}, "
                       f"but bench.sweep.settings.LAUNCHER_NAMES is {LAUNCHER_NAMES}")
