"""Sweeps: methods x datasets x hyperparameter draws x seeds, run locally or on SLURM; ``bench status``.

A sweep is planned, never stored as a to-do list: the plan is a pure function of the sweep's settings
(same flags -> same run folders), and every run's state is read from its run folder, the single source
of truth (bench.records). A rerun of the same sweep therefore launches only what is not finished.

Protocol. Hyperparameter draw ``i`` is seeded by ``i`` alone (methods.base.sample_hparams), so every seed
of a draw trains the same hyperparameters; draw 0 is the method's defaults. ``--stage all`` runs every
draw at every seed; ``--stage search`` runs the draws at ``--search-seeds`` seeds; ``--stage seeds`` picks,
per (method, dataset), the draw with the best mean validation score of the ``--select`` rule over its
finished search runs, and runs it at ``--seeds`` seeds (seed 0 is the search run itself, already done).

Files a sweep adds to a run folder (besides what bench.runner writes):

* ``submitted.json``: written by the launcher when it hands the run to SLURM or to a local process:
  launcher, job id, sweep id, log folder. While that job is alive, the run is *pending* and is not
  launched again.
* ``running.json``: the lock of a live training process: host, pid (and the process's start time, which
  catches pid reuse), SLURM job id, start and heartbeat times (refreshed every 30 s by a thread). It is
  taken under an ``flock`` of ``.lock`` and deleted when the process ends. A lock whose holder is gone
  (dead pid on the same host; a SLURM job that no longer runs; else a heartbeat older than 5 minutes)
  is stale and is taken over, which is how a killed or requeued run resumes.

Preemption and time limits: on SLURM the training job is a ``submitit.helpers.Checkpointable``. When
SLURM signals a time-out or a preemption, submitit calls its ``checkpoint()``, which resubmits the same
task; the requeued job finds the run's ``checkpoint.pt`` (written after every epoch) and resumes there
(bench.trainer.train). A run killed any other way resumes the same way when the sweep is rerun.

Logs of submitit go to ``<out>/.submitit/<sweep id>/``; the sweep's settings and planned run folders
to ``<out>/.sweeps/<sweep id>.json`` (written when launching, identical on every rerun), which is what
``bench status OUT`` reads.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, JobPaths

from bench import records
from bench.errors import BenchError, ConfigError, DataError
from bench.records import RunDir
from bench.selection import DEFAULT_RULE, RULES

STAGES = ("all", "search", "seeds")
LAUNCHERS = ("local", "local-parallel", "slurm")
# Rules that give a validation score to compare draws by (``last`` has none; ``oracle-test`` is not valid).
SWEEP_RULES = tuple(name for name in RULES if name.startswith("val-"))

RUNNING = "running.json"
SUBMITTED = "submitted.json"
LOCK = ".lock"
FAILED_BEFORE = "failed.previous.json"  # failed.json of a run relaunched by --retry-failed

HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0  # a heartbeat this old means the holder is gone (when nothing better can tell)
MAX_ARRAY_SIZE = 1000  # SLURM's default MaxArraySize is 1001: larger sweeps are split into several arrays

# Run states, in the order status prints them.
DONE, RUNNING_STATE, PENDING, FAILED, INTERRUPTED, NOT_LAUNCHED = (
    "done", "running", "pending", "failed", "interrupted", "not launched"
)
STATE_ORDER = (DONE, RUNNING_STATE, PENDING, FAILED, INTERRUPTED, NOT_LAUNCHED)
LAUNCHABLE = (INTERRUPTED, NOT_LAUNCHED)

# SLURM job states (squeue %T / sacct State) that end a job without it having finished its run.
SLURM_FAILURE_STATES = {"FAILED", "OUT_OF_MEMORY", "NODE_FAIL", "TIMEOUT", "BOOT_FAIL", "DEADLINE"}
SLURM_RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING"}


# --------------------------------------------------------------------------------------------
# Settings: a sweep file and/or flags


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep runs. Everything here except ``out``/``data_root``/``device``/``workers`` defines the
    sweep id; launch settings (partition, memory, ...) do not, so a sweep can be relaunched elsewhere."""

    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    seeds: int = 1
    n_hparams: int = 1
    stage: str = "all"
    search_seeds: int = 1
    select: str = DEFAULT_RULE
    epochs: int | None = None
    hparams: tuple[str, ...] = ()
    backbone: str | None = None
    weights: str | None = None
    data_options: tuple[tuple[str, str], ...] = ()
    data_root: str | None = None
    out: str = "results"
    device: str = "auto"
    workers: int = 0
    deterministic: bool = False  # like device: how the runs compute, not what; not in the sweep id

    def identity(self) -> dict[str, Any]:
        """The fields that define which runs the sweep plans."""
        spec = {
            "stage": self.stage,
            "methods": list(self.methods),
            "datasets": list(self.datasets),
            "n_hparams": self.n_hparams,
            "epochs": self.epochs,
            "hparams": list(self.hparams),
            "backbone": self.backbone,
            "weights": self.weights,
            "data_options": dict(self.data_options),
        }
        if self.stage in ("all", "seeds"):
            spec["seeds"] = self.seeds
        if self.stage in ("search", "seeds"):
            spec["search_seeds"] = self.search_seeds
        if self.stage == "seeds":
            spec["select"] = self.select
        return spec

    @property
    def sweep_id(self) -> str:
        return f"{self.stage}-{records.config_hash(self.identity())}"


