"""One writer per run, and a resume that never loses or mixes records.

* The run lock (running.json) is taken by ``bench run`` as by sweeps: a second process exits 2 naming
  the holder, or waits with ``--wait``.
* A resume checks what it resumes from: metrics.jsonl must hold every evaluation the checkpoint follows,
  the checkpoint must be one (else a one-line error saying ``--force`` restarts), final.json must be
  readable; a user error met while training marks the run failed.
* Records: no temporary file left after a resumed run, files readable as the umask says, a full disk
  is a one-line error.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import run_seed0, write_custom_dataset

from bench import run_lock, runner, trainer
from bench.cli import main
from bench.core import records
from bench.sweep.state import RunState
from bench.sweep.status import status_reports

BENCH = [sys.executable, "-m", "bench.cli"]
HPARAMS = ["pretrained=false", "batch_size=8", "optimizer=adam"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_custom_dataset(tmp_path_factory.mktemp("integrity"), n_per_group=4)


def _args(data_root: Path, out: Path, epochs: int | None = 2) -> list[str]:
    return ["run", "--method", "erm", "--dataset", "custom", "--data-root", str(data_root), "--backbone", "small-cnn",
            *(["--epochs", str(epochs)] if epochs is not None else []), "--out", str(out), "--quiet",
            "--hparams", *HPARAMS]


def _request(data_root: Path, out: Path, epochs: int = 2) -> runner.RunRequest:
    return runner.RunRequest(method="erm", dataset="custom", data_root=str(data_root), out=str(out), epochs=epochs,
                             backbone="small-cnn", hparam_overrides=list(HPARAMS))


def _one_error_line(capsys) -> str:  # type: ignore[no-untyped-def]
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _interrupted_run(data: Path, out: Path, monkeypatch, epochs: int = 3, after: int = 2) -> Path:  # type: ignore
    run_path, trained = run_seed0(_request(data, out, epochs), monkeypatch, interrupt_after=after)
    assert trained == after and (run_path / "checkpoint.pt").exists() and not (run_path / "final.json").exists()
    monkeypatch.setattr(runner, "train", trainer.train)  # no more interruptions
    return run_path


def _run_state(out: Path) -> RunState:
    (report,) = status_reports(str(out))
    (state,) = [RunState(s) for s, n in report["counts"].items() if n]
    return state


# -- one writer per run -------------------------------------------------------------------------------


def _hold_for(run_dir: Path, process: subprocess.Popen) -> None:
    """Write the run's running.json as a live process on this host holding it would."""
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    records.atomic_write_json(run_dir / run_lock.RUNNING, {
        "host": socket.gethostname(), "pid": process.pid, "pid_start": run_lock.process_start(process.pid),
        "slurm_job_id": None, "started": now, "heartbeat": now, "token": "another process"})


def test_bench_run_of_a_held_run_exits_2_naming_the_holder_or_waits_for_it(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    run_dir = runner.prepare(_request(data, out, epochs=1)).run_dir(0).path
    holder = subprocess.Popen(["sleep", "60"])
    try:
        _hold_for(run_dir, holder)
        assert main(_args(data, out, epochs=1)) == 2
        err = _one_error_line(capsys)
        assert f"pid {holder.pid}" in err and "already being trained" in err and "--wait" in err
        assert not (run_dir / "config.json").exists() and not (run_dir / "metrics.jsonl").exists()

        monkeypatch.setattr(run_lock, "WAIT_POLL_SECONDS", 0.05)
        threading.Timer(1.0, holder.kill).start()  # the holder ends while the second process waits
        assert main(_args(data, out, epochs=1) + ["--wait"]) == 0
        assert f"waiting for host {socket.gethostname()} pid {holder.pid}" in capsys.readouterr().err
        assert json.loads((run_dir / "final.json").read_text())["n_evaluations"] == 1
        assert not (run_dir / run_lock.RUNNING).exists()  # released
    finally:
        holder.kill()
        holder.wait()


def test_two_bench_runs_of_one_run_at_once_train_it_once(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    command = BENCH + _args(data, out, epochs=500)
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(out.glob("custom/erm/*/seed0/metrics.jsonl")) and time.time() < deadline:
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.05)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second started; make it longer"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"pid {first.pid}" in lines[0]
    (metrics,) = out.glob("custom/erm/*/seed0/metrics.jsonl")
    epochs = [r["epoch"] for r in records.read_jsonl(metrics)]
    assert epochs == list(range(1, len(epochs) + 1))  # one writer: no epoch twice


# -- what a resume checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "truncated", "edited"])
def test_a_damaged_metrics_file_stops_the_resume_instead_of_losing_epochs(data, tmp_path, monkeypatch, capsys,
                                                                         damage):
    out = tmp_path / "out"
    run_path = _interrupted_run(data, out, monkeypatch)
    metrics = run_path / "metrics.jsonl"
    if damage == "deleted":
        metrics.unlink()
    elif damage == "truncated":
        metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    else:  # the same number of lines, one of them altered
        first, second = records.read_jsonl(metrics)
        first["eval"]["model"]["test"]["correct"][0] += 1
        metrics.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in (first, second)))
    assert main(_args(data, out, epochs=3)) == 2
    err = _one_error_line(capsys)
    assert "metrics.jsonl" in err and "--force" in err
    assert not (run_path / "final.json").exists()
    assert _run_state(out) == RunState.FAILED
    assert main(_args(data, out, epochs=3) + ["--force"]) == 0
    assert json.loads((run_path / "final.json").read_text())["n_evaluations"] == 3


