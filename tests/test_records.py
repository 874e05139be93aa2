"""Records: atomic writes, torn lines, skip-done, failure records, resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_custom_dataset

from bench.core import records
from bench.core.records import RunDir

BENCH = [sys.executable, "-m", "bench.cli"]


def test_atomic_write_json_replaces_whole_file(tmp_path):
    path = tmp_path / "final.json"
    records.atomic_write_json(path, {"a": 1})
    records.atomic_write_json(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["final.json"]  # no temp file left behind


def test_atomic_write_leaves_old_content_when_serialisation_fails(tmp_path):
    path = tmp_path / "final.json"
    records.atomic_write_json(path, {"a": 1})

    class Unserialisable:
        def __repr__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        records.atomic_write_json(path, {"bad": Unserialisable()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["final.json"]


def test_torn_last_jsonl_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records.append_jsonl(path, {"epoch": 1})
    records.append_jsonl(path, {"epoch": 2})
    with open(path, "a") as handle:
        handle.write('{"epoch": 3, "ev')  # a kill in the middle of a write
    assert [r["epoch"] for r in records.read_jsonl(path)] == [1, 2]
    records.truncate_jsonl(path, 1)
    assert [r["epoch"] for r in records.read_jsonl(path)] == [1]


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        records.read_jsonl(path)


def test_config_hash_is_stable_and_order_independent():
    a = records.config_hash({"method": "erm", "hparams": {"lr": 0.1, "epochs": 2}})
    b = records.config_hash({"hparams": {"epochs": 2, "lr": 0.1}, "method": "erm"})
    assert a == b and len(a) == 10
    assert a != records.config_hash({"method": "erm", "hparams": {"lr": 0.2, "epochs": 2}})


def test_run_dir_states(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.state() == "new"
    records.atomic_write_json(run.config, {})
    assert run.state() == "incomplete"
    records.atomic_write_json(run.failed, {"reason": "x"})
    assert run.state() == "failed" and not run.is_done()
    records.atomic_write_json(run.final, {"status": "done"})
    assert run.state() == "done"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_custom_dataset(tmp_path_factory.mktemp("tiny"), n_per_group=24)


def _run_args(data_root: Path, out: Path, epochs: int = 6) -> list[str]:
    return ["run", "--method", "erm", "--dataset", "custom", "--data-root", str(data_root), "--backbone",
            "small-cnn", "--epochs", str(epochs), "--out", str(out), "--quiet", "--json",
            "--hparams", "pretrained=false", "batch_size=8", "optimizer=adam"]


def _final_metrics(out: Path) -> tuple[dict, list]:
    (final_path,) = out.glob("custom/erm/*/seed0/final.json")
    final = json.loads(final_path.read_text())
    metric_lines = records.read_jsonl(final_path.parent / "metrics.jsonl")
    return final["selection"], [(r["epoch"], r["eval"], r["train"]) for r in metric_lines]


def test_sigkill_then_rerun_resumes_and_matches_uninterrupted_run(tiny_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(BENCH + _run_args(tiny_data, reference), check=True, env=env, capture_output=True)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(BENCH + _run_args(tiny_data, interrupted), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed_after = None
    while time.time() < deadline and process.poll() is None:
        lines = list(interrupted.glob("custom/erm/*/seed0/metrics.jsonl"))
        if lines and len(records.read_jsonl(lines[0])) >= 2:
            process.send_signal(signal.SIGKILL)
            killed_after = len(records.read_jsonl(lines[0]))
            break
        time.sleep(0.02)
    process.wait()
    assert killed_after is not None, "the run finished before it could be killed; make it longer"
    (run_path,) = interrupted.glob("custom/erm/*/seed0")
    assert not (run_path / "final.json").exists()
    assert (run_path / "checkpoint.pt").exists()

    # The same command again: it resumes from the checkpoint.
    result = subprocess.run(BENCH + _run_args(tiny_data, interrupted), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert _final_metrics(interrupted) == _final_metrics(reference)


def test_done_run_is_skipped_and_force_reruns(tiny_data, tmp_path):
    from bench.cli import main

    args = _run_args(tiny_data, tmp_path, epochs=1)
    assert main(args) == 0
    (final_path,) = tmp_path.glob("custom/erm/*/seed0/final.json")
    first_mtime = final_path.stat().st_mtime_ns
    assert main(args) == 0
    assert final_path.stat().st_mtime_ns == first_mtime  # skipped
    assert main(args + ["--force"]) == 0
    assert final_path.stat().st_mtime_ns != first_mtime


def test_non_finite_loss_writes_failed_json_and_never_looks_done(tiny_data, tmp_path, capsys):
    from bench.cli import main

    args = _run_args(tiny_data, tmp_path, epochs=2)
    args[args.index("optimizer=adam")] = "optimizer=sgd"
    status = main(args + ["lr=1e30"])
    assert status == 1
    (run_path,) = tmp_path.glob("custom/erm/*/seed0")
    failure = json.loads((run_path / "failed.json").read_text())
    assert failure["error_type"] == "NonFiniteLossError"
    assert not (run_path / "final.json").exists()
    assert RunDir(run_path).state() == "failed"
    assert "failed" in capsys.readouterr().err


def test_checkpoint_holds_everything_to_resume(tiny_data, tmp_path):
    from bench.cli import main

    assert main(_run_args(tiny_data, tmp_path, epochs=1)) == 0
    (checkpoint_path,) = tmp_path.glob("custom/erm/*/seed0/checkpoint.pt")
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert {"stage_index", "epochs_done", "n_records", "method", "rng"} <= set(checkpoint)
    assert {"model", "optimizer", "extra"} <= set(checkpoint["method"])
    assert {"python", "numpy", "torch"} <= set(checkpoint["rng"])


def test_twin_run_identity_follows_the_generated_data(monkeypatch, tiny_data):
    """A finished run on a twin must not be reused once the twin's data changed, and must stay valid when
    an edit of the twin's code changed nothing of the data."""
    from bench import runner
    from datasets import _synth

    request = runner.RunRequest(method="erm", dataset="waterbirds-synth")
    before = runner.run_identity(request)
    assert before["data_version"].startswith(f"v{_synth.GENERATOR_VERSION}-")
    # Another code fingerprint (an edit of a comment): the data is regenerated, the same, the same identity.
    monkeypatch.setattr(_synth, "generator_fingerprint", lambda twin_name: "0123456789")
    _synth.content_digest.cache_clear()
    assert runner.run_identity(runner.RunRequest(method="erm", dataset="waterbirds-synth")) == before
    # Other data: another identity.
    module = __import__("datasets.waterbirds_synth", fromlist=["generate_split"])
    original = module.generate_split

    def brighter(split: str, seed: int):  # type: ignore[no-untyped-def]
        arrays = original(split, seed)
        arrays["pixels"] = arrays["pixels"] // 2
        return arrays

    monkeypatch.setattr(_synth, "generator_fingerprint", lambda twin_name: "9876543210")
    monkeypatch.setattr(module.WaterbirdsSynth, "generate_split", staticmethod(brighter))
    _synth.content_digest.cache_clear()
    after = runner.run_identity(runner.RunRequest(method="erm", dataset="waterbirds-synth"))
    _synth.content_digest.cache_clear()
    assert after["data_version"] != before["data_version"]
    assert records.config_hash(after) != records.config_hash(before)
    # Datasets read from files carry no data version but a fingerprint of their files (test_data_identity.py).
    identity = runner.run_identity(runner.RunRequest(method="erm", dataset="custom", data_root=str(tiny_data)))
    assert "data_version" not in identity and len(identity["data_fingerprint"]) == 16