@dataclass(frozen=True)
class LaunchOptions:
    """How to launch: the launcher and its resources. None leaves a SLURM setting to the cluster."""

    launcher: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str = "24:00:00"
    array_parallelism: int | None = None
    max_timeouts: int = 3
    sbatch_args: tuple[tuple[str, str | bool], ...] = ()

    @property
    def timeout_min(self) -> int:
        return parse_slurm_time(self.time)


SPEC_KEYS = {f for f in SweepSpec.__dataclass_fields__}
LAUNCH_KEYS = {f for f in LaunchOptions.__dataclass_fields__}
FILE_ONLY_ALIASES = {"slurm_account": "account", "slurm_qos": "qos", "data_option": "data_options",
                     "sbatch_arg": "sbatch_args"}


def parse_slurm_time(text: str) -> int:
    """SLURM time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not match:
        raise ConfigError(f"--time {text!r}: expected a SLURM time such as 90, 12:00:00 or 1-12:00:00")
    days, first, second, third = match.groups()
    if days is not None:  # D-H[:M[:S]]
        seconds = int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
    elif third is not None:  # H:M:S
        seconds = int(first) * 3600 + int(second) * 60 + int(third)
    elif second is not None:  # M:S
        seconds = int(first) * 60 + int(second)
    else:  # M
        seconds = int(first) * 60
    if seconds <= 0:
        raise ConfigError(f"--time {text!r}: must be positive")
    return math.ceil(seconds / 60)


def _as_list(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    raise ConfigError(f"{key}: expected a list or a comma-separated string, got {value!r}")


def _as_pairs(key: str, value: Any, allow_flag: bool = False) -> tuple[tuple[str, Any], ...]:
    """A mapping, or KEY=VALUE strings (KEY alone means a flag where ``allow_flag``), as sorted pairs."""
    if value is None:
        return ()
    if isinstance(value, dict):
        return tuple(sorted((str(k), v if isinstance(v, bool) else str(v)) for k, v in value.items()))
    pairs: dict[str, Any] = {}
    for item in _as_list(key, value) if isinstance(value, str) else value:
        item = str(item)
        if "=" in item:
            name, text = item.split("=", 1)
            pairs[name.strip()] = text.strip()
        elif allow_flag:
            pairs[item.strip()] = True
        else:
            raise ConfigError(f"{key} {item!r}: expected KEY=VALUE")
    return tuple(sorted(pairs.items()))


def _as_int(key: str, value: Any, minimum: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    try:
        number = int(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{key}: must be at least {minimum}, got {number}")
    return number


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML (.yaml/.yml) or TOML (.toml) sweep file; keys as the flags, with ``_`` or ``-``,
    and SLURM settings either at the top level or in a ``slurm`` table."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path}: not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            content = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            content = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"sweep file {path}: expected a .yaml, .yml or .toml file")
    except ConfigError:
        raise
    except Exception as error:  # parse errors of either format: one line with the parser's message
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"sweep file {path}: cannot parse it ({first_line})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"sweep file {path}: expected a mapping of settings at the top level")
    settings: dict[str, Any] = {}
    for key, value in content.items():
        if key == "slurm" and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                settings[_normalise_key(path, sub_key)] = sub_value
        else:
            settings[_normalise_key(path, key)] = value
    return settings


def _normalise_key(path: Path, key: str) -> str:
    name = str(key).replace("-", "_")
    name = FILE_ONLY_ALIASES.get(name, name)
    if name not in SPEC_KEYS | LAUNCH_KEYS:
        known = ", ".join(sorted(SPEC_KEYS | LAUNCH_KEYS))
        raise ConfigError(f"sweep file {path}: unknown setting {key!r}; known: {known}")
    return name


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    return value


def build_settings(settings: dict[str, Any]) -> tuple[SweepSpec, LaunchOptions]:
    """Validate merged settings (file < flags) into a spec and launch options; ConfigError on bad input."""
    methods = _as_list("methods", settings.get("methods"))
    datasets = _as_list("datasets", settings.get("datasets"))
    if not methods:
        raise ConfigError("no methods: pass --methods erm,jtt,... or set methods in the sweep file")
    if not datasets:
        raise ConfigError("no datasets: pass --datasets waterbirds-synth,... or set datasets in the sweep file")
    stage = settings.get("stage") or "all"
    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
    select = settings.get("select") or DEFAULT_RULE
    if select not in SWEEP_RULES:
        raise ConfigError(f"--select {select!r}: a sweep compares draws by a validation score; "
                          f"choose one of {', '.join(SWEEP_RULES)}")
    hparams = settings.get("hparams")
    if isinstance(hparams, dict):
        hparam_items = tuple(f"{k}={v}" for k, v in sorted(hparams.items()))
    else:
        hparam_items = tuple(_as_list("hparams", hparams) if isinstance(hparams, str) else (hparams or ()))
    spec = SweepSpec(
        methods=tuple(dict.fromkeys(methods)),
        datasets=tuple(dict.fromkeys(datasets)),
        seeds=_as_int("seeds", settings.get("seeds", 1), 1),  # type: ignore[arg-type]
        n_hparams=_as_int("n_hparams", settings.get("n_hparams", 1), 1),  # type: ignore[arg-type]
        stage=stage,
        search_seeds=_as_int("search_seeds", settings.get("search_seeds", 1), 1),  # type: ignore[arg-type]
        select=select,
        epochs=_as_int("epochs", settings.get("epochs"), 0, optional=True),
        hparams=tuple(str(h) for h in hparam_items),
        backbone=settings.get("backbone"),
        weights=settings.get("weights"),
        data_options=_as_pairs("data_options", settings.get("data_options")),
        data_root=str(settings["data_root"]) if settings.get("data_root") else None,
        out=str(settings.get("out") or "results"),
        device=str(settings.get("device") or "auto"),
        workers=_as_int("workers", settings.get("workers", 0), 0),  # type: ignore[arg-type]
        deterministic=_as_bool("deterministic", settings.get("deterministic", False)),
    )
    launcher = settings.get("launcher") or "local"
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    mem = settings.get("mem")
    if mem is not None and not re.fullmatch(r"\d+[KMGT]?B?", str(mem).strip(), flags=re.IGNORECASE):
        raise ConfigError(f"--mem {mem!r}: expected a SLURM memory size such as 32G or 16000M")
    options = LaunchOptions(
        launcher=launcher,
        partition=settings.get("partition"),
        account=settings.get("account"),
        qos=settings.get("qos"),
        constraint=settings.get("constraint"),
        gpus_per_task=_as_int("gpus_per_task", settings.get("gpus_per_task"), 0, optional=True),
        cpus_per_task=_as_int("cpus_per_task", settings.get("cpus_per_task"), 1, optional=True),
        mem=str(mem).strip() if mem is not None else None,
        time=str(settings.get("time") or "24:00:00"),
        array_parallelism=_as_int("array_parallelism", settings.get("array_parallelism"), 1, optional=True),
        max_timeouts=_as_int("max_timeouts", settings.get("max_timeouts", 3), 0),  # type: ignore[arg-type]
        sbatch_args=_as_pairs("sbatch_args", settings.get("sbatch_args"), allow_flag=True),
    )
    options.timeout_min  # noqa: B018  (validates --time now, not at submission)
    return spec, options


# --------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: which (method, dataset, draw, seed), its request and its folder."""

    method: str
    dataset: str
    draw: int
    seed: int
    request: Any  # bench.runner.RunRequest (imported lazily: planning must stay cheap)
    run_dir: RunDir
    tuned: tuple[tuple[str, Any], ...] = ()  # the drawn hyperparameter values, for display

    def describe(self) -> str:
        values = " ".join(f"{k}={_short(v)}" for k, v in self.tuned) if self.draw else "defaults"
        return f"{self.method} {self.dataset} draw {self.draw} seed {self.seed} ({values})"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _data_root(spec: SweepSpec, dataset: str) -> str | None:
    """The dataset's data root as an absolute path (jobs may start elsewhere); DataError when the
    dataset needs files that are not there, so a sweep does not submit hundreds of doomed jobs."""
    from datasets import get_dataset, resolve_data_root

    source = get_dataset(dataset)
    root = resolve_data_root(spec.data_root)
    if source.needs_data_root:
        if root is None:
            raise DataError(f"dataset {dataset!r} needs its files: pass --data-root DIR or set BENCH_DATA_ROOT"
                            + (f" ({source.obtain_hint})" if source.obtain_hint else ""))
        if source.locate(root) is None:
            raise DataError(f"dataset {dataset!r}: its files are not under {root}"
                            + (f" ({source.obtain_hint})" if source.obtain_hint else ""))
    return str(root.resolve()) if root is not None else None


