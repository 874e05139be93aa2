"""Sweeps without SLURM: settings, planning, idempotence, dry runs, the run lock, run states, stage
selection, and the local launchers (in process, and submitit's LocalExecutor), including a killed run
that resumes. The same code against a real SLURM cluster: tests/test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import write_custom_dataset

from bench.cli import main
from bench.core import records
from bench.core.errors import ConfigError, DataError
from bench.core.records import RunDir
from bench.run_lock import RUNNING, STALE_AFTER_SECONDS, RunLock, process_start
from bench.runner import RunRequest, run_identity
from bench.sweep import cli as sweep_cli
from bench.sweep import state as sweep_state
from bench.sweep.jobs import run_task, task_for
from bench.sweep.plan import best_draws, plan, search_plan
from bench.sweep.settings import SweepSpec, build_settings, load_sweep_file, parse_slurm_time
from bench.sweep.state import SUBMITTED, RunState, classify, classify_runs
from bench.sweep.status import format_report, sweep_report

TINY = ["--hparams", "backbone=small-cnn", "pretrained=false", "batch_size=16", "--epochs", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_custom_dataset(tmp_path_factory.mktemp("sweep-data"), n_per_group=6)


@pytest.fixture
def one_thread():
    """Runs trained in this process and in subprocesses (OMP_NUM_THREADS=1) give identical numbers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spec(data: Path, out: Path, **changes) -> SweepSpec:
    settings = {"methods": "erm", "datasets": "custom", "data_root": str(data), "out": str(out),
                "hparams": ["backbone=small-cnn", "pretrained=false", "batch_size=16"], "epochs": 2, **changes}
    return build_settings(settings)[0]


# -- settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,minutes", [("90", 90), ("1:30", 2), ("12:00:00", 720), ("1-0", 1440),
                                          ("2-01:30", 2970), ("0-00:00:30", 1)])
def test_slurm_time_formats(text, minutes):
    assert parse_slurm_time(text) == minutes


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "0", "12h"])
def test_bad_slurm_time_is_a_config_error(text):
    with pytest.raises(ConfigError, match="--time"):
        parse_slurm_time(text)


def test_sweep_file_yaml_and_toml_give_the_flags_settings(tmp_path):
    flags = build_settings({"methods": "erm,jtt", "datasets": "waterbirds-synth", "seeds": 3, "n_hparams": 4,
                            "hparams": ["lr=0.01"], "launcher": "slurm", "partition": "gpu", "mem": "32G",
                            "time": "12:00:00", "sbatch_args": ["reservation=r1", "exclusive"]})
    (tmp_path / "s.yaml").write_text(
        "methods: [erm, jtt]\ndatasets: waterbirds-synth\nseeds: 3\nn-hparams: 4\nhparams: {lr: 0.01}\n"
        "launcher: slurm\nslurm:\n  partition: gpu\n  mem: 32G\n  time: '12:00:00'\n"
        "  sbatch-args: {reservation: r1, exclusive: true}\n")
    (tmp_path / "s.toml").write_text(
        'methods = ["erm", "jtt"]\ndatasets = "waterbirds-synth"\nseeds = 3\nn_hparams = 4\nhparams = ["lr=0.01"]\n'
        'launcher = "slurm"\n[slurm]\npartition = "gpu"\nmem = "32G"\ntime = "12:00:00"\n'
        'sbatch_args = ["reservation=r1", "exclusive"]\n')
    for name in ("s.yaml", "s.toml"):
        assert build_settings(load_sweep_file(tmp_path / name)) == flags
    assert flags[1].timeout_min == 720
    assert dict(flags[1].sbatch_args) == {"reservation": "r1", "exclusive": True}


def test_flags_override_the_sweep_file(tmp_path):
    (tmp_path / "s.yaml").write_text("methods: erm\ndatasets: custom\nseeds: 5\nout: from-file\n")
    parser = __import__("bench.cli", fromlist=["build_parser"]).build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    sweep_cli.register({"top": subparsers})
    args = parser.parse_args(["sweep", str(tmp_path / "s.yaml"), "--seeds", "2"])
    spec, _ = sweep_cli.settings_from_args(args)
    assert (spec.seeds, spec.out, spec.methods) == (2, "from-file", ("erm",))


