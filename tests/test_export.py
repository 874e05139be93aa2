"""``bench data export``: the twins written in their real datasets' layouts and read back by the real
loaders: export, then ``bench data check`` (against the twin's own counts), then a one-epoch run
through the file pipeline, for each of the four layouts; Spawrious' splits example for example; the
marker and its errors; the ``subsample`` option; and ERM with the pretrained efficientnet-lite0 on an
exported Waterbirds, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.cli import main
from bench.core.errors import BenchError
from datasets import get_dataset, load_dataset

# Tiny images keep the round trip fast (the command's default is 64 px); Spawrious is written at the
# twin's own 28 px, so that its lossless PNGs hold the twin's pixels exactly.
SIZES = {"waterbirds-synth": 12, "celeba-synth": 12, "urbancars-synth": 12, "spawrious-synth": 28}
REAL = {"waterbirds-synth": "waterbirds", "celeba-synth": "celeba", "urbancars-synth": "urbancars",
        "spawrious-synth": "spawrious-o2o-easy"}


def cli(capsys, *argv: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """Every twin exported once, in one data root (as a user would keep them)."""
    root = tmp_path_factory.mktemp("exported")
    for twin, size in SIZES.items():
        assert main(["data", "export", twin, str(root), "--image-size", str(size)]) == 0
    return root


def _run_config(out: Path, dataset: str) -> dict:
    (config,) = out.glob(f"{dataset}/erm/*/seed0/config.json")
    return json.loads(config.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("twin", list(SIZES))
def test_export_then_check_then_one_epoch_through_the_real_loader(exported, tmp_path, capsys, twin) -> None:
    real = REAL[twin]
    status, out, err = cli(capsys, "data", "check", real, "--data-root", str(exported), "--quiet")
    assert status == 0, err
    assert f"(the synthetic twin {twin})" in out and f"Group counts match the twin {twin}'s counts." in out
    assert all(len(line) <= 100 for line in out.splitlines() if line.startswith("|"))

    status, _, err = cli(capsys, "run", "--method", "erm", "--dataset", real, "--data-root", str(exported),
                         "--backbone", "small-cnn", "--epochs", "1", "--hparams", "pretrained=false", "batch_size=64",
                         "--data-option", "subsample=0.2", "--out", str(tmp_path), "--quiet")
    assert status == 0, err
    config = _run_config(tmp_path, real)
    assert config["dataset_info"]["synthetic"] == twin
    assert config["dataset_options"]["image_size"] == SIZES[twin]  # the export's size, not the backbone's 32
    assert config["synthetic_export"] == {"twin": twin, "data_version": get_dataset(twin).data_version(),
                                          "image_size": SIZES[twin]}
    final = json.loads(next(tmp_path.glob(f"{real}/erm/*/seed0/final.json")).read_text())
    assert final["status"] == "done"


def test_exported_labels_are_the_twins(exported) -> None:
    """Waterbirds and CelebA keep the twin's order within each split; their labels must be the twin's."""
    for twin in ("waterbirds-synth", "celeba-synth"):
        original = load_dataset(twin)
        files = load_dataset(REAL[twin], exported)
        assert files.synthetic == twin
        for split in ("train", "val", "test"):
            assert torch.equal(files.splits[split].y, original.splits[split].y)
            assert torch.equal(files.splits[split].attrs, original.splits[split].attrs)
    marker = json.loads((exported / "waterbird_complete95_forest2water2" / "bench-export.json").read_text())
    assert marker["twin"] == "waterbirds-synth" and marker["dataset"] == "waterbirds"
    assert marker["image_size"] == 12 and marker["data_version"] == get_dataset("waterbirds-synth").data_version()
    assert marker["resampling"].startswith("bicubic") and marker["n_images"] == 4795 + 1199 + 2318
    # The real data set's marker-less folder says nothing is synthetic.
    assert load_dataset("waterbirds-synth").synthetic == "waterbirds-synth"


def test_spawrious_export_reproduces_the_twins_splits_example_for_example(exported) -> None:
    twin = load_dataset("spawrious-synth")
    files = get_dataset("spawrious-o2o-easy").load(exported, {"image_size": 28, "augment": "false"})
    for split in ("train", "val", "test"):
        source = files.splits[split].images
        loaded = sorted(np.rint(source.load(i, train=False).numpy() * 255).astype(np.uint8).tobytes()
                        for i in range(len(source)))
        original = sorted(pixels.numpy().tobytes() for pixels in twin.splits[split].images.pixels)
        assert loaded == original, split
    # The breeds are named alike and ordered differently: the groups follow the names.
    assert files.group_counts("val")[files.group_names.index("corgi/snow")] == \
        twin.group_counts("val")[twin.group_names.index("corgi/snow")] == 291


@pytest.mark.slow
def test_waterbirds_export_trains_from_the_image_cache_with_augmentation_and_workers(exported, tmp_path, capsys,
                                                                                      monkeypatch) -> None:
    cache = tmp_path / "cache"
    status, out, err = cli(capsys, "data", "prepare", "waterbirds", "--data-root", str(exported), "--cache-dir",
                           str(cache), "--quiet")
    assert status == 0, err
    assert "at 13x13" in out  # the export's 12 px: Resize(int(12 * 256 / 224)) frames
    monkeypatch.setenv("BENCH_IMAGE_CACHE_DIR", str(cache))
    options = {"augment": "true", "image_size": 12}
    dataset = get_dataset("waterbirds").load(exported, options)
    assert dataset.extra["image_cache"] is not None
    # A subsample reads its rows from the same cache, and its images are those rows' images.
    kept = load_dataset("waterbirds", exported, {**options, "subsample": "0.1"})
    rows = kept.splits["val"].images.rows
    assert len(rows) == sum(max(1, round(0.1 * n)) for n in dataset.group_counts("val"))
    positions = [int(np.flatnonzero(dataset.splits["val"].images.rows == row)[0]) for row in rows[:4]]
    assert torch.equal(kept.splits["val"].images.load_batch([0, 1, 2, 3], train=False),
                       dataset.splits["val"].images.load_batch(positions, train=False))
    status, _, err = cli(capsys, "run", "--method", "erm", "--dataset", "waterbirds", "--data-root",
                         str(exported), "--backbone", "small-cnn", "--epochs", "1", "--workers", "1",
                         "--hparams", "pretrained=false", "batch_size=64", "--data-option", "augment=true",
                         "subsample=0.2", "--out", str(tmp_path / "out"), "--quiet")
    assert status == 0, err
    config = _run_config(tmp_path / "out", "waterbirds")
    assert config["dataset_options"] == {"augment": "true", "subsample": "0.2", "image_size": 12}


def test_bench_list_says_which_folders_hold_an_exported_twin(exported, capsys) -> None:
    status, out, _ = cli(capsys, "list", "--data-root", str(exported))
    assert status == 0 and max(len(line) for line in out.splitlines()) <= 100
    rows: dict[str, str] = {}
    name = ""
    for line in out.splitlines():  # a table row's cells may continue on the next lines
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3:
            name = cells[0] or name
            rows[name] = f"{rows.get(name, '')} {cells[1]}".strip()
    assert rows["waterbirds"].endswith("(the twin waterbirds-synth, 12 px)")
    assert rows["spawrious-o2o-easy"].endswith("(the twin spawrious-synth, 28 px)")
    assert rows["spawrious-m2m-easy"].endswith("not readable as spawrious-m2m-easy)")
    assert rows["custom"] == "not found"


# --------------------------------------------------------------------------------------------
# Errors


def test_export_refuses_bad_input_and_never_leaves_half_a_folder(tmp_path, capsys) -> None:
    for args, expected in ((["waterbirds", str(tmp_path)], "'waterbirds' is not a synthetic twin"),
                           (["waterbirds-synth", str(tmp_path), "--image-size", "4"], "at least 8 pixels"),
                           (["waterbirds-synth", str(tmp_path), "--data-option", "augment=true"], "only data_seed")):
        status, _, err = cli(capsys, "data", "export", *args)
        assert status == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "celeba").mkdir()
    status, _, err = cli(capsys, "data", "export", "celeba-synth", str(tmp_path), "--image-size", "8")
    assert status == 2 and "already exists" in err and "--force" in err
    assert list((tmp_path / "celeba").iterdir()) == []


def test_export_with_force_replaces_the_folder(tmp_path, capsys) -> None:
    (tmp_path / "urbancars").mkdir()
    (tmp_path / "urbancars" / "stale.txt").write_text("old")
    status, out, err = cli(capsys, "data", "export", "urbancars-synth", str(tmp_path), "--image-size", "8", "--force")
    assert status == 0, err
    assert not (tmp_path / "urbancars" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["urbancars"]  # no temporary folder left
    assert "in the layout of urbancars" in out
    assert load_dataset("urbancars", tmp_path).group_counts("train") == \
        load_dataset("urbancars-synth").group_counts("train")


def test_the_marker_is_validated(exported, tmp_path) -> None:
    import shutil

    with pytest.raises(BenchError, match="exported for spawrious-o2o-easy, which is the only dataset"):
        get_dataset("spawrious-m2m-easy").load(exported, {"image_size": 8})
    folder = tmp_path / "waterbird_complete95_forest2water2"
    shutil.copytree(exported / "waterbird_complete95_forest2water2", folder)
    (folder / "bench-export.json").write_text("{not json")
    with pytest.raises(BenchError, match="bench-export.json: not readable JSON"):
        get_dataset("waterbirds").load(tmp_path, {"image_size": 8})
    (folder / "bench-export.json").write_text(json.dumps({"twin": "waterbirds-synth"}))
    with pytest.raises(BenchError, match="needs the keys twin, dataset, data_version, image_size"):
        get_dataset("waterbirds").load(tmp_path, {"image_size": 8})
    (folder / "bench-export.json").unlink()
    assert get_dataset("waterbirds").load(tmp_path, {"image_size": 8}).synthetic is None


# --------------------------------------------------------------------------------------------
# The subsample option


def test_subsample_keeps_a_fraction_of_every_group_of_every_split() -> None:
    full = load_dataset("waterbirds-synth")
    half = load_dataset("waterbirds-synth", options={"subsample": "0.05"})
    for split in ("train", "val", "test"):
        assert half.group_counts(split) == [max(1, round(0.05 * n)) for n in full.group_counts(split)]
        kept = half.splits[split].images.pixels
        rows = [int(np.flatnonzero((full.splits[split].images.pixels == image).flatten(1).all(1))[0])
                for image in kept[:5]]
        assert rows == sorted(rows) and all(
            full.splits[split].y[r] == half.splits[split].y[i] for i, r in enumerate(rows))
    again = load_dataset("waterbirds-synth", options={"subsample": 0.05, "data_seed": 0})
    assert torch.equal(again.splits["train"].images.pixels, half.splits["train"].images.pixels)
    for bad in ("0", "1.5", "half"):
        with pytest.raises(BenchError, match="expected a fraction in \\(0, 1\\]"):
            load_dataset("waterbirds-synth", options={"subsample": bad})


# --------------------------------------------------------------------------------------------
# The pretrained regime, offline: ERM from efficientnet-lite0's packaged weights on exported files


@pytest.mark.slow
def test_erm_with_pretrained_efficientnet_lite0_on_an_exported_waterbirds_offline(exported, tmp_path, capsys,
                                                                                  monkeypatch) -> None:
    # No network: any download attempt would fail at once (a proxy on a closed port, the hub offline).
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared two-core test machine: two OpenMP threads wait on each other
    try:
        status, _, err = cli(capsys, "run", "--method", "erm", "--dataset", "waterbirds", "--data-root",
                             str(exported), "--backbone", "efficientnet-lite0", "--seeds", "1", "--epochs", "1",
                             "--data-option", "subsample=0.05", "--out", str(tmp_path), "--quiet")
    finally:
        torch.set_num_threads(threads)
    assert status == 0, err
    config = _run_config(tmp_path, "waterbirds")
    assert config["hparams"]["backbone"] == "efficientnet-lite0" and config["hparams"]["pretrained"] is True
    weights = config["backbone_weights"]
    assert Path(weights["file"]).name == "efficientnet-lite0-57934424.pth"
    assert weights["sha256"].startswith("57934424") and len(weights["sha256"]) == 64
    assert config["backbone_input"]["mean"] == [0.5, 0.5, 0.5]
    assert config["dataset_info"]["synthetic"] == "waterbirds-synth"
    final = json.loads(next(tmp_path.glob("waterbirds/erm/*/seed0/final.json")).read_text())
    assert final["status"] == "done"
