"""Published numbers (bench/report/published.csv) and ``bench report --published``.

The data file is checked row by row against the registries; the report is checked on hand-made
records (tests/test_report.py's helpers): a real dataset is compared with its published number,
a synthetic twin never is (whether its records say so or only its name does), and a protocol
difference is named instead of a difference being computed.
"""

from __future__ import annotations

import copy
import fnmatch
from pathlib import Path

import pytest
from test_report import BIRDS_INFO, evaluation, model, write_run

from bench.cli import main
from bench.core.backbones import BUILT_IN
from bench.core.errors import ConfigError
from bench.core.selection import RULES
from bench.display import TERMINAL_WIDTH
from bench.report.aggregate import aggregate
from bench.report.compare import compare
from bench.report.load import load_results
from bench.report.published import (
    NUMBER_COLUMNS,
    SOURCE_COLUMNS,
    load_published,
    parse_published,
)
from bench.report.render import to_csv, to_html, to_latex, to_markdown
from datasets import dataset_names, get_dataset
from methods import method_names

PUBLISHED = load_published()


def _real_datasets() -> list[str]:
    return [name for name in dataset_names() if get_dataset(name).needs_data_root and name != "custom"]


@pytest.mark.parametrize("number", PUBLISHED.numbers, ids=lambda n: f"{n.method}-{n.dataset}-{n.metric}")
def test_every_published_number_names_real_things_and_a_source(number) -> None:  # type: ignore[no-untyped-def]
    assert number.method in method_names()
    matched = fnmatch.filter(_real_datasets(), number.dataset)
    assert matched, f"{number.dataset} names no real dataset"
    assert number.backbone in ("", *BUILT_IN)
    assert number.selection in ("", *RULES)
    low = 0.0 if number.metric.endswith("accuracy") or number.metric == "id_acc" else -100.0
    assert low <= number.value <= 100.0 and (number.std is None or 0.0 <= number.std <= 100.0)
    source = PUBLISHED.sources[number.source]  # every key resolves to a reference line
    assert source.reference and source.location


def test_the_sources_carry_no_machine_path() -> None:
    for source in PUBLISHED.sources.values():
        assert "/work/" not in source.location and not source.location.startswith("/")


def _write(folder: Path, numbers: list[str], sources: list[str] | None = None) -> tuple[Path, Path]:
    numbers_file, sources_file = folder / "published.csv", folder / "published_sources.csv"
    numbers_file.write_text(",".join(NUMBER_COLUMNS) + "\n" + "".join(line + "\n" for line in numbers))
    sources_file.write_text(",".join(SOURCE_COLUMNS) + "\n" + "".join(
        line + "\n" for line in (sources if sources is not None else ['paper-a,"A. Author: a paper, Table 2",here'])))
    return numbers_file, sources_file


@pytest.mark.parametrize("row,message", [
    ("dfr,waterbirds,worst_group_accuracy,120,,,,,,,paper-a,", "value 120.0 is outside"),
    ("dfr,waterbirds,worst_group_accuracy,x,,,,,,,paper-a,", "value 'x' is not a number"),
    ("dfr,waterbirds,accuracy,90,,,,,,,paper-a,", "metric 'accuracy'"),
    ("dfr,waterbirds,average_accuracy,90,,,,,,,paper-a,", "needs its average_kind"),
    ("dfr,waterbirds,worst_group_accuracy,90,,,,,val-best,,paper-a,", "selection 'val-best'"),
    ("dfr,waterbirds,worst_group_accuracy,90,,,,,,,paper-b,", "source 'paper-b' has no line"),
    ("dfr,waterbirds-synth,worst_group_accuracy,90,,,,,,,paper-a,", "synthetic twin"),
    ("dfr,waterbirds,worst_group_accuracy,90,,maybe,,,,,paper-a,", "bound 'maybe'"),
])
def test_a_bad_row_is_a_one_line_error_naming_its_line(tmp_path: Path, row: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        parse_published(*_write(tmp_path, [row]))
    assert "published.csv line 2" in str(error.value) and "\n" not in str(error.value)


def test_a_source_without_a_number_or_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="back no number"):
        parse_published(*_write(tmp_path, [], ['paper-a,"A paper",here']))
    with pytest.raises(ConfigError, match="listed twice"):
        parse_published(*_write(tmp_path, [], ['paper-a,"A paper",here', 'paper-a,"Again",there']))


# --------------------------------------------------------------------------------------------
# The report beside the published numbers


def _info(name: str, synthetic: object = "absent") -> dict:
    info = copy.deepcopy(BIRDS_INFO)
    info["name"] = name
    if synthetic != "absent":
        info["synthetic"] = synthetic  # the field bench data export writes; older records lack it
    return info