@pytest.mark.parametrize("content,expected", [
    ("methods: erm\ndatasets: custom\nlearning_rate: 1\n", "unknown setting 'learning_rate'"),
    ("methods: erm\ndatasets: custom\nseeds: two\n", "seeds: expected an integer"),
    ("methods: erm\ndatasets: custom\nstage: final\n", "--stage 'final'"),
    ("methods: erm\ndatasets: custom\nselect: last\n", "--select 'last'"),
    ("methods: erm\ndatasets: custom\nmem: lots\n", "--mem 'lots'"),
    ("datasets: custom\n", "no methods"),
    ("methods: [erm\n", "cannot parse it"),
])
def test_bad_sweep_files_are_config_errors(tmp_path, content, expected):
    (tmp_path / "s.yaml").write_text(content)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        build_settings(load_sweep_file(tmp_path / "s.yaml"))


# -- planning ---------------------------------------------------------------------------------------


def test_plan_is_deterministic_and_shares_each_draw_across_seeds(data, tmp_path):
    spec = _spec(data, tmp_path / "out", seeds=3, n_hparams=4)
    runs = plan(spec)
    assert [r.run_dir.path for r in runs] == [r.run_dir.path for r in plan(spec)]
    assert len(runs) == 12 and len({r.run_dir.path for r in runs}) == 12
    folders_of_draw = {}
    for run in runs:
        folders_of_draw.setdefault(run.draw, set()).add(run.run_dir.path.parent)
        assert run.run_dir.path.name == f"seed{run.seed}"
    # one config folder per draw, shared by its seeds; four different draws
    assert all(len(folders) == 1 for folders in folders_of_draw.values())
    assert len(set.union(*folders_of_draw.values())) == 4
    # draw 0 is the method's defaults: the folder `bench run` uses for the same flags
    request = RunRequest(method="erm", dataset="custom", epochs=2, data_root=str(data),
                         hparam_overrides=["backbone=small-cnn", "pretrained=false", "batch_size=16"])
    plain = RunDir.for_run(str((tmp_path / "out").resolve()), "custom", "erm", run_identity(request), 0)
    assert runs[0].draw == 0 and runs[0].run_dir.path == plain.path


def test_draws_are_seeded_by_the_draw_alone_and_overrides_win(data, tmp_path):
    few = {(r.draw, r.tuned) for r in plan(_spec(data, tmp_path, n_hparams=3))}
    many = {(r.draw, r.tuned) for r in plan(_spec(data, tmp_path, n_hparams=5, seeds=2))}
    assert few < many  # draws 0..2 are the same whatever the number of draws and seeds
    fixed = plan(_spec(data, tmp_path, n_hparams=3, hparams=["backbone=small-cnn", "pretrained=false", "lr=0.5"]))
    assert {dict(r.tuned)["lr"] for r in fixed} == {0.5}


def test_sweep_id_depends_on_what_runs_not_on_how(data, tmp_path):
    spec = _spec(data, tmp_path)
    assert spec.sweep_id == _spec(data, tmp_path / "elsewhere").sweep_id
    assert spec.sweep_id.startswith("all-")
    assert spec.sweep_id != _spec(data, tmp_path, seeds=2).sweep_id
    assert _spec(data, tmp_path, stage="search").sweep_id.startswith("search-")


def test_plan_checks_the_data_and_hparams_before_anything_runs(data, tmp_path):
    with pytest.raises(ConfigError, match="unknown hparam"):
        plan(_spec(data, tmp_path, hparams=["learning_rate=1"]))
    with pytest.raises(DataError, match="not under"):
        plan(_spec(tmp_path / "missing", tmp_path))
    with pytest.raises(ConfigError, match="unknown method"):
        plan(_spec(data, tmp_path, methods="nope"))


