"""Sweeps on a real single-node SLURM cluster, brought up by scripts/local-slurm.sh for this module.

Where SLURM cannot be set up (not root, no apt-get, the install fails, another SLURM config present)
these tests are skipped with the script's reason; with CI=true they fail instead, because CI must run
them. BENCH_SLURM_TESTS=0 opts out explicitly (also a failure under CI=true).

Every run is tiny (the custom test dataset, a small CNN, 2-4 epochs); jobs run the project's code from
this venv (submitit pickles bench.sweep.jobs.RunJob and starts it with this Python).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import submitit
from helpers import write_custom_dataset

from bench.cli import main
from bench.core.records import RunDir
from bench.run_lock import slurm_job_states
from bench.sweep.state import SUBMITTED
from bench.sweep.status import status_reports

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "local-slurm.sh"
CANNOT_SET_UP = 3  # the script's exit status for "SLURM cannot be set up on this machine"
TINY = ["--methods", "erm", "--datasets", "custom", "--hparams", "backbone=small-cnn", "pretrained=false",
        "batch_size=16", "--launcher", "slurm", "--cpus-per-task", "1"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"CI=true: the SLURM tests must run here, but {reason}")
    pytest.skip(f"no SLURM cluster: {reason}")


@pytest.fixture(scope="module")
def slurm_cluster():
    """Start the local cluster (unless it is already up), stop it afterwards if this fixture started it."""
    if os.environ.get("BENCH_SLURM_TESTS", "").strip() == "0":
        _unavailable("BENCH_SLURM_TESTS=0 turns these tests off")
    already_up = subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode == 0
    started = time.time()
    result = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    output = (result.stdout + result.stderr).strip()
    if result.returncode == CANNOT_SET_UP:
        _unavailable(output.splitlines()[-1] if output else "scripts/local-slurm.sh start could not set it up")
    assert result.returncode == 0, f"scripts/local-slurm.sh start failed:\n{output}"
    print(f"\nSLURM cluster up in {time.time() - started:.1f} s")
    yield
    if not already_up:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=120)


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):
    # The jobs inherit this environment (sbatch --export=ALL): one torch thread per job, as in the other tests.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _wait_until(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; squeue:\n"
                         + subprocess.run(["squeue"], capture_output=True, text=True).stdout)


def _counts(target: Path) -> dict[str, int]:
    total: dict[str, int] = {}
    for report in status_reports(str(target)):
        for state, n in report["counts"].items():
            total[state] = total.get(state, 0) + n
    return total


def _all_job_ids() -> set[str]:
    output = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID", "-S", "2000-01-01"], capture_output=True,
                            text=True, check=True).stdout
    return {line.strip() for line in output.splitlines() if line.strip()}


def test_array_sweep_completes_and_a_rerun_launches_nothing(slurm_env, tmp_path, capsys):
    data = write_custom_dataset(tmp_path / "data", n_per_group=6)
    out = tmp_path / "results"
    args = ["sweep", *TINY, "--data-root", str(data), "--out", str(out), "--seeds", "2", "--n-hparams", "2",
            "--epochs", "2", "--array-parallelism", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "submitted 4 runs as SLURM job array(s)" in printed
    runs = sorted(out.glob("custom/erm/*/seed*"))
    job_ids = sorted(json.loads((run / SUBMITTED).read_text())["job_id"] for run in runs)
    array = job_ids[0].split("_")[0]
    assert job_ids == [f"{array}_{i}" for i in range(4)]  # one array, one run per task

    # while the array is queued or running, a rerun launches nothing
    assert main(args) == 0
    assert "nothing to launch" in capsys.readouterr().out

    _wait_until(lambda: _counts(out).get("done") == 4, 150, "the 4 runs to finish")
    jobs_before = _all_job_ids()
    assert main(args) == 0
    assert "nothing to launch" in capsys.readouterr().out
    assert _all_job_ids() == jobs_before

    reports = status_reports(str(out))
    assert len(reports) == 1 and reports[0]["counts"]["done"] == 4 and reports[0]["slurm_jobs"] == {array: {"done": 4}}
    assert main(["status", str(out)]) == 0
    assert f"SLURM jobs: {array} (4 done)" in capsys.readouterr().out
    states = _wait_until(lambda: (s := slurm_job_states(job_ids)) and set(s.values()) == {"COMPLETED"} and s, 30,
                         "sacct to record the array as COMPLETED")
    assert sorted(states) == job_ids
    for run in runs:  # results read back from the run folders
        final = RunDir(run).read_final()
        assert final["status"] == "done" and final["n_evaluations"] == 2
        assert 0.0 <= final["selection"]["val-worst-group"]["model"]["test"]["worst_group_accuracy"] <= 1.0


def test_failed_runs_show_with_their_error_in_status(slurm_env, tmp_path, capsys):
    data = write_custom_dataset(tmp_path / "data", n_per_group=6)
    out = tmp_path / "results"
    common = ["sweep", *TINY, "--data-root", str(data), "--out", str(out), "--epochs", "2"]
    nan_loss = [*common, "--hparams", "backbone=small-cnn", "pretrained=false", "batch_size=16", "lr=1e30"]
    # A data error met inside the job (a bad --data-option is refused before submitting, exit 2).
    broken = write_custom_dataset(tmp_path / "broken", n_per_group=6)
    (broken / "img" / "train_1_blue_1.png").write_text("not an image, named .png")
    unreadable = ["sweep", *TINY, "--data-root", str(broken), "--out", str(out), "--epochs", "2"]
    assert main([*common, "--data-option", "average=bogus"]) == 2
    assert main(nan_loss) == 0 and main(unreadable) == 0
    capsys.readouterr()
    counts = _wait_until(lambda: (c := _counts(out)) and c["failed"] == 2 and c, 120, "both runs to fail")
    assert counts["done"] == 0 and counts["pending"] == 0

    assert main(["status", str(out)]) == 0
    report = capsys.readouterr().out
    assert "NonFiniteLossError: loss = nan" in report
    flat = " ".join(report.split())  # status wraps its lines
    assert "DataError: " in flat and "train_1_blue_1.png: cannot read image" in flat
    assert report.count("FAILED erm custom") == 2 and "[job " in report
    failed_jobs = [f["job_id"] for r in status_reports(str(out)) for f in r["failed"]]
    _wait_until(lambda: set(slurm_job_states(failed_jobs).values()) == {"FAILED"}, 30, "sacct to show FAILED")

    assert main(nan_loss) == 0  # failed runs are left alone by a rerun...
    printed = capsys.readouterr().out
    assert "nothing to launch" in printed and "failed runs are left alone" in printed
    assert main([*nan_loss, "--retry-failed", "--dry-run"]) == 0  # ...unless asked
    assert "would launch 1 runs" in capsys.readouterr().out


def test_a_preempted_run_resumes_from_its_checkpoint_with_the_same_metrics(slurm_env, tmp_path, capsys):
    data = write_custom_dataset(tmp_path / "data", n_per_group=60)
    common = ["sweep", *TINY, "--data-root", str(data), "--epochs", "4"]
    assert main([*common, "--out", str(tmp_path / "reference")]) == 0
    assert main([*common, "--out", str(tmp_path / "preempted")]) == 0
    capsys.readouterr()
    run = RunDir(next((tmp_path / "preempted").glob("custom/erm/*/seed0")))
    reference = RunDir(next((tmp_path / "reference").glob("custom/erm/*/seed0")))
    _wait_until(run.checkpoint.exists, 120, "the first epoch checkpoint", poll=0.05)
    submitted = json.loads((run.path / SUBMITTED).read_text())
    job_id = submitted["job_id"]
    job = submitit.SlurmJob(folder=submitted["log_folder"], job_id=job_id)
    job._interrupt()  # what SLURM sends on preemption: SIGTERM, then the USR2 submitit checkpoints on
    assert not run.is_done(), "the run finished before it could be preempted; make it longer"

    # submitit requeues the job; SLURM holds a requeued job back for ~121 s, which a test need not wait
    _wait_until(lambda: slurm_job_states([job_id]).get(job_id) == "PENDING", 60, "the requeue")
    assert _counts(tmp_path / "preempted")["pending"] == 1
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, capture_output=True)
    _wait_until(run.is_done, 120, "the requeued run to finish")
    _wait_until(reference.is_done, 120, "the reference run to finish")

    log = Path(submitted["log_folder"].replace("%j", job_id)) / f"{job_id}_0_log.out"
    text = log.read_text()
    assert "preempted or timed out; requeued" in text
    assert "resuming from its checkpoint" in text
    curve = [(r["epoch"], r["train"], r["eval"]) for r in run.read_metrics()]
    assert len(curve) == 4
    assert curve == [(r["epoch"], r["train"], r["eval"]) for r in reference.read_metrics()]
    assert run.read_final()["selection"] == reference.read_final()["selection"]
    assert _counts(tmp_path / "preempted")["done"] == 1