def _runs_for(
    spec: SweepSpec, draws_by_pair: dict[tuple[str, str], list[int]], seeds: Sequence[int]
) -> list[PlannedRun]:
    from bench.runner import RunRequest, run_identity
    from methods import get_method
    from methods.base import hparam_specs

    out = str(Path(spec.out).expanduser().resolve())
    runs: list[PlannedRun] = []
    for dataset in spec.datasets:
        data_root = _data_root(spec, dataset)
        for method in spec.methods:
            tuned_names = [n for n, h in hparam_specs(get_method(method)).items() if h.search is not None]
            for draw in draws_by_pair[(method, dataset)]:
                request = RunRequest(
                    method=method, dataset=dataset, hparams=list(spec.hparams), epochs=spec.epochs,
                    backbone=spec.backbone, data_root=data_root, dataset_options=dict(spec.data_options),
                    weights=spec.weights, out=out, device=spec.device, workers=spec.workers, draw=draw,
                    deterministic=spec.deterministic,
                )
                identity = run_identity(request)  # validates method, dataset, hparams; loads nothing
                tuned = tuple((n, identity["hparams"][n]) for n in tuned_names)
                for seed in seeds:
                    run_dir = RunDir.for_run(out, dataset, method, identity, seed)
                    runs.append(PlannedRun(method, dataset, draw, seed, request, run_dir, tuned))
    return runs


