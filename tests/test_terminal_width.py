"""Every table `bench` prints fits a 100-column terminal: bench list (short, --long), bench data info,
bench status and bench report's markdown with many datasets. (bench run's table: tests/test_cli.py;
bench data check: tests/test_real_datasets.py; bench sweep --dry-run: tests/test_sweep.py; bench list
--presets: tests/test_presets.py; bench report --published: tests/test_published.py.)"""

from __future__ import annotations

import copy
import json

import pytest
from test_report import BIRDS_INFO, evaluation, model, write_run

from bench.cli import main
from bench.core.records import FAILED_FILE
from bench.report.aggregate import aggregate
from bench.report.load import load_results
from bench.report.render import to_markdown
from datasets import dataset_names, get_dataset

WIDTH = 100


def _widest(text: str) -> str:
    return max(text.splitlines(), key=len)


@pytest.mark.parametrize("flags", [[], ["--long"]])
def test_bench_list_fits(flags, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert main(["list", "--data-root", str(tmp_path), *flags]) == 0
    printed = capsys.readouterr().out
    assert len(_widest(printed)) <= WIDTH, _widest(printed)
    for name in dataset_names():
        assert (f"| {name} " if not flags else f"dataset {name}\n") in printed
    if flags:  # the long form holds what the short one shortens
        for name in dataset_names():
            assert " ".join(get_dataset(name).description.split()) in " ".join(printed.split())


def test_bench_list_shows_a_found_dataset_relative(capsys, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from test_real_datasets import write_waterbirds

    write_waterbirds(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert main(["list", "--long", "--data-root", "data"]) == 0
    printed = capsys.readouterr().out
    assert "files: found: data/waterbird_complete95_forest2water2" in printed and str(tmp_path) not in printed


@pytest.mark.parametrize("name", ["waterbirds", "celeba", "spawrious-o2o-medium", "urbancars", "custom",
                                  "waterbirds-synth"])
def test_bench_data_info_fits_and_describes(name, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert main(["data", "info", name, "--data-root", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert len(_widest(printed)) <= WIDTH, _widest(printed)
    source = get_dataset(name)
    assert " ".join(source.description.split()) in " ".join(printed.split())  # the long description, in full
    if source.needs_data_root and name != "custom":
        assert "Published group counts" in printed  # without the files: the published counts


def test_bench_status_fits(tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "results" / "waterbirds-synth" / "ule" / "abcdef1234" / "seed0"
    run.mkdir(parents=True)
    long_reason = "the loss became NaN at epoch 3 " * 8
    (run / FAILED_FILE).write_text(json.dumps({
        "status": "failed", "error_type": "NonFiniteLossError", "reason": long_reason,
        "traceback": "Traceback (most recent call last):\n" + "  File x, in y: " + "z " * 80 + "\nError: " + "w " * 70,
    }))
    monkeypatch.chdir(tmp_path)
    assert main(["status", "results", "--lines", "3"]) == 0
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "NonFiniteLossError" in printed
    assert len(_widest(printed)) <= WIDTH, _widest(printed)


def test_report_splits_a_table_wider_than_a_terminal(tmp_path) -> None:
    root = tmp_path / "results"
    names = [f"spawrious-o2o-medium-{k}" for k in range(6)]  # long names, many columns
    for name in names:
        info = copy.deepcopy(BIRDS_INFO)
        info["name"] = name
        for method in ("erm", "groupdro"):
            for seed in range(2):
                write_run(root, info, method, f"{method[0]}000000000", seed,
                          [evaluation("train", 1, model([9, 6, 7, 9], [9, 6, 7, 9]))])
    markdown = to_markdown(aggregate(load_results(root)))
    assert len(_widest(markdown)) <= WIDTH, _widest(markdown)
    worst = markdown.split("## Worst-group accuracy (test, %)")[1].split("\n## ")[0]
    headers = [line for line in worst.splitlines() if line.startswith("| method ")]
    assert len(headers) > 1  # split into several tables, each with the method column
    assert all(any(name in header for header in headers) for name in names)
    assert all(any(line.startswith(f"| {m} ") for line in worst.splitlines()) for m in ("erm", "groupdro"))


def test_a_split_table_fits_when_its_headers_are_wider_than_its_cells() -> None:
    from bench.report.render import markdown_tables
    from bench.report.tables import Cell, Table

    headers = [f"a-long-dataset-name-{k} (train-weighted)" for k in range(5)]
    table = Table("k", "t", ["method", *headers], [[Cell("erm"), *(Cell("1.0") for _ in headers)]])
    parts = markdown_tables(table)
    assert len(parts) > 1 and all(len(line) <= WIDTH for part in parts for line in part.splitlines())
    assert all(part.startswith("| method ") for part in parts)
