"""Presets (bench/presets/*.yaml, presets/ in a checkout): each plans as a dry run and names only real
datasets, registered methods and declared hparams; they are found from anywhere and listed with their
source; the package carries them (and the published numbers) when installed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench.cli import main
from bench.core.errors import ConfigError
from bench.sweep.plan import plan
from bench.sweep.presets import PRESETS_DIR, find_preset, presets, resolve_sweep_file
from bench.sweep.settings import build_settings, load_sweep_file
from datasets import get_dataset
from methods import get_method, method_names
from methods.base import hparam_specs

ROOT = Path(__file__).resolve().parents[1]
PRESETS = presets()


def fake_data_root(root: Path, names: list[str]) -> Path:
    """Miniature releases of the real datasets (tests/test_real_datasets.py's writers): the sweep planner
    loads each dataset once, since a run's identity covers the files it reads."""
    from test_real_datasets import write_celeba, write_spawrious, write_urbancars, write_waterbirds

    writers = {"waterbirds": write_waterbirds, "celeba": write_celeba, "urbancars": write_urbancars}
    for name in {n if n in writers else "spawrious" for n in names}:
        if name == "spawrious":
            write_spawrious(root)
        else:
            writers[name](root)
    for name in names:
        assert get_dataset(name).locate(root) is not None, name
    return root


def test_there_are_presets_for_every_paper_protocol() -> None:
    assert {p.name for p in PRESETS} >= {"sagawa2020-groupdro", "liu2021-jtt", "kirichenko2023-dfr", "nam2020-lff",
                                         "li2023-whac-a-mole", "lynch2023-spawrious", "mitchell2025-ule"}
    assert (ROOT / "presets").resolve() == PRESETS_DIR  # a checkout shows them as presets/


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_plans_and_names_only_real_things(preset, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert preset.title and preset.source
    settings = load_sweep_file(preset.path)
    spec, _ = build_settings(settings)
    assert set(spec.methods) <= set(method_names())
    for dataset in spec.datasets:
        source = get_dataset(dataset)
        assert source.needs_data_root and dataset != "custom", f"{dataset} is not a real dataset"
    for item in spec.hparam_overrides:  # fixed hparams: declared by every method of the preset
        name = item.split("=")[0]
        assert all(name in hparam_specs(get_method(method)) for method in spec.methods), name
    root = fake_data_root(tmp_path / "data", list(spec.datasets))
    out = tmp_path / "out"
    status = main(["sweep", f"presets/{preset.name}.yaml", "--data-root", str(root), "--out", str(out), "--dry-run"])
    printed = capsys.readouterr().out
    assert status == 0
    runs = plan(build_settings({**settings, "data_root": str(root), "out": str(out)})[0])
    assert {run.method for run in runs} == set(spec.methods) and {run.dataset for run in runs} == set(spec.datasets)
    assert len(runs) == len(spec.methods) * len(spec.datasets) * spec.seeds * spec.n_hparams
    assert f"would launch {len(runs)} runs" in printed and not out.exists()


def test_a_preset_is_found_from_anywhere_by_path_or_name(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)  # no presets/ folder here: an installed package
    for argument in ("presets/liu2021-jtt.yaml", "liu2021-jtt", "liu2021-jtt.yaml"):
        assert resolve_sweep_file(argument) == PRESETS_DIR / "liu2021-jtt.yaml"
    assert find_preset("elsewhere/liu2021-jtt.yaml") is None  # another folder's file is not a preset
    with pytest.raises(ConfigError, match="bench list --presets"):
        resolve_sweep_file("presets/nope.yaml")
    own = tmp_path / "liu2021-jtt.yaml"
    own.write_text("methods: [erm]\ndatasets: [waterbirds-synth]\n")
    assert resolve_sweep_file("liu2021-jtt.yaml").resolve() == own  # a file that exists wins


def test_a_preset_without_title_or_source_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bench.sweep.presets import load_preset

    path = tmp_path / "x.yaml"
    path.write_text("title: T\nmethods: [erm]\ndatasets: [waterbirds]\n")
    with pytest.raises(ConfigError, match="needs a 'source'"):
        load_preset(path)


def test_list_presets_shows_each_with_its_source(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["list", "--presets"]) == 0
    short = capsys.readouterr().out
    assert all(f"| {p.name} " in short for p in PRESETS)
    assert max(len(line) for line in short.splitlines()) <= 100
    assert main(["list", "--presets", "--long"]) == 0
    long = capsys.readouterr().out
    assert all(p.source in " ".join(long.split()) for p in PRESETS)
    assert max(len(line) for line in long.splitlines()) <= 100


def test_an_installed_package_carries_the_presets_and_the_published_numbers(tmp_path) -> None:
    # Build the wheel from a copy (pip writes build files next to the sources) and list what it holds.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((ROOT / name).read_bytes())
    for package in ("bench", "methods", "datasets"):
        subprocess.run(["cp", "-r", str(ROOT / package), str(source / package)], check=True)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "No module named pip" in built.stderr:
        pytest.skip("pip is not installed in this environment")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"bench/presets/{p.name}.yaml" for p in PRESETS} <= names
    assert {"bench/report/published.csv", "bench/report/published_sources.csv"} <= names
    # Every subpackage, not only the top-level ones.
    assert {"bench/core/metrics.py", "bench/report/compare.py", "bench/sweep/presets.py",
            "bench/download/fetch.py"} <= names