def plan(spec: SweepSpec, best: dict[tuple[str, str], tuple[int, float]] | None = None) -> list[PlannedRun]:
    """The sweep's runs, in a fixed order (dataset, method, draw, seed). Loads no data, trains nothing.
    Stage ``seeds`` reads the search runs' records (or takes ``best``, from :func:`best_draws`)."""
    pairs = [(m, d) for d in spec.datasets for m in spec.methods]
    if spec.stage == "all":
        return _runs_for(spec, {p: list(range(spec.n_hparams)) for p in pairs}, range(spec.seeds))
    if spec.stage == "search":
        return _runs_for(spec, {p: list(range(spec.n_hparams)) for p in pairs}, range(spec.search_seeds))
    best = best if best is not None else best_draws(spec)
    return _runs_for(spec, {p: [best[p][0]] for p in pairs}, range(spec.seeds))


def search_plan(spec: SweepSpec) -> list[PlannedRun]:
    return plan(replace(spec, stage="search"))


def validation_score(run_dir: RunDir, rule: str) -> float:
    """The rule's validation score of a finished run's primary model, at the evaluation the rule selects
    (bench.selection), recomputed from the run's records."""
    from bench.metrics import GroupStructure
    from bench.selection import select

    config = run_dir.read_config()
    structure = GroupStructure.from_info(config["dataset_info"])
    metric_records = run_dir.read_metrics()
    primary = config["primary"]
    index = select(metric_records, primary, structure, rule)
    counts = metric_records[index]["eval"][primary]["val"]
    score = RULES[rule][1]
    assert score is not None  # SWEEP_RULES only holds rules with a score
    return float(score((counts["correct"], counts["total"]), structure))


