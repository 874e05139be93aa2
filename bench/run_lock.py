"""The lock of a run folder, ``running.json``, and whether the process that holds it still lives.

``running.json`` is the lock of a live training process: host, pid (and the process's start time, which
catches pid reuse), SLURM job id, start and heartbeat times (refreshed every 30 s by a thread). It is
taken under an ``flock`` of ``.lock`` and deleted when the process ends. A lock whose holder is gone
(dead pid on the same host; a SLURM job that no longer runs; else a heartbeat older than 5 minutes)
is stale and is taken over, which is how a killed or requeued run resumes.

Every training path takes it through :func:`hold_run` (``bench run`` in ``bench.runner.execute``, a
sweep's job in ``bench.sweep.jobs.run_task``): a second process that finds the run held raises
:class:`RunHeldError` (the CLI prints which process holds it and exits 2), or waits for it with
``wait=True``. The hold is re-entrant within a process, so a sweep's job holds the run around
``execute``, which holds it again.

Liveness is asked of the operating system (``/proc``) for processes on this host and of SLURM
(``squeue``, ``sacct``) for jobs; :func:`slurm_job_states` also tells the sweep's launchers and
``bench status`` which runs are queued.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.core import records
from bench.core.errors import BenchError
from bench.core.records import RunDir
from bench.display import display_path

RUNNING = "running.json"
LOCK = ".lock"

HEARTBEAT_SECONDS = 30.0
WAIT_POLL_SECONDS = 5.0  # how often a process waiting for a held run (hold_run(wait=True)) looks again
STALE_AFTER_SECONDS = 300.0  # a heartbeat this old means the holder is gone (when nothing better can tell)

# SLURM job states (squeue %T / sacct State) that end a job without it having finished its run.
SLURM_FAILURE_STATES = {"FAILED", "OUT_OF_MEMORY", "NODE_FAIL", "TIMEOUT", "BOOT_FAIL", "DEADLINE"}
SLURM_RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING"}


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content; None when it is missing or unreadable (e.g. being replaced)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def process_start(pid: int) -> str | None:
    """Start time of a live (non-zombie) process, from /proc; None when it is gone. On systems without
    /proc, "?" when the pid exists (pid reuse is then not detected)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (name) ": state is field 3, starttime 22
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def pid_alive(pid: Any, started: str | None) -> bool:
    if not isinstance(pid, int):
        return False
    now = process_start(pid)
    return now is not None and (started is None or now == "?" or now == started)


def current_job_id() -> str | None:
    """This process's SLURM job id, as submitit writes it (``A_i`` for array tasks)."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_job_states(job_ids: Iterable[str], strict: bool = True) -> dict[str, str]:
    """Current state of SLURM jobs by id (``123`` or ``123_4``): squeue for live jobs, sacct for ended
    ones. Jobs SLURM no longer knows are left out; {} where SLURM's commands are not installed.

    ``strict``: a failing squeue raises BenchError, since taking queued jobs for ended ones would launch
    their runs twice; otherwise what could be learnt is returned.
    """
    wanted = {str(j) for j in job_ids if j}
    if not wanted:
        return {}
    states: dict[str, str] = {}
    bases = sorted({j.split("_")[0] for j in wanted})
    if shutil.which("sacct"):  # fails without accounting (slurmdbd): squeue alone then tells live jobs
        ok, output = _run_quiet(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(bases)])
        for line in output.splitlines() if ok else []:  # a requeued job has several lines: the last is current
            job, _, state = line.partition("|")
            if job in wanted and state:
                states[job] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    if shutil.which("squeue"):
        user = os.environ.get("USER") or _current_user()
        ok, output = _run_quiet(["squeue", "-h", "-r", "-o", "%i|%T"] + (["-u", user] if user else []))
        if not ok and strict:
            raise BenchError(f"squeue failed ({output.strip() or 'no answer'}); cannot tell which runs are "
                             "queued, so nothing is launched. Retry when the SLURM controller answers")
        for line in output.splitlines() if ok else []:
            job, _, state = line.partition("|")
            if job in wanted:
                states[job] = state.strip()
    return states


def _current_user() -> str | None:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return None


def _run_quiet(command: list[str]) -> tuple[bool, str]:
    """(succeeded, stdout) or (False, the error) of a SLURM query."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        return False, str(error)
    if result.returncode != 0:
        return False, (result.stderr.strip().splitlines() or [""])[-1]
    return True, result.stdout