def test_dry_run_lists_the_plan_and_writes_nothing(data, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["sweep", "--methods", "erm", "--datasets", "custom", "--data-root", str(data), "--out", str(out),
                   "--seeds", "3", "--n-hparams", "4", "--launcher", "slurm", "--dry-run", "--show", "2", *TINY])
    printed = capsys.readouterr().out
    assert status == 0
    assert "12 runs" in printed and "12 not launched" in printed
    assert "would launch 12 runs with --launcher slurm" in printed
    # One row per (dataset, method, draw): the first two of the four draws, seeds 0-2 each.
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in printed.splitlines()
            if line.startswith("| custom")]
    assert [(row[1], row[2], row[4]) for row in rows] == [("erm", "0", "0-2"), ("erm", "1", "0-2")]
    assert "... and 2 more (dataset, method, draw) rows" in printed
    assert "drawn hyperparameters:" in printed and f"erm on custom, draw 1 ({rows[1][3]}): lr=" in printed
    assert max(len(line) for line in printed.splitlines() if str(out.name) not in line) <= 100
    assert not out.exists()


def test_dry_run_table_fits_a_terminal_with_long_names(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--methods", "ule,dfr-train", "--datasets", "custom", "--data-root", str(data), "--out",
                 "out", "--seeds", "40", "--n-hparams", "3", "--dry-run", *TINY]) == 0
    printed = capsys.readouterr().out
    assert max(len(line) for line in printed.splitlines()) <= 100, max(printed.splitlines(), key=len)
    assert "ule on custom, draw 2" in printed  # ULE's many tuned hparams, wrapped