def best_draws(spec: SweepSpec) -> dict[tuple[str, str], tuple[int, float]]:
    """Per (method, dataset): the draw with the best mean validation score over its finished search runs
    (ties: the lower draw), and that score. ConfigError while the search stage is not finished."""
    runs = search_plan(spec)
    statuses = classify_runs(runs)
    unfinished = Counter((r.method, r.dataset) for r, s in zip(runs, statuses) if s.state not in (DONE, FAILED))
    if unfinished:
        pairs = ", ".join(f"{m} on {d} ({n} runs)" for (m, d), n in sorted(unfinished.items()))
        raise ConfigError(f"--stage seeds needs the search stage finished; not yet: {pairs}. "
                          "Run the same command with --stage search, and check `bench status`")
    scores: dict[tuple[str, str], dict[int, list[float]]] = {}
    for run, status in zip(runs, statuses):
        per_draw = scores.setdefault((run.method, run.dataset), {})
        if status.state == DONE:
            value = validation_score(run.run_dir, spec.select)
            if not math.isnan(value):
                per_draw.setdefault(run.draw, []).append(value)
    best: dict[tuple[str, str], tuple[int, float]] = {}
    for pair, per_draw in scores.items():
        if not per_draw:
            raise ConfigError(f"every search run of {pair[0]} on {pair[1]} failed; see `bench status`")
        means = {draw: sum(v) / len(v) for draw, v in per_draw.items()}
        draw = max(sorted(means), key=lambda d: means[d])  # sorted + max: the lowest draw wins ties
        best[pair] = (draw, means[draw])
    return best


# --------------------------------------------------------------------------------------------
# Run state: locks, liveness, SLURM queries


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _process_start(pid: int) -> str | None:
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


def _pid_alive(pid: Any, started: str | None) -> bool:
    if not isinstance(pid, int):
        return False
    now = _process_start(pid)
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


def _holder_alive(info: dict[str, Any], job_states: dict[str, str]) -> bool:
    """Whether the process that wrote running.json still runs: by pid on the same host, else by its SLURM
    job's state, else by the age of its heartbeat."""
    if info.get("host") == socket.gethostname():
        return _pid_alive(info.get("pid"), info.get("pid_start"))
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
            previous = _read_json(self.path)
            if previous is not None and not self._is_mine(previous):
                job = previous.get("slurm_job_id")
                if _holder_alive(previous, slurm_job_states([job], strict=False) if job else {}):
                    return previous
            now = time.time()
            self._info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_start": _process_start(os.getpid()),
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
                current = _read_json(self.path)
                if current is None or current.get("token") != self.token:
                    return  # taken over (we were presumed dead): stop touching it
                self._info["heartbeat"] = time.time()
                records.atomic_write_json(self.path, self._info)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with _flock(self.run_dir.path / LOCK):
            current = _read_json(self.path)
            if current is not None and current.get("token") == self.token:
                self.path.unlink(missing_ok=True)