def holder_alive(info: dict[str, Any], job_states: dict[str, str]) -> bool:
    """Whether the process that wrote running.json still runs: by pid on the same host, else by its SLURM
    job's state, else by the age of its heartbeat."""
    if info.get("host") == socket.gethostname():
        return pid_alive(info.get("pid"), info.get("pid_start"))
    job = info.get("slurm_job_id")
    if job and job in job_states:
        return job_states[job] in SLURM_RUNNING_STATES
    return time.time() - float(info.get("heartbeat", 0)) < STALE_AFTER_SECONDS


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class RunLock:
    """``running.json`` of a run folder: held by the one process training the run (see module docstring)."""

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        self.path = run_dir.path / RUNNING
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._info: dict[str, Any] = {}

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock; returns None, or the live holder's running.json when another process has it."""
        with _flock(self.run_dir.path / LOCK):
            previous = read_json(self.path)
            if previous is not None and not self._is_mine(previous):
                job = previous.get("slurm_job_id")
                if holder_alive(previous, slurm_job_states([job], strict=False) if job else {}):
                    return previous
            now = time.time()
            self._info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_start": process_start(os.getpid()),
                "slurm_job_id": current_job_id(),
                "started": now,
                "heartbeat": now,
                "token": self.token,
            }
            if previous is not None:
                self._info["took_over"] = {k: previous.get(k) for k in ("host", "pid", "slurm_job_id", "heartbeat")}
            records.atomic_write_json(self.path, self._info)
        self._thread = threading.Thread(target=self._beat, name="running.json heartbeat", daemon=True)
        self._thread.start()
        return None

    @staticmethod
    def _is_mine(previous: dict[str, Any]) -> bool:
        # A requeued SLURM job keeps its id: its earlier incarnation's lock is its own.
        job = current_job_id()
        return job is not None and previous.get("slurm_job_id") == job

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with _flock(self.run_dir.path / LOCK):
                current = read_json(self.path)
                if current is None or current.get("token") != self.token:
                    return  # taken over (we were presumed dead): stop touching it
                self._info["heartbeat"] = time.time()
                try:
                    records.atomic_write_json(self.path, self._info)
                except BenchError:  # a full disk: the next beat tries again; the training reports it
                    pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with _flock(self.run_dir.path / LOCK):
            current = read_json(self.path)
            if current is not None and current.get("token") == self.token:
                self.path.unlink(missing_ok=True)


class RunHeldError(BenchError):
    """Another live process holds the run's lock."""

    def __init__(self, run_dir: RunDir, holder: dict[str, Any]) -> None:
        self.holder = holder
        super().__init__(f"{display_path(run_dir.path)}: already being trained by {describe_holder(holder)}; "
                         "not started twice (--wait waits for it to finish; `bench status` shows it)")


def describe_holder(holder: dict[str, Any]) -> str:
    """``host H pid P`` of a running.json, with its SLURM job and start time when known."""
    text = f"host {holder.get('host')} pid {holder.get('pid')}"
    if holder.get("slurm_job_id"):
        text += f" (SLURM job {holder['slurm_job_id']})"
    started = holder.get("started")
    if isinstance(started, (int, float)):
        text += f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"
    return text


_HELD: dict[Path, int] = {}  # run folders this process holds, with how many nested holds


@contextmanager
def hold_run(run_dir: RunDir, wait: bool = False, on_wait: Any = None) -> Iterator[None]:
    """Hold the run's lock for the block (creating the run folder). A live holder elsewhere raises
    :class:`RunHeldError`, or with ``wait`` is waited for (``on_wait(holder)`` is called once, e.g. to say
    so). Re-entrant within this process."""
    key = run_dir.path.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    try:
        run_dir.path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise records.RecordWriteError(run_dir.path, error) from None
    lock = RunLock(run_dir)
    told = False
    while (holder := lock.acquire()) is not None:
        if not wait:
            raise RunHeldError(run_dir, holder)
        if not told and on_wait is not None:
            on_wait(holder)
        told = True
        time.sleep(WAIT_POLL_SECONDS)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        lock.release()