def _runs(root: Path, info: dict, method: str, tests: list[list[int]], hparams: dict | None = None) -> None:
    """One run per seed; val = test, so every rule picks the only evaluation."""
    for seed, test in enumerate(tests):
        write_run(root, info, method, f"{method[0]}000000000", seed, [evaluation("train", 1, model(test, test))],
                  hparams=hparams or {"lr": 0.001, "backbone": "resnet50"})


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    # DFR on the real waterbirds: worst-group 0.9 and 0.8 -> 85.0; published (dfr-readme) 92.0 -> -7.0.
    _runs(root, _info("waterbirds", synthetic=None), "dfr", [[10, 9, 9, 10], [10, 8, 9, 10]])
    _runs(root, _info("waterbirds", synthetic=None), "erm", [[10, 5, 6, 10], [10, 6, 5, 10]])
    _runs(root, _info("waterbirds", synthetic=None), "ule", [[10, 7, 7, 10], [10, 7, 8, 10]])
    # A twin exported in waterbirds' layout, recorded under a real dataset's name (the export's marker).
    exported = _info("celeba", synthetic="celeba-synth")
    _runs(root, exported, "dfr", [[10, 9, 9, 10]])
    # A twin in records written before the field existed: only its name says so.
    _runs(root, _info("waterbirds-synth"), "dfr", [[10, 9, 9, 10]])
    return root


def _by(comparisons, dataset: str, row: str, metric: str = "worst_group_accuracy"):  # type: ignore[no-untyped-def]
    found = [c for c in comparisons if (c.dataset, c.row, c.metric) == (dataset, row, metric)]
    assert len(found) == 1, found
    return found[0]


def test_real_data_is_compared_and_twins_never_are(results: Path) -> None:
    board = aggregate(load_results(results), "val-worst-group")
    comparisons = compare(board, PUBLISHED)
    dfr = _by(comparisons, "waterbirds", "dfr")
    assert dfr.published is not None and dfr.published.source == "dfr-readme"
    assert dfr.ours_mean == pytest.approx(85.0) and dfr.diff == pytest.approx(85.0 - 92.0)
    assert dfr.status == "" and dfr.caveats == ("the source does not state its backbone",)
    assert _by(comparisons, "waterbirds", "erm").status == "none"  # nothing published recorded for ERM
    # Twins: the exported one (marker in its records, real dataset name) and the old one (name only).
    for dataset in ("celeba", "waterbirds-synth"):
        twin = _by(comparisons, dataset, "dfr")
        assert (twin.status, twin.published, twin.diff) == ("twin", None, None)
    # ULE's published gain is an "up to" bound: shown, never subtracted.
    gain = _by(comparisons, "waterbirds", "ule", "worst_group_gain")
    assert gain.status == "up_to" and gain.diff is None and gain.ours_mean == pytest.approx(75.0 - 55.0)


def test_a_protocol_difference_is_named_not_subtracted(results: Path, tmp_path: Path) -> None:
    # The published number selected by val-worst-group: a report under val-avg does not subtract it.
    board = aggregate(load_results(results), "val-avg")
    dfr = _by(compare(board, PUBLISHED), "waterbirds", "dfr")
    assert (dfr.status, dfr.diff) == ("selection", None)
    # A published backbone other than the one of our chosen configuration.
    other = parse_published(*_write(tmp_path, ["dfr,waterbirds,worst_group_accuracy,90,,,,resnet18,,,paper-a,"]))
    board = aggregate(load_results(results), "val-worst-group")
    assert _by(compare(board, other), "waterbirds", "dfr").status == "backbone"
    # An oracle-selected report is never compared.
    oracle = aggregate(load_results(results), "oracle-test")
    assert _by(compare(oracle, PUBLISHED), "waterbirds", "dfr").status == "oracle"


def test_every_format_carries_the_published_numbers_and_their_sources(results: Path) -> None:
    board = aggregate(load_results(results), "val-worst-group")
    reference = PUBLISHED.sources["dfr-readme"].location
    markdown = to_markdown(board, PUBLISHED)
    flat = " ".join(markdown.split())
    assert "| dfr | waterbirds | 85.0 ± 7.1 | 92.0 ± 0.9 | -7.0‡ | dfr-readme |" in " ".join(flat.split())
    assert "n/c: twin" in flat and "Sources of the published numbers: [dfr-readme]" in flat and reference in flat
    assert max(len(line) for line in markdown.splitlines() if line.startswith("|")) <= TERMINAL_WIDTH
    latex, html = to_latex(board, PUBLISHED), to_html(board, (), PUBLISHED)
    assert "dfr-readme" in latex and "92.0 $\\pm$ 0.9" in latex and "n/c: twin" in latex
    assert "-7.0\\ddag{}" in latex  # the caveat mark, as a LaTeX command
    assert "dfr-readme" in html and reference in html
    csv_text = to_csv(board, PUBLISHED)
    header = csv_text.splitlines()[0].split(",")
    assert {"published_pct", "published_source", "published_diff_pct", "published_reference"} <= set(header)
    dfr_line = next(line for line in csv_text.splitlines() if line.startswith("val-worst-group,False,waterbirds,")
                    and ",worst_group_accuracy,dfr," in line)
    assert ",92.0,0.9,,dfr-readme,-7.0,compared" in dfr_line
    assert any(",worst_group_gain,ule," in line and "up to" in line for line in csv_text.splitlines())
    # Without --published nothing changes.
    assert "published" not in to_csv(board).splitlines()[0] and "dfr-readme" not in to_markdown(board)


def test_report_published_cli_fits_a_terminal(results: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(results.parent)
    assert main(["report", "results", "--published", "--no-files"]) == 0
    printed = capsys.readouterr().out
    assert "Published and ours: worst-group accuracy" in printed and "dfr-readme" in printed
    assert max(len(line) for line in printed.splitlines()) <= TERMINAL_WIDTH, max(printed.splitlines(), key=len)