@dataclass
class RunStatus:
    """A planned run's state, the job that runs (or ran) it, and one line on why."""

    state: str
    job_id: str | None = None
    detail: str = ""
    submitted: dict[str, Any] | None = None


def _job_ids_of(run_dirs: Iterable[RunDir]) -> tuple[dict[Path, dict], dict[Path, dict], set[str]]:
    submitted, running, slurm_ids = {}, {}, set()
    for run_dir in run_dirs:
        if not run_dir.path.is_dir():
            continue
        sub = _read_json(run_dir.path / SUBMITTED)
        if sub is not None:
            submitted[run_dir.path] = sub
            if sub.get("launcher") == "slurm" and sub.get("job_id"):
                slurm_ids.add(str(sub["job_id"]))
        held = _read_json(run_dir.path / RUNNING)
        if held is not None:
            running[run_dir.path] = held
            if held.get("slurm_job_id"):
                slurm_ids.add(str(held["slurm_job_id"]))
    return submitted, running, slurm_ids


def classify(run_dir: RunDir, submitted: dict | None, held: dict | None, job_states: dict[str, str]) -> RunStatus:
    """State of one run from its folder (and the states of the jobs its files name)."""
    job_id = str(submitted["job_id"]) if submitted and submitted.get("job_id") else None
    if run_dir.is_done():
        return RunStatus(DONE, job_id, submitted=submitted)
    failure = _read_json(run_dir.failed)
    if failure is not None:
        return RunStatus(FAILED, job_id, f"{failure.get('error_type')}: {failure.get('reason')}", submitted)
    if held is not None and _holder_alive(held, job_states):
        where = f"{held.get('host')} pid {held.get('pid')}"
        return RunStatus(RUNNING_STATE, held.get("slurm_job_id") or job_id, where, submitted)
    if submitted is not None:
        if submitted.get("launcher") == "slurm" and job_id:
            state = job_states.get(job_id)
            if state in SLURM_RUNNING_STATES:
                return RunStatus(RUNNING_STATE, job_id, f"SLURM {state}, starting", submitted)
            if state is not None and state not in SLURM_FAILURE_STATES | {"COMPLETED", "CANCELLED", "PREEMPTED"}:
                return RunStatus(PENDING, job_id, f"SLURM {state}", submitted)
            if state in SLURM_FAILURE_STATES:
                return RunStatus(FAILED, job_id, f"SLURM job {job_id} ended {state} without a result", submitted)
        elif submitted.get("host") == socket.gethostname() and _pid_alive(submitted.get("pid"),
                                                                           submitted.get("pid_start")):
            return RunStatus(PENDING, job_id, f"{submitted.get('launcher')} job {job_id}", submitted)
    started = held is not None or submitted is not None or run_dir.config.exists() or run_dir.checkpoint.exists()
    if started:
        return RunStatus(INTERRUPTED, job_id, "started, not running: a rerun resumes it", submitted)
    return RunStatus(NOT_LAUNCHED)


def classify_runs(runs: Sequence[PlannedRun]) -> list[RunStatus]:
    submitted, running, slurm_ids = _job_ids_of(r.run_dir for r in runs)
    job_states = slurm_job_states(slurm_ids)
    return [classify(r.run_dir, submitted.get(r.run_dir.path), running.get(r.run_dir.path), job_states)
            for r in runs]


