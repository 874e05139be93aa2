"""The image cache: `bench data prepare` builds it, loading uses it only while it matches the files,
its images equal the file pipeline's, and the trainer reads it in uint8 batches."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from test_real_datasets import save_image, write_celeba, write_spawrious, write_urbancars, write_waterbirds

from bench.cli import main
from bench.core.backbones import IMAGENET_NORMALISATION
from bench.core.dataset import FileImages
from bench.core.device_data import DeviceData
from datasets import get_dataset
from datasets._files import CACHE_ENV, CachedImages, ImagePipeline


@pytest.fixture(autouse=True)
def _cache_next_to_the_data(monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)


def load(name, root, **options):  # type: ignore[no-untyped-def]
    return get_dataset(name).load(root, {"image_size": 32, **options})


def prepare(capsys, name, root, *extra):  # type: ignore[no-untyped-def]
    status = main(["data", "prepare", name, "--data-root", str(root), "--image-size", "32", "--quiet", *extra])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def all_images(dataset, split, train):  # type: ignore[no-untyped-def]
    source = dataset.splits[split].images
    return torch.stack([source.load(i, train) for i in range(len(source))])


def test_prepare_then_load_reads_the_cache_with_identical_eval_images(tmp_path, capsys):
    folder = write_waterbirds(tmp_path, size=(40, 60))
    files = load("waterbirds", tmp_path)
    assert files.extra["image_cache"] is None and not isinstance(files.splits["val"].images, CachedImages)
    status, out, err = prepare(capsys, "waterbirds", tmp_path)
    assert status == 0, err
    caches = list((folder / ".bench-cache").glob("waterbirds-36x36-*.npy"))
    assert len(caches) == 1 and f"cached 28 images at 36x36 in {caches[0]}" in out
    frames = np.load(caches[0])
    assert frames.shape == (28, 3, 36, 36) and frames.dtype == np.uint8

    cached = load("waterbirds", tmp_path)
    assert cached.extra["image_cache"] == caches[0]
    for split in ("train", "val", "test"):
        assert isinstance(cached.splits[split].images, CachedImages)
        assert cached.splits[split].images.paths == files.splits[split].images.paths
        assert torch.equal(cached.splits[split].group, files.splits[split].group)
        # Resize((36, 36)) then CenterCrop(32): bit-identical to the file transform.
        assert torch.equal(all_images(cached, split, train=False), all_images(files, split, train=False))
    batch = cached.splits["test"].images.load_batch([3, 0, 5], train=False)
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 32, 32)
    assert torch.equal(batch.float() / 255, all_images(files, "test", train=False)[[3, 0, 5]])

    status, out, _ = prepare(capsys, "waterbirds", tmp_path)
    assert status == 0 and "the image cache is up to date" in out
    # Another resolution is another cache: nothing cached at 64 yet.
    assert load("waterbirds", tmp_path, image_size=64).extra["image_cache"] is None


def test_changed_files_make_the_cache_stale(tmp_path, capsys):
    folder = write_waterbirds(tmp_path)
    assert prepare(capsys, "waterbirds", tmp_path)[0] == 0
    first = load("waterbirds", tmp_path).extra["image_cache"]
    victim = load("waterbirds", tmp_path).splits["train"].images.paths[1]
    save_image(victim, 999)
    stat = victim.stat()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    reloaded = load("waterbirds", tmp_path)
    assert reloaded.extra["image_cache"] is None
    assert type(reloaded.splits["train"].images) is FileImages
    assert "was built from other files" in capsys.readouterr().err
    status, out, _ = prepare(capsys, "waterbirds", tmp_path)
    assert status == 0 and f"removed the stale cache {first}" in out
    rebuilt = load("waterbirds", tmp_path)
    assert rebuilt.extra["image_cache"] not in (None, first) and not first.exists()
    assert torch.equal(all_images(rebuilt, "train", False)[1], all_images(reloaded, "train", False)[1])
    (folder / "metadata.csv").write_text((folder / "metadata.csv").read_text().rsplit("\n", 2)[0] + "\n")
    assert load("waterbirds", tmp_path).extra["image_cache"] is None  # one image fewer: another file set


def test_cache_location_env_and_flag(tmp_path, capsys, monkeypatch):
    write_waterbirds(tmp_path / "data")
    status, out, _ = prepare(capsys, "waterbirds", tmp_path / "data", "--cache-dir", str(tmp_path / "flag"))
    assert status == 0 and len(list((tmp_path / "flag").glob("*.npy"))) == 1
    assert f"set {CACHE_ENV}={tmp_path / 'flag'}" in out
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "flag"))
    assert load("waterbirds", tmp_path / "data").extra["image_cache"].parent == tmp_path / "flag"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert load("waterbirds", tmp_path / "data").extra["image_cache"] is None


def test_failed_prepare_leaves_no_cache(tmp_path, capsys):
    folder = write_waterbirds(tmp_path, size=(64, 64))
    victim = load("waterbirds", tmp_path).splits["val"].images.paths[0]
    victim.write_bytes(victim.read_bytes()[:300])
    status, _, err = prepare(capsys, "waterbirds", tmp_path)
    assert status == 2 and f"{victim}: cannot read image" in err
    assert list((folder / ".bench-cache").iterdir()) == []
    status, _, err = prepare(capsys, "waterbirds-synth", tmp_path)
    assert status == 2 and "has no image cache" in err


@pytest.mark.parametrize("name", ["urbancars", "spawrious-o2o-easy", "celeba"])
def test_cached_images_equal_file_images(tmp_path, capsys, name):
    writers = {"urbancars": write_urbancars, "spawrious-o2o-easy": write_spawrious, "celeba": write_celeba}
    writers[name](tmp_path)
    # image_size 16: UrbanCars' frame int(16*256/224) = 18, Spawrious 16, CelebA (20, 16) -> centre 16x16.
    options = {"image_size": 16}
    files = get_dataset(name).load(tmp_path, options)
    assert main(["data", "prepare", name, "--data-root", str(tmp_path), "--image-size", "16", "--quiet"]) == 0
    cached = get_dataset(name).load(tmp_path, options)
    assert isinstance(cached.splits["train"].images, CachedImages)
    for split in ("train", "val", "test"):
        assert torch.equal(all_images(cached, split, train=False), all_images(files, split, train=False))
    if name != "celeba":  # flip (UrbanCars), flip + colour jitter + grayscale (Spawrious): same draws, same images
        torch.manual_seed(3)
        from_files = all_images(files, "train", train=True)
        torch.manual_seed(3)
        from_cache = all_images(cached, "train", train=True)
        assert torch.equal(from_files, from_cache)
        assert not torch.equal(from_cache, all_images(cached, "train", train=False))


def test_random_resized_crop_on_cached_frames(tmp_path, capsys):
    write_waterbirds(tmp_path, size=(40, 60))
    assert prepare(capsys, "waterbirds", tmp_path)[0] == 0
    source = load("waterbirds", tmp_path, augment="true").splits["train"].images
    assert isinstance(source, CachedImages)
    torch.manual_seed(0)
    first = source.load_batch(list(range(8)), train=True)
    torch.manual_seed(0)
    assert torch.equal(first, source.load_batch(list(range(8)), train=True))
    second = source.load_batch(list(range(8)), train=True)
    assert first.shape == (8, 3, 32, 32) and first.dtype == torch.uint8 and not torch.equal(first, second)
    # A crop covering the whole frame (scale 1, ratio 1) is the frame resized: check it on one image.
    pipeline = ImagePipeline(frame=(36, 36), crop=(32, 32), augment="resized_crop_flip", crop_scale=(1.0, 1.0),
                             crop_ratio=(1.0, 1.0))
    frames = source.frames()
    whole = torch.nn.functional.interpolate(torch.from_numpy(np.array(frames[[0]])), size=(32, 32),
                                            mode="bilinear", antialias=True)[0]
    outputs = [pipeline.from_frames(frames, np.array([0]), train=True)[0] for _ in range(8)]
    assert all(torch.equal(o, whole) or torch.equal(o, whole.flip(-1)) for o in outputs)
    assert any(torch.equal(o, whole) for o in outputs) and any(torch.equal(o, whole.flip(-1)) for o in outputs)


def test_trainer_batches_from_cache_and_workers(tmp_path, capsys):
    write_waterbirds(tmp_path)
    files = load("waterbirds", tmp_path)
    assert prepare(capsys, "waterbirds", tmp_path)[0] == 0
    cached = load("waterbirds", tmp_path)
    source = cached.splits["val"].images
    copy = pickle.loads(pickle.dumps(source))
    assert len(pickle.dumps(source)) < 20_000  # the memmap is not pickled
    assert torch.equal(copy.load_batch([1, 2], False), source.load_batch([1, 2], False))
    order = torch.arange(8)
    cpu, imagenet = torch.device("cpu"), IMAGENET_NORMALISATION
    expected = DeviceData(files, cpu, False, normalisation=imagenet).images("val", order, train=False)
    in_process = DeviceData(cached, cpu, False, normalisation=imagenet).images("val", order, train=False)
    assert torch.allclose(in_process, expected, atol=1e-6)
    with_worker = DeviceData(cached, torch.device("cpu"), False, workers=1, normalisation=IMAGENET_NORMALISATION)
    batches = [x for _, x in with_worker.iter_images("val", order, 4, train=False)]
    assert torch.allclose(torch.cat(batches), expected, atol=1e-6)


def test_prepare_in_worker_processes_builds_the_same_cache(tmp_path, capsys):
    folder = write_waterbirds(tmp_path)
    assert prepare(capsys, "waterbirds", tmp_path)[0] == 0
    (cache,) = (folder / ".bench-cache").glob("*.npy")
    serial = np.load(cache)
    status, _, err = prepare(capsys, "waterbirds", tmp_path, "--force", "--workers", "1")
    assert status == 0, err
    assert np.array_equal(np.load(cache), serial)