# -- run states and the lock ---------------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_run_lock_excludes_a_second_holder_and_releases(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    first, second = RunLock(run_dir), RunLock(run_dir)
    assert first.acquire() is None
    held = json.loads((run_dir.path / RUNNING).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    holder = second.acquire()
    assert holder is not None and holder["token"] == first.token
    first.release()
    assert not (run_dir.path / RUNNING).exists()
    assert second.acquire() is None
    second.release()


def test_a_stale_lock_is_taken_over(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    dead = _dead_pid()
    records.atomic_write_json(run_dir.path / RUNNING, {"host": socket.gethostname(), "pid": dead,
                                                       "heartbeat": time.time(), "token": "old"})
    assert classify(run_dir, None, json.loads((run_dir.path / RUNNING).read_text()), {}).state == RunState.INTERRUPTED
    lock = RunLock(run_dir)
    assert lock.acquire() is None
    assert json.loads((run_dir.path / RUNNING).read_text())["took_over"]["pid"] == dead
    lock.release()


def test_heartbeat_decides_for_a_holder_on_another_host(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    fresh = {"host": "elsewhere", "pid": 1, "heartbeat": time.time()}
    assert classify(run_dir, None, fresh, {}).state == RunState.RUNNING
    old = {**fresh, "heartbeat": time.time() - 2 * STALE_AFTER_SECONDS}
    assert classify(run_dir, None, old, {}).state == RunState.INTERRUPTED
    on_slurm = {**fresh, "slurm_job_id": "7_1"}
    assert classify(run_dir, None, on_slurm, {"7_1": "RUNNING"}).state == RunState.RUNNING
    assert classify(run_dir, None, on_slurm, {"7_1": "PENDING"}).state == RunState.INTERRUPTED  # requeued: not running


@pytest.mark.parametrize("job_state,expected", [("PENDING", RunState.PENDING), ("REQUEUED", RunState.PENDING),
                                                ("RUNNING", RunState.RUNNING),
                                                ("OUT_OF_MEMORY", RunState.FAILED), ("TIMEOUT", RunState.FAILED),
                                                ("CANCELLED", RunState.INTERRUPTED),
                                                ("COMPLETED", RunState.INTERRUPTED), (None, RunState.INTERRUPTED)])
def test_state_of_a_submitted_run_follows_its_slurm_job(tmp_path, job_state, expected):
    run_dir = RunDir(tmp_path / "run")
    submitted = {"launcher": "slurm", "job_id": "12_3"}
    status = classify(run_dir, submitted, None, {"12_3": job_state} if job_state else {})
    assert status.state == expected and status.job_id == "12_3"
    if expected == RunState.FAILED:
        assert job_state in status.detail


def test_files_in_the_run_folder_win_over_job_states(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    submitted = {"launcher": "slurm", "job_id": "5"}
    records.atomic_write_json(run_dir.failed, {"error_type": "NonFiniteLossError", "reason": "loss = nan"})
    assert classify(run_dir, submitted, None, {"5": "RUNNING"}).state == RunState.FAILED
    records.atomic_write_json(run_dir.final, {"status": "done"})
    assert classify(run_dir, submitted, None, {"5": "RUNNING"}).state == RunState.DONE
    assert classify(RunDir(tmp_path / "other"), None, None, {}).state == RunState.NOT_LAUNCHED


def test_a_local_job_is_pending_while_its_process_lives(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    alive = {"launcher": "local-parallel", "job_id": str(os.getpid()), "host": socket.gethostname(),
             "pid": os.getpid(), "pid_start": process_start(os.getpid())}
    assert classify(run_dir, alive, None, {}).state == RunState.PENDING
    dead = {**alive, "pid": _dead_pid(), "pid_start": None}
    assert classify(run_dir, dead, None, {}).state == RunState.INTERRUPTED


def test_a_running_run_is_not_launched_twice(data, tmp_path, capsys):
    spec = _spec(data, tmp_path / "out", seeds=2)
    runs = plan(spec)
    lock = RunLock(runs[0].run_dir)
    runs[0].run_dir.path.mkdir(parents=True)
    assert lock.acquire() is None
    try:
        main(["sweep", "--methods", "erm", "--datasets", "custom", "--data-root", str(data),
              "--out", str(tmp_path / "out"), "--seeds", "2", "--dry-run", *TINY])
        printed = capsys.readouterr().out
        assert "1 running" in printed and "would launch 1 runs" in printed
        row = next(line for line in printed.splitlines() if line.startswith("| custom"))
        assert row.split("|")[5].strip() == "1"  # seed 0 runs; seed 1 is launched
        # a job started anyway (e.g. by a concurrent sweep) sees the lock and does not train
        result = run_task(task_for(runs[0], None))
        assert result["status"] == "skipped" and "already running" in result["reason"]
        assert not runs[0].run_dir.config.exists()
    finally:
        lock.release()


# -- stage selection ---------------------------------------------------------------------------------


def _fake_finished_run(run_dir: RunDir, val_correct: list[int]) -> None:
    """A finished run's records with the given validation counts (4 groups of 10), without training."""
    info = {"n_classes": 2, "attr_value_names": [["red", "blue"]], "group_counts": {"train": [10, 10, 10, 10]},
            "average_kind": "plain"}
    records.atomic_write_json(run_dir.config, {"dataset_info": info, "primary": "model"})
    counts = {"val": {"correct": val_correct, "total": [10] * 4}, "test": {"correct": [5] * 4, "total": [10] * 4}}
    records.append_jsonl(run_dir.metrics, {"stage": "train", "epoch": 1, "selectable": True,
                                           "eval": {"model": counts}})
    records.atomic_write_json(run_dir.final, {"status": "done"})


def test_stage_seeds_runs_the_draw_with_the_best_mean_search_score(data, tmp_path):
    spec = _spec(data, tmp_path / "out", stage="seeds", n_hparams=3, search_seeds=2, seeds=4)
    search = search_plan(spec)
    assert len(search) == 6
    with pytest.raises(ConfigError, match="needs the search stage finished"):
        plan(spec)
    val_counts = {(0, 0): [10, 5, 10, 10], (0, 1): [10, 5, 10, 10],  # worst group 0.5, average 0.875
                  (1, 0): [10, 9, 10, 10], (1, 1): [10, 3, 10, 10],  # worst group mean 0.6, average 0.9
                  (2, 0): [7, 7, 7, 7], (2, 1): [7, 7, 7, 7]}  # worst group 0.7, average 0.7
    for run in search:
        _fake_finished_run(run.run_dir, val_counts[(run.draw, run.seed)])
    assert best_draws(spec)[("erm", "custom")] == (2, pytest.approx(0.7))
    seeds = plan(spec)
    assert [(r.draw, r.seed) for r in seeds] == [(2, 0), (2, 1), (2, 2), (2, 3)]
    # seeds 0 and 1 of the best draw are its search runs: already done, not run again
    assert [r.run_dir.path for r in seeds[:2]] == [r.run_dir.path for r in search if r.draw == 2]
    assert classify_runs(seeds)[0].state == RunState.DONE
    by_average = replace(spec, select="val-avg")
    assert best_draws(by_average)[("erm", "custom")] == (1, pytest.approx(0.9))


def test_failed_search_runs_are_left_out_of_the_selection(data, tmp_path):
    spec = _spec(data, tmp_path / "out", stage="seeds", n_hparams=2)
    first, second = search_plan(spec)
    _fake_finished_run(first.run_dir, [10, 2, 10, 10])
    records.atomic_write_json(second.run_dir.failed, {"error_type": "NonFiniteLossError", "reason": "nan"})
    assert best_draws(spec)[("erm", "custom")][0] == 0
    records.atomic_write_json(first.run_dir.failed, {"error_type": "NonFiniteLossError", "reason": "nan"})
    first.run_dir.final.unlink()
    with pytest.raises(ConfigError, match="every search run of erm on custom failed"):
        best_draws(spec)


# -- launching --------------------------------------------------------------------------------------


def test_local_sweep_reruns_only_what_is_unfinished_and_reports_failures(data, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    args = ["sweep", "--methods", "erm", "--datasets", "custom", "--data-root", str(data), "--out", str(out),
            "--quiet", *TINY]
    assert main([*args, "--seeds", "2"]) == 0
    capsys.readouterr()
    assert main([*args, "--seeds", "2"]) == 0
    assert "nothing to launch" in capsys.readouterr().out
    assert main([*args, "--seeds", "3"]) == 0  # one more seed: only it is trained
    printed = capsys.readouterr()
    assert "2 done" in printed.out and "1 not launched" in printed.out and "[1/1]" in printed.err

    nan_args = ["sweep", "--methods", "erm", "--datasets", "custom", "--data-root", str(data), "--out", str(out),
                "--quiet", "--hparams", "backbone=small-cnn", "pretrained=false", "lr=1e30", "--epochs", "2"]
    assert main(nan_args) == 1
    capsys.readouterr()
    assert main(nan_args) == 0  # failed runs are left alone
    printed = capsys.readouterr().out
    assert "nothing to launch" in printed and "1 failed runs are left alone" in printed
    assert main(["status", str(out)]) == 0
    report = capsys.readouterr().out
    assert "done 3 |" in report and "failed 1" in report and "NonFiniteLossError: loss = nan" in report
    assert main([*nan_args, "--retry-failed", "--dry-run"]) == 0
    assert "would launch 1 runs" in capsys.readouterr().out
    assert main([*nan_args, "--retry-failed"]) == 1
    run = next(out.glob("custom/erm/*/seed0/failed.previous.json"))
    assert (run.parent / "failed.json").exists()
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert sorted(r["counts"]["done"] for r in reports) == [0, 2, 3]  # the seeds-2, seeds-3 and NaN sweeps


def test_a_killed_local_run_resumes_from_its_checkpoint(tmp_path, capsys, one_thread):
    data = write_custom_dataset(tmp_path / "data", n_per_group=40)
    common = ["sweep", "--methods", "erm", "--datasets", "custom", "--data-root", str(data), "--quiet",
              "--hparams", "backbone=small-cnn", "pretrained=false", "batch_size=16", "--epochs", "4"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "bench.cli", *common, "--out", str(killed)],
                               env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(killed.glob("custom/erm/*/seed0/checkpoint.pt")) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    run_dir = RunDir(next(killed.glob("custom/erm/*/seed0")))
    assert not run_dir.is_done(), "the run finished before it could be killed; make it longer"
    assert (run_dir.path / RUNNING).exists()  # left behind by the kill: a stale lock
    assert main(["status", str(killed)]) == 0
    assert "interrupted 1" in capsys.readouterr().out
    assert main([*common, "--out", str(killed)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "clean")]) == 0
    clean = RunDir(next((tmp_path / "clean").glob("custom/erm/*/seed0")))
    assert _learning_curve(run_dir) == _learning_curve(clean)
    assert len(_learning_curve(clean)) == 4


def _learning_curve(run_dir: RunDir) -> list:
    return [(r["stage"], r["epoch"], r["train"], r["eval"]) for r in run_dir.read_metrics()]


def test_local_parallel_launcher_runs_jobs_through_submitit(data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sweep", "--methods", "erm", "--datasets", "custom", "--data-root", str(data), "--out", str(out),
            "--seeds", "2", "--launcher", "local-parallel", "--gpus-per-task", "0", *TINY]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "done 2 |" in printed.out
    runs = sorted(out.glob("custom/erm/*/seed*"))
    assert len(runs) == 2 and all((r / "final.json").exists() for r in runs)
    for run in runs:
        submitted = json.loads((run / SUBMITTED).read_text())
        assert submitted["launcher"] == "local-parallel"
        assert (out / ".submitit" / submitted["sweep_id"] / submitted["job_id"]).is_dir()
        assert not (run / RUNNING).exists()
    assert main(args) == 0
    assert "nothing to launch" in capsys.readouterr().out


def test_status_of_a_sweep_file_plans_it_and_bad_targets_are_user_errors(data, tmp_path, capsys):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"methods: erm\ndatasets: custom\ndata_root: {data}\nout: {tmp_path / 'out'}\nseeds: 2\n"
                          "hparams: [backbone=small-cnn, pretrained=false]\n")
    assert main(["status", str(sweep_file)]) == 0
    printed = capsys.readouterr().out
    assert "2 runs" in printed and "not launched 2" in printed and "(sweep.yaml)" in printed
    assert main(["status", str(tmp_path / "nowhere")]) == 2
    assert "no such results folder or sweep file" in capsys.readouterr().err


def test_status_shows_the_log_of_a_job_slurm_killed_without_a_result(data, tmp_path, monkeypatch):
    spec = _spec(data, tmp_path / "out")
    run = plan(spec)[0]
    logs = tmp_path / "logs"
    (logs / "12_3").mkdir(parents=True)
    (logs / "12_3" / "12_3_0_log.err").write_text("epoch 1\nslurmstepd: error: Detected 1 oom_kill event\n")
    records.atomic_write_json(run.run_dir.path / SUBMITTED, {"launcher": "slurm", "job_id": "12_3",
                                                             "log_folder": str(logs / "%j")})
    monkeypatch.setattr(sweep_state, "slurm_job_states", lambda ids, strict=True: {"12_3": "OUT_OF_MEMORY"})
    report = sweep_report("s", tmp_path / "out", [run], lines=1)
    assert report["counts"][RunState.FAILED] == 1 and report["slurm_jobs"] == {"12": {RunState.FAILED: 1}}
    failure = report["failed"][0]
    assert failure["error"] == "SLURM job 12_3 ended OUT_OF_MEMORY without a result"
    assert failure["log_tail"] == ["slurmstepd: error: Detected 1 oom_kill event"]
    assert "log | slurmstepd: error: Detected 1 oom_kill event" in format_report(report)


def test_deterministic_reaches_every_planned_run_and_leaves_the_sweep_id_alone(data, tmp_path):
    plain, deterministic = _spec(data, tmp_path), _spec(data, tmp_path, deterministic=True)
    assert deterministic.sweep_id == plain.sweep_id
    assert [run.request.deterministic for run in plan(deterministic)] == [True]
    assert [run.request.deterministic for run in plan(plain)] == [False]
    with pytest.raises(ConfigError, match="deterministic: expected true or false"):
        _spec(data, tmp_path, deterministic="yes")


def test_precision_and_compile_reach_every_planned_run_and_the_sweep_id_only_when_set(data, tmp_path):
    plain = _spec(data, tmp_path)
    assert _spec(data, tmp_path, precision="fp32", compile=False).sweep_id == plain.sweep_id
    mixed = _spec(data, tmp_path, precision="bf16", compile=True)
    assert mixed.sweep_id != plain.sweep_id
    (run,) = plan(mixed)
    assert (run.request.precision, run.request.compile) == ("bf16", True)
    assert run.run_dir.path.parent != plan(plain)[0].run_dir.path.parent  # another run identity
    with pytest.raises(ConfigError, match="--precision 'half': choose one of fp32, bf16, fp16"):
        _spec(data, tmp_path, precision="half")
    with pytest.raises(ConfigError, match="compile: expected true or false"):
        _spec(data, tmp_path, compile="yes")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("methods: [erm]\ndatasets: [custom]\nprecision: fp16\ncompile: true\n")
    settings = load_sweep_file(sweep_file)
    assert (settings["precision"], settings["compile"]) == ("fp16", True)