# --------------------------------------------------------------------------------------------
# The job: one run, in this process or on a node


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
    run_dir.path.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    holder = lock.acquire()
    if holder is not None:
        where = f"{holder.get('host')} pid {holder.get('pid')} job {holder.get('slurm_job_id')}"
        print(f"{run_dir.path}: already running ({where}); not started twice", flush=True)
        return {"status": "skipped", "reason": f"already running on {where}"}
    try:
        _limit_threads(task.threads)
        if run_dir.checkpoint.exists():
            print(f"{run_dir.path}: resuming from its checkpoint ({len(run_dir.read_metrics())} evaluations "
                  "recorded)", flush=True)
        prepared = prepare(task.request)
        actual = prepared.run_dir(task.seed).path
        if actual.resolve() != run_dir.path.resolve():
            raise RuntimeError(f"this run now resolves to {actual}, not to the planned {run_dir.path}: the code "
                               "or a dataset's defaults changed since the sweep was planned; rerun `bench sweep`")
        result = execute(prepared, task.seed, quiet=quiet)
    except Exception as error:  # anything that escapes the runner (user errors, bugs): recorded for status
        records.atomic_write_json(run_dir.failed, failure_record(error))
        raise
    finally:
        lock.release()
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


# --------------------------------------------------------------------------------------------
# Launchers


def _logs_folder(spec: SweepSpec) -> Path:
    return Path(spec.out).expanduser().resolve() / ".submitit" / spec.sweep_id


def _task(run: PlannedRun, threads: int | None) -> RunTask:
    return RunTask(request=run.request, seed=run.seed, run_dir=str(run.run_dir.path), threads=threads,
                   label=run.describe())


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
            result = run_task(_task(run, None), quiet=quiet)
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
    print(f"running {len(queue)} run(s), {parallelism} at a time; logs in {_display_path(_logs_folder(spec))}",
          file=sys.stderr)
    finished = 0
    try:
        while queue or active:
            while queue and len(active) < parallelism:
                run = queue.pop(0)
                gpus = [gpu_pool.pop(0) for _ in range(gpus_per_task)]
                executor.update_parameters(timeout_min=options.timeout_min, gpus_per_node=len(gpus),
                                           visible_gpus=tuple(gpus))
                job = executor.submit(RunJob(), _task(run, cpus))
                controller = int(job.job_id)  # the LocalExecutor's job id is its controller's pid
                _write_submitted(run, spec, "local-parallel", job,
                                 {"pid": controller, "pid_start": _process_start(controller)})
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
            jobs = executor.map_array(RunJob(), [_task(run, None) for run in chunk])
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
        if not any(s.state in (PENDING, RUNNING_STATE) for s in statuses):
            return statuses
        time.sleep(min(15.0, poll_seconds + (time.time() - started) / 60))