def _checkpoint_with_wrong_fields(path: Path) -> None:
    torch.save({"stage_index": "0", "epochs_done": 1}, path)


# Empty, text and foreign checkpoints are in test_bad_input.py too (the one-line error only).
@pytest.mark.parametrize("write", [lambda p: p.write_bytes(b""), lambda p: p.write_bytes(p.read_bytes()[:200]),
                                   _checkpoint_with_wrong_fields], ids=["empty", "truncated", "wrong-fields"])
def test_an_unreadable_checkpoint_is_a_one_line_error_that_names_force(data, tmp_path, monkeypatch, capsys, write):
    out = tmp_path / "out"
    run_path = _interrupted_run(data, out, monkeypatch, epochs=2, after=1)
    write(run_path / "checkpoint.pt")
    assert main(_args(data, out, epochs=2)) == 2
    err = _one_error_line(capsys)
    assert "checkpoint.pt: unreadable checkpoint" in err and "--force" in err
    failure = json.loads((run_path / "failed.json").read_text())
    assert "unreadable checkpoint" in failure["reason"] and "--force" in failure["reason"]
    assert not (run_path / "final.json").exists()
    assert main(_args(data, out, epochs=2) + ["--force"]) == 0
    assert json.loads((run_path / "final.json").read_text())["n_evaluations"] == 2


def test_a_garbage_final_json_is_neither_done_nor_a_traceback(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(data, out, epochs=1)) == 0
    (final,) = out.glob("custom/erm/*/seed0/final.json")
    final.write_text('{"status": "do')
    capsys.readouterr()
    assert _run_state(out) == RunState.FAILED
    assert main(_args(data, out, epochs=1)) == 2
    err = _one_error_line(capsys)
    assert "final.json: unreadable" in err and "--force" in err
    assert final.read_text() == '{"status": "do'  # left for the user to look at
    assert main(_args(data, out, epochs=1) + ["--force"]) == 0
    assert _run_state(out) == RunState.DONE


def test_zero_epochs_are_refused_before_anything_is_written(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(data, out, epochs=0)) == 2
    assert "--epochs 0" in _one_error_line(capsys)
    assert main(_args(data, out, epochs=None) + ["epochs=0"]) == 2
    assert "epochs=0" in _one_error_line(capsys)
    assert not out.exists()


def test_an_unreadable_image_met_in_training_marks_the_run_failed(data, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data, root)
    (root / "img" / "train_1_red_2.png").write_bytes(b"")
    out = tmp_path / "out"
    assert main(_args(root, out, epochs=1)) == 2
    err = _one_error_line(capsys)
    assert "train_1_red_2.png: cannot read image" in err
    (run_path,) = out.glob("custom/erm/*/seed0")
    assert json.loads((run_path / "failed.json").read_text())["error_type"] == "DataError"
    assert not (run_path / "final.json").exists()
    assert _run_state(out) == RunState.FAILED  # not "interrupted: a rerun resumes it"


# -- the record files ---------------------------------------------------------------------------------


def test_a_resumed_run_leaves_no_temporary_file(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_path = _interrupted_run(data, out, monkeypatch, epochs=2, after=1)
    (run_path / ".checkpoint.pt.0123456789ab.tmp").write_bytes(b"a kill in the middle of a checkpoint save")
    assert main(_args(data, out, epochs=2)) == 0
    assert (run_path / "final.json").exists()
    assert sorted(p.name for p in run_path.glob(".*.tmp")) == []


def test_record_files_are_created_as_the_umask_says(data, tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(_args(data, tmp_path / "out", epochs=1)) == 0
    finally:
        os.umask(previous)
    (run_path,) = (tmp_path / "out").glob("custom/erm/*/seed0")
    modes = {name: (run_path / name).stat().st_mode & 0o777
             for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "final.json")}
    assert modes == dict.fromkeys(modes, 0o644)


def test_a_full_disk_is_a_one_line_error_and_a_failed_run(data, tmp_path):
    def limit_file_size() -> None:  # files may not grow past 40 kB: the checkpoint cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    out = tmp_path / "out"
    result = subprocess.run(BENCH + _args(data, out, epochs=1), preexec_fn=limit_file_size, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot write ") and "checkpoint.pt" in lines[0] and "full disk" in lines[0]
    (run_path,) = out.glob("custom/erm/*/seed0")
    assert not (run_path / "final.json").exists() and (run_path / "failed.json").exists()
    assert not list(run_path.glob(".*.tmp"))
