"""The CLI end to end: user errors (one line, exit 2, nothing written), listing, hparam resolution."""

import json
import os
import re

import pytest
import torch
from helpers import write_custom_dataset

from bench.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_custom_dataset(tmp_path_factory.mktemp("cli"), n_per_group=4)


def _user_error(capsys, args, tmp_path, expected):
    out = tmp_path / "results"
    status = main(args + ["--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert expected in err
    assert not out.exists()


def test_unknown_method(capsys, tmp_path):
    _user_error(capsys, ["run", "--method", "nope", "--dataset", "custom"], tmp_path, "unknown method 'nope'")


def test_unknown_dataset(capsys, tmp_path):
    _user_error(capsys, ["run", "--method", "erm", "--dataset", "nope"], tmp_path, "unknown dataset 'nope'")


def test_unknown_hparam(capsys, tmp_path, data):
    _user_error(capsys, ["run", "--method", "erm", "--dataset", "custom", "--data-root", str(data),
                         "--hparams", "learning_rate=0.1"], tmp_path, "unknown hparam 'learning_rate'")


@pytest.mark.parametrize("value,expected", [("lr=abc", "expected float"), ("batch_size=0", "must be >= 1"),
                                            ("optimizer=rmsprop", "choose one of"), ("epochs=2.5", "expected int"),
                                            ("lr", "expected key=value")])
def test_bad_hparam_values(capsys, tmp_path, data, value, expected):
    _user_error(capsys, ["run", "--method", "erm", "--dataset", "custom", "--data-root", str(data),
                         "--hparams", value], tmp_path, expected)


def test_missing_data_root(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_DATA_ROOT", raising=False)
    _user_error(capsys, ["run", "--method", "erm", "--dataset", "custom"], tmp_path, "--data-root")


def test_data_root_from_environment(capsys, tmp_path, monkeypatch, data):
    monkeypatch.setenv("BENCH_DATA_ROOT", str(data))
    assert main(["data", "info", "custom"]) == 0
    assert "1/red" in capsys.readouterr().out


def test_offline_pretrained_weights_give_a_clear_error(capsys, tmp_path, data, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache
    for proxy in ("https_proxy", "HTTPS_PROXY"):  # and no network: https through a closed local port
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    _user_error(capsys, ["run", "--method", "erm", "--dataset", "custom", "--data-root", str(data),
                         "--backbone", "resnet18", "--hparams", "pretrained=true"], tmp_path, "--weights PATH")


def test_missing_weights_file(capsys, tmp_path, data):
    _user_error(capsys, ["run", "--method", "erm", "--dataset", "custom", "--data-root", str(data),
                         "--backbone", "resnet18", "--weights", str(tmp_path / "absent.pt")], tmp_path, "no such file")


def test_list_shows_methods_datasets_backbones(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("erm", "custom", "small-cnn", "resnet50", "efficientnet-lite0", "--backbone timm/<model>"):
        assert name in out
    assert max(len(line) for line in out.splitlines()) <= 100


def test_run_prints_table_with_named_average_and_records(capsys, tmp_path, data):
    out = tmp_path / "results"
    status = main(["run", "--method", "erm", "--dataset", "custom", "--data-root", str(data), "--backbone",
                   "small-cnn", "--epochs", "2", "--seeds", "2", "--seed-offset", "3", "--out", str(out),
                   "--quiet", "--hparams", "pretrained=false", "batch_size=4"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "mean ± std (n=2)" in printed and "avg (plain)" in printed and "val-worst-group" in printed
    runs = sorted(out.glob("custom/erm/*/seed*"))
    assert [r.name for r in runs] == ["seed3", "seed4"]
    config = json.loads((runs[0] / "config.json").read_text())
    assert config["hparams"]["epochs"] == 2 and config["hparams"]["batch_size"] == 4
    assert config["dataset_info"]["group_counts"]["train"] == [4, 4, 4, 4]
    assert "torch" in config["versions"] and config["torch_threads"] == torch.get_num_threads()
    lines = (runs[0] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert set(first["eval"]["model"]) == {"val", "test"}
    assert first["eval"]["model"]["val"]["total"] == [4, 4, 4, 4]


def test_same_seed_gives_same_metrics_on_cpu(tmp_path, data):
    args = ["run", "--method", "erm", "--dataset", "custom", "--data-root", str(data), "--backbone", "small-cnn",
            "--epochs", "2", "--quiet", "--hparams", "pretrained=false", "batch_size=4"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    (a,) = (tmp_path / "a").glob("custom/erm/*/seed0/metrics.jsonl")
    (b,) = (tmp_path / "b").glob("custom/erm/*/seed0/metrics.jsonl")
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if "seconds" not in k}  # noqa: E731
                          for line in path.read_text().splitlines()]
    assert strip(a) == strip(b)


def test_deterministic_flag_is_recorded_and_changes_nothing_on_cpu(tmp_path, data, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    args = ["run", "--method", "ule", "--dataset", "custom", "--data-root", str(data), "--backbone", "small-cnn",
            "--epochs", "1", "--quiet", "--hparams", "pretrained=false", "batch_size=4"]
    assert main(args + ["--out", str(tmp_path / "plain")]) == 0
    try:
        assert main(args + ["--out", str(tmp_path / "det"), "--deterministic"]) == 0
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:  # process-wide switches: leave them as the other tests expect
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    (plain,) = (tmp_path / "plain").glob("custom/ule/*/seed0")
    (det,) = (tmp_path / "det").glob("custom/ule/*/seed0")
    assert plain.parent.name == det.parent.name  # the same run identity
    assert json.loads((det / "config.json").read_text())["deterministic"] is True
    assert json.loads((plain / "config.json").read_text())["deterministic"] is False
    # ULE's double backward has deterministic CPU kernels: the same numbers as without the flag.
    selection = lambda run: json.loads((run / "final.json").read_text())["selection"]  # noqa: E731
    assert selection(det) == selection(plain)


def _mean_std_cells(text: str) -> list[str]:
    return re.findall(r"-?\d+\.\d ± \d+\.\d", text)


def test_run_and_report_print_identical_numbers(capsys, tmp_path, data):
    # One aggregator: `bench run`'s table is the report's aggregation of the seeds it just trained.
    out = tmp_path / "results"
    status = main(["run", "--method", "ule", "--dataset", "custom", "--data-root", str(data), "--backbone",
                   "small-cnn", "--epochs", "2", "--seeds", "3", "--out", str(out), "--quiet", "--hparams",
                   "pretrained=false", "batch_size=8"])
    run_printed = capsys.readouterr().out
    assert status == 0
    rows = {line.split("|")[2].strip(): _mean_std_cells(line) for line in run_printed.splitlines()
            if line.startswith("| mean ± std (n=3)")}
    assert set(rows) == {"teacher", "student"} and all(len(cells) == 2 for cells in rows.values())
    assert main(["report", str(out), "--no-files"]) == 0
    report = capsys.readouterr().out
    worst, average = report.split("## Average accuracy")[0], report.split("## Average accuracy")[1]
    for row, (worst_cell, average_cell) in (("ule", rows["teacher"]), ("ule (student)", rows["student"])):
        line = next(line for line in worst.splitlines() if line.startswith(f"| {row} "))
        assert _mean_std_cells(line) == [worst_cell]
        line = next(line for line in average.splitlines() if line.startswith(f"| {row} "))
        assert _mean_std_cells(line) == [average_cell]


def test_run_table_fits_a_terminal(capsys, tmp_path, data):
    out = tmp_path / "results"
    assert main(["run", "--method", "lff", "--dataset", "custom", "--data-root", str(data), "--backbone",
                 "small-cnn", "--epochs", "1", "--seeds", "2", "--out", str(out), "--quiet", "--hparams",
                 "pretrained=false", "batch_size=8"]) == 0
    printed = capsys.readouterr().out
    # Every line but the one naming the results folder (a path is as long as it is).
    lines = [line for line in printed.splitlines() if "results in" not in line]
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    models = [line.split("|")[2].strip() for line in lines if line.startswith("| 0 ")]
    assert models == ["debiased", "biased"]  # the second model is a second row, not more columns


# ------------------------------------------------------------------------------------------------
# --precision and --compile


def test_precision_and_compile_enter_the_identity_only_when_not_the_default(data):
    from bench.core.records import config_hash
    from bench.runner import RunRequest, run_identity

    def identity(method="erm", **flags):
        return run_identity(RunRequest(method=method, dataset="custom", data_root=str(data), **flags))

    plain = identity()
    assert "precision" not in plain and "compile" not in plain
    assert config_hash(identity(precision="fp32", compile=False)) == config_hash(plain)
    assert identity(precision="bf16")["precision"] == "bf16"
    assert len({config_hash(identity(precision=p)) for p in ("fp32", "bf16", "fp16")}) == 3
    assert identity(compile=True)["compile"] is True
    assert identity("ule", compile=True, hparam_overrides=["reading=finite_step"])["compile"] is True


@pytest.mark.parametrize("method,expected", [
    ("ule", "--compile: ULE's saliency reading trains the teacher on a penalty of its input gradient, a double "
            "backward (--hparams reading=finite_step has none), which torch.compile cannot compile"),
    ("rrr", "--compile: rrr trains on a penalty of the model's input gradient, a double backward, which "
            "torch.compile cannot compile; run without --compile"),
])
def test_compile_is_refused_for_a_double_backward(capsys, tmp_path, data, method, expected):
    _user_error(capsys, ["run", "--method", method, "--dataset", "custom", "--data-root", str(data), "--compile"],
                tmp_path, expected)


def test_a_bf16_run_records_its_precision_in_another_folder(tmp_path, data):
    args = ["run", "--method", "erm", "--dataset", "custom", "--data-root", str(data), "--backbone", "small-cnn",
            "--epochs", "1", "--quiet", "--hparams", "pretrained=false", "batch_size=4", "--out", str(tmp_path)]
    assert main(args) == 0
    assert main(args + ["--precision", "bf16"]) == 0
    configs = {run.parent.name: json.loads((run / "config.json").read_text())
               for run in tmp_path.glob("custom/erm/*/seed0")}
    assert sorted(c["precision"] for c in configs.values()) == ["bf16", "fp32"]
    assert all(c["compile"] is False for c in configs.values())


def test_a_compiled_run_trains_and_keeps_plain_checkpoint_keys(tmp_path, data, monkeypatch):
    from bench.core import backbones

    monkeypatch.setattr(backbones, "COMPILE_BACKEND", "aot_eager")
    args = ["run", "--method", "erm", "--dataset", "custom", "--data-root", str(data), "--backbone", "small-cnn",
            "--epochs", "1", "--quiet", "--hparams", "pretrained=false", "batch_size=4", "--compile",
            "--out", str(tmp_path)]
    try:
        assert main(args) == 0
    finally:
        torch._dynamo.reset()
    (run,) = tmp_path.glob("custom/erm/*/seed0")
    assert json.loads((run / "config.json").read_text())["compile"] is True
    state = torch.load(run / "checkpoint.pt", weights_only=False)["method"]["model"]
    plain = backbones.build_backbone("small-cnn", 2)
    assert list(state) == list(plain.state_dict())  # no "_orig_mod." prefix
    plain.load_state_dict(state)