# --------------------------------------------------------------------------------------------
# Manifests and status


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
    if _read_json(path) != content:
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
        if status.state == FAILED:
            failure = _read_json(run.run_dir.failed)
            traceback_lines = [line for line in str((failure or {}).get("traceback", "")).splitlines() if line.strip()]
            log = _job_log(status.submitted, status.job_id)
            failed.append({
                "run": run.describe() if run.draw >= 0 else f"{run.method} {run.dataset} seed {run.seed}",
                "run_dir": _display_path(run.run_dir.path),
                "job_id": status.job_id,
                "error": status.detail,
                "traceback_tail": traceback_lines[-lines:],
                "log": _display_path(log) if log else None,
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


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def format_report(report: dict[str, Any]) -> str:
    counts = report["counts"]
    lines = [f"{report['sweep']}: {report['n_runs']} runs in {_display_path(Path(report['out']))}",
             "  " + " | ".join(f"{state} {counts[state]}" for state in STATE_ORDER)]
    if report["slurm_jobs"]:
        jobs = "; ".join(f"{job} ({', '.join(f'{n} {s}' for s, n in sorted(c.items()))})"
                         for job, c in report["slurm_jobs"].items())
        lines.append(f"  SLURM jobs: {jobs}")
    for failure in report["failed"]:
        job = f" [job {failure['job_id']}]" if failure["job_id"] else ""
        lines.append(f"  FAILED {failure['run']}{job}: {failure['error']}")
        lines.append(f"    folder: {failure['run_dir']}")
        for line in failure["traceback_tail"]:
            lines.append(f"    | {line}")
        if failure["log"]:
            lines.append(f"    log: {failure['log']}")
        for line in failure["log_tail"]:
            lines.append(f"    log | {line}")
    return "\n".join(lines)


def status_reports(target: str, lines: int = 5) -> list[dict[str, Any]]:
    """Reports for ``bench status``: one per sweep of a results folder, or the sweep of a sweep file."""
    path = Path(target).expanduser()
    if path.is_file():
        spec, _ = build_settings(load_sweep_file(path))
        out = Path(spec.out).expanduser().resolve()
        return [sweep_report(f"sweep {spec.sweep_id} ({path.name})", out, plan(spec), lines)]
    if not path.is_dir():
        raise ConfigError(f"bench status {target}: no such results folder or sweep file")
    out = path.resolve()
    reports, listed = [], set()
    for manifest_file in sorted((out / ".sweeps").glob("*.json")):
        manifest = _read_json(manifest_file)
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


# --------------------------------------------------------------------------------------------
# Command line


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are None: a flag given on the command line overrides the sweep file, others do not.
    parser.add_argument("file", nargs="?", help="sweep file (.yaml/.yml/.toml) with the settings below")
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
    control.add_argument("--show", type=int, default=10, metavar="N", help="runs listed by --dry-run (default 10)")
    control.add_argument("--quiet", action="store_true", help="no progress bars (local launcher)")


FLAG_KEYS = sorted(SPEC_KEYS | LAUNCH_KEYS)


def settings_from_args(args: argparse.Namespace) -> tuple[SweepSpec, LaunchOptions]:
    settings: dict[str, Any] = load_sweep_file(args.file) if args.file else {}
    for key in FLAG_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    return build_settings(settings)


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
    relaunch = LAUNCHABLE + ((FAILED,) if args.retry_failed else ())
    to_launch = [run for run, status in zip(runs, statuses) if status.state in relaunch]
    planned_in = time.perf_counter() - started
    out = _display_path(Path(spec.out).expanduser().resolve())
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATE_ORDER)
    print(f"sweep {spec.sweep_id}: {len(runs)} runs in {out} ({summary}); planned in {planned_in:.2f} s")
    if best is not None:
        for (method, dataset), (draw, score) in sorted(best.items()):
            print(f"  best draw of {method} on {dataset}: {draw} (mean {spec.select} {100 * score:.1f})")
    if counts.get(FAILED) and not args.retry_failed:
        print(f"  {counts[FAILED]} failed runs are left alone (see `bench status {out}`; --retry-failed "
              "relaunches them)")
    if args.dry_run:
        print(f"would launch {len(to_launch)} runs with --launcher {options.launcher}" + (":" if to_launch else ""))
        for run in to_launch[: args.show]:
            print(f"  {run.describe()} -> {_display_path(run.run_dir.path)}")
        if len(to_launch) > args.show:
            print(f"  ... and {len(to_launch) - args.show} more")
        return 0
    if not to_launch:
        print("nothing to launch")
        return 0
    write_manifest(spec, runs)
    for run in to_launch:
        _retry(run)
    if options.launcher == "local":
        launch_local(spec, to_launch, args.quiet)
    elif options.launcher == "local-parallel":
        launch_local_parallel(spec, options, to_launch)
    else:
        array_ids = launch_slurm(spec, options, to_launch)
        print(f"submitted {len(to_launch)} runs as SLURM job array(s) {', '.join(array_ids)}; "
              f"logs in {_display_path(_logs_folder(spec))}")
        if not args.wait:
            print(f"follow with: bench status {out}")
            return 0
        wait_for(to_launch)
    report = sweep_report(f"sweep {spec.sweep_id}", Path(spec.out).expanduser().resolve(), runs, lines=5)
    print(format_report(report))
    return 1 if report["counts"][FAILED] else 0


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


__all__ = [
    "LaunchOptions", "PlannedRun", "RunJob", "RunLock", "RunStatus", "RunTask", "SweepSpec", "best_draws",
    "build_settings", "classify_runs", "load_sweep_file", "parse_slurm_time", "plan", "register", "run_task",
    "status_reports", "sweep_report", "validation_score",
]
