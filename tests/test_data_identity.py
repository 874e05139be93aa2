"""A run's identity covers the data it reads, and a resumed run counts under the groups it started with.

File datasets: their ``data_fingerprint`` (index files' content, every image file's path, size and
modification time) is part of the run identity; twins keep their ``data_version`` (test_records.py).
Group order: the custom dataset's attribute values sort in one total order, the same in every process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_seed0, write_custom_dataset
from PIL import Image

import datasets
from bench import runner, trainer
from bench.cli import main
from bench.core import records

TINY = ["--backbone", "small-cnn", "--quiet", "--hparams", "pretrained=false", "batch_size=8", "optimizer=adam"]


@pytest.fixture(autouse=True)
def fresh_loads(monkeypatch):
    """Each test loads its datasets anew (load_dataset memoises per process; these tests edit files)."""
    monkeypatch.setattr(datasets, "_LOADED", {})


def _reload() -> None:
    datasets._LOADED.clear()


def _request(root: Path, out: Path | None = None, epochs: int = 1) -> runner.RunRequest:
    return runner.RunRequest(method="erm", dataset="custom", data_root=str(root), out=str(out or "results"),
                             epochs=epochs, backbone="small-cnn",
                             hparam_overrides=["pretrained=false", "batch_size=8", "optimizer=adam"])


def _edit_metadata(root: Path, transform) -> None:  # type: ignore[no-untyped-def]
    path = root / "metadata.csv"
    header, *rows = path.read_text().splitlines()
    path.write_text("\n".join([header, *map(transform, rows)]) + "\n")


def _flip_label(row: str) -> str:
    filename, y, rest = row.split(",", 2)
    return f"{filename},{1 - int(y)},{rest}"


def test_other_data_under_the_same_out_is_another_run_not_a_skipped_one(tmp_path, capsys):
    first = write_custom_dataset(tmp_path / "a", n_per_group=3)
    second = tmp_path / "b"
    shutil.copytree(first, second)
    _edit_metadata(second, _flip_label)  # another dataset: every label flipped
    out = tmp_path / "out"
    args = ["run", "--method", "erm", "--dataset", "custom", "--epochs", "1", "--out", str(out), *TINY]
    assert main([*args, "--data-root", str(first)]) == 0
    capsys.readouterr()
    assert main([*args, "--data-root", str(second)]) == 0
    assert "already done" not in capsys.readouterr().err
    configs = [json.loads(p.read_text()) for p in sorted(out.glob("custom/erm/*/seed0/config.json"))]
    assert len(configs) == 2  # two runs, each with its own numbers
    assert configs[0]["data_fingerprint"] != configs[1]["data_fingerprint"]
    assert all(len(c["data_fingerprint"]) == 16 for c in configs)


def test_the_fingerprint_follows_the_files_read_and_nothing_else(tmp_path):
    root = write_custom_dataset(tmp_path / "data", n_per_group=2)
    original = runner.run_identity(_request(root))
    assert runner.run_identity(_request(root)) == original  # stable

    # The same files elsewhere (copied with their modification times): the same run.
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)  # copy2 keeps modification times
    _reload()
    assert runner.run_identity(_request(copy))["data_fingerprint"] == original["data_fingerprint"]

    # An edited metadata.csv (one label) is other data; editing it back gives the same run again.
    text = (root / "metadata.csv").read_text()
    _edit_metadata(root, lambda row: _flip_label(row) if row.startswith("img/train_0_red_0") else row)
    _reload()
    edited = runner.run_identity(_request(root))
    assert records.config_hash(edited) != records.config_hash(original)
    (root / "metadata.csv").write_text(text)
    _reload()
    assert runner.run_identity(_request(root)) == original

    # An image file replaced (another size) or touched (another modification time) is other data.
    image = root / "img" / "test_1_blue_1.png"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    _reload()
    touched = runner.run_identity(_request(root))["data_fingerprint"]
    assert touched != original["data_fingerprint"]
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    _reload()
    assert runner.run_identity(_request(root))["data_fingerprint"] not in (touched, original["data_fingerprint"])


def test_real_dataset_layouts_are_fingerprinted_by_their_index_and_image_files(tmp_path):
    from test_real_datasets import write_celeba, write_urbancars, write_waterbirds

    def identity(name: str, root: Path) -> str:
        _reload()
        request = runner.RunRequest(method="erm", dataset=name, data_root=str(root), backbone="small-cnn")
        return runner.run_identity(request)["data_fingerprint"]

    waterbirds = write_waterbirds(tmp_path / "wb")
    before = identity("waterbirds", waterbirds)
    _edit_metadata(waterbirds, lambda row: row.replace(",1,0,", ",0,0,", 1))  # a label of the metadata
    assert identity("waterbirds", waterbirds) != before

    celeba = write_celeba(tmp_path / "celeba")
    before = identity("celeba", celeba)
    partition = celeba / "list_eval_partition.txt"
    partition.write_text(partition.read_text().replace("000001.jpg 0", "000001.jpg 1"))  # a split file edit
    assert identity("celeba", celeba) != before

    urbancars = write_urbancars(tmp_path / "uc")
    before = identity("urbancars", urbancars)
    (next(urbancars.glob("bg-0.95*/train/*/000.jpg"))).unlink()  # one training image fewer
    assert identity("urbancars", urbancars) != before


def test_identities_of_a_sweep_load_each_dataset_once(tmp_path, monkeypatch):
    from bench.sweep.plan import plan
    from bench.sweep.settings import build_settings
    from datasets.custom import CustomDataset

    root = write_custom_dataset(tmp_path / "data", n_per_group=2)
    loads = []
    original = CustomDataset.load.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(CustomDataset, "load",
                        classmethod(lambda cls, *a, **k: loads.append(1) or original(cls, *a, **k)))
    spec, _ = build_settings({"methods": ["erm", "groupdro"], "datasets": ["custom"], "data_root": str(root),
                              "seeds": 3, "n_hparams": 4, "out": str(tmp_path / "out"), "backbone": "small-cnn",
                              "hparams": ["pretrained=false"]})
    runs = plan(spec)
    assert len(runs) == 24 and len({r.run_dir.path.parent for r in runs}) == 8
    assert len(loads) == 1


# -- group order --------------------------------------------------------------------------------------

TAGS = ("nan", "1", "01", "1.5", "b")


def _write_tagged_dataset(root: Path) -> Path:
    """A custom dataset whose attribute ``tag`` takes values that tie in a numeric sort (1, 01) or compare
    unequal to themselves as numbers (nan); every (y, tag) group in every split."""
    (root / "img").mkdir(parents=True)
    lines = ["filename,y,split,tag"]
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for y in (0, 1):
            for t, tag in enumerate(TAGS):
                name = f"img/{split}_{y}_{t}.png"
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name)
                lines.append(f"{name},{y},{split},{tag}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_group_order_is_total_and_the_same_under_every_hash_seed(tmp_path):
    root = _write_tagged_dataset(tmp_path / "data")
    script = ("import json, sys; from pathlib import Path; from datasets import get_dataset; "
              "print(json.dumps(get_dataset('custom').load(Path(sys.argv[1]), {'image_size': 8}).group_names))")
    orders = set()
    for hash_seed in range(6):
        env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
        result = subprocess.run([sys.executable, "-c", script, str(root)], env=env, capture_output=True, text=True,
                                check=True)
        orders.add(result.stdout.strip())
    assert len(orders) == 1, orders
    # numbers by value, ties by their text; then text in code-point order, nan included
    expected = [f"{y}/{tag}" for y in (0, 1) for tag in ("01", "1", "1.5", "b", "nan")]
    assert json.loads(orders.pop()) == expected


def test_a_resumed_run_whose_groups_differ_from_its_config_is_refused(tmp_path, monkeypatch, capsys):
    root = write_custom_dataset(tmp_path / "data", n_per_group=3)
    request = _request(root, tmp_path / "out", epochs=2)
    run_path, trained = run_seed0(request, monkeypatch, interrupt_after=1)
    assert trained == 1 and not (run_path / "final.json").exists()
    # As a process whose string hashing ordered the attribute's values the other way would have recorded it:
    config = json.loads((run_path / "config.json").read_text())
    names = config["dataset_info"]["attr_value_names"][0]
    assert names == ["blue", "red"]
    config["dataset_info"]["attr_value_names"] = [names[::-1]]
    config["dataset_info"]["group_names"] = ["0/red", "0/blue", "1/red", "1/blue"]
    records.atomic_write_json(run_path / "config.json", config)
    monkeypatch.setattr(runner, "train", trainer.train)  # no more interruptions
    status = main(["run", "--method", "erm", "--dataset", "custom", "--data-root", str(root), "--epochs", "2",
                   "--out", str(tmp_path / "out"), *TINY])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "config.json" in err and "attr value names" in err and "--force" in err
    assert not (run_path / "final.json").exists()
    assert "attr value names" in json.loads((run_path / "failed.json").read_text())["reason"]
    assert len(records.read_jsonl(run_path / "metrics.jsonl")) == 1  # nothing counted under the wrong names
