"""The data paths of bench.core.device_data, run on the CPU: the GPU-side path from the image cache (crop
boxes distributed as torchvision's, applied where they were drawn, evaluation pixels equal to the host's,
seeded per batch), the persistent worker pool for image files (seeded per batch: the same batches for any
number of workers), the prefetching thread, and resumed runs equal to uninterrupted ones on both paths."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from test_real_datasets import write_urbancars, write_waterbirds
from torchvision.transforms import RandomResizedCrop

from bench.core.backbones import IMAGENET_NORMALISATION, SYMMETRIC_NORMALISATION, Normalisation, build_backbone
from bench.core.dataset import FileImages, FrameTransform, SpuriousDataset, make_split
from bench.core.device_data import DeviceData
from bench.core.frame_batches import CropBoxes, draw_resized_crops, transform_frames
from bench.core.metrics import GroupStructure
from bench.core.prefetch import prefetch
from bench.core.records import RunDir
from bench.trainer import Progress, seed_everything, train
from datasets import get_dataset
from datasets._files import CACHE_ENV, CachedImages, build_cache
from methods.base import MethodContext, resolve_hparams
from methods.erm import ERM


@pytest.fixture(autouse=True)
def _cache_next_to_the_data(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv(CACHE_ENV, raising=False)


def cached(name: str, root: Path, **options: str) -> SpuriousDataset:
    """The dataset at image size 32, after building its cache."""
    dataset = get_dataset(name).load(root, {"image_size": 32, **options})
    build_cache(name, dataset.extra["image_files"], dataset.extra["pipeline"])
    loaded = get_dataset(name).load(root, {"image_size": 32, **options})
    assert isinstance(loaded.splits["train"].images, CachedImages)
    return loaded


def passes(data: DeviceData, split: str, seed: int | None, train: bool = True, batch: int = 4) -> torch.Tensor:
    order = torch.arange(data.n(split))
    return torch.cat([x for _, x in data.iter_images(split, order, batch, train, seed)])


# --------------------------------------------------------------------------------------------
# Crop boxes: the distribution of torchvision's RandomResizedCrop.get_params


def torchvision_boxes(n: int, frame: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float]
                      ) -> np.ndarray:
    torch.manual_seed(0)
    probe = torch.empty(1, *frame)
    return np.array([RandomResizedCrop.get_params(probe, list(scale), list(ratio)) for _ in range(n)])


def box_statistics(top: np.ndarray, left: np.ndarray, height: np.ndarray, width: np.ndarray,
                   frame: tuple[int, int]) -> dict[str, np.ndarray]:
    """Area fraction, aspect ratio and the positions (each uniform in [0, 1) given the size)."""
    return {"area": height * width / (frame[0] * frame[1]), "aspect": width / height,
            "top": (top + 0.5) / (frame[0] - height + 1), "left": (left + 0.5) / (frame[1] - width + 1)}


def ks_p_values(boxes: CropBoxes, reference: np.ndarray, frame: tuple[int, int]) -> dict[str, float]:
    ours = box_statistics(*(getattr(boxes, k).numpy() for k in ("top", "left", "height", "width")), frame=frame)
    theirs = box_statistics(reference[:, 0], reference[:, 1], reference[:, 2], reference[:, 3], frame)
    return {key: stats.ks_2samp(ours[key], theirs[key]).pvalue for key in ours}


@pytest.mark.parametrize(("frame", "scale", "ratio"), [((36, 36), (0.7, 1.0), (3 / 4, 4 / 3)),  # Waterbirds
                                                       ((40, 32), (0.7, 1.0), (1.0, 4 / 3)),  # CelebA's ratio
                                                       ((30, 50), (0.08, 1.0), (3 / 4, 4 / 3))])  # ImageNet's
def test_crop_boxes_are_distributed_as_torchvision_draws_them(frame, scale, ratio) -> None:  # type: ignore[no-untyped-def]
    n = 3000
    boxes = draw_resized_crops(n, frame, scale, ratio, torch.Generator().manual_seed(1))
    reference = torchvision_boxes(n, frame, scale, ratio)
    assert all(p > 1e-3 for p in ks_p_values(boxes, reference, frame).values())
    assert (boxes.height <= frame[0]).all() and (boxes.width <= frame[1]).all() and (boxes.top >= 0).all()
    assert (boxes.top + boxes.height <= frame[0]).all() and (boxes.left + boxes.width <= frame[1]).all()
    assert abs(boxes.flip.float().mean().item() - 0.5) < 0.04  # 5 standard deviations at n = 3000
    # The same statistics tell other scales apart: the test has the power to fail.
    other = draw_resized_crops(n, frame, (scale[0] / 2, scale[1]), ratio, torch.Generator().manual_seed(1))
    assert ks_p_values(other, reference, frame)["area"] < 1e-6


def test_when_no_try_fits_the_box_is_torchvision_fallback() -> None:
    frame, scale, ratio = (10, 100), (0.9, 1.0), (1.0, 1.0)  # a square of 90% of the area never fits
    boxes = draw_resized_crops(50, frame, scale, ratio, torch.Generator().manual_seed(0))
    expected = torchvision_boxes(1, frame, scale, ratio)[0]
    for k, name in enumerate(("top", "left", "height", "width")):
        assert (getattr(boxes, name) == int(expected[k])).all()


# --------------------------------------------------------------------------------------------
# The crop on the device takes the pixels of the drawn box


def coordinate_frames(n: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 frames whose channels hold each pixel's column, its row and the example's index."""
    frames = torch.empty(n, 3, *size, dtype=torch.uint8)
    frames[:, 0] = torch.arange(size[1], dtype=torch.uint8)[None, None, :]
    frames[:, 1] = torch.arange(size[0], dtype=torch.uint8)[None, :, None]
    frames[:, 2] = torch.arange(n, dtype=torch.uint8)[:, None, None]
    return frames


def test_device_crops_sample_the_drawn_boxes_and_flip_them() -> None:
    transform = FrameTransform(crop=(8, 8), augment="resized_crop_flip")
    frames = coordinate_frames(3, (40, 40))
    boxes = CropBoxes(top=torch.tensor([5, 2, 1]), left=torch.tensor([7, 1, 3]), height=torch.tensor([8, 16, 13]),
                      width=torch.tensor([8, 16, 21]), flip=torch.tensor([False, False, True]))
    out = transform_frames(frames, transform, boxes) * 255
    # A box of the output's size: exactly its pixels.
    assert torch.equal(out[0], frames[0, :, 5:13, 7:15].float())
    # Larger boxes: each output pixel samples its bin's centre (the coordinates are linear, so the bilinear
    # samples average to the centre exactly), flipped where the box says so.
    for b in (1, 2):
        top, left, height, width = (int(getattr(boxes, k)[b]) for k in ("top", "left", "height", "width"))
        centres = torch.arange(8, dtype=torch.float32) + 0.5
        columns = left + centres * width / 8 - 0.5
        rows = top + centres * height / 8 - 0.5
        if boxes.flip[b]:
            columns = columns.flip(0)
        torch.testing.assert_close(out[b, 0], columns[None, :].expand(8, 8), atol=1e-3, rtol=0)
        torch.testing.assert_close(out[b, 1], rows[:, None].expand(8, 8), atol=1e-3, rtol=0)
        assert (out[b, 2] == b).all()  # nothing of another example


# --------------------------------------------------------------------------------------------
# DeviceData on the cache: the device path against the host path


def test_device_evaluation_batches_equal_the_host_ones_and_training_batches_are_seeded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    write_waterbirds(tmp_path, size=(40, 60))
    dataset = cached("waterbirds", tmp_path, augment="true")
    device = DeviceData(dataset, torch.device("cpu"), False, normalisation=IMAGENET_NORMALISATION,
                        frames_on_device=True)
    host = DeviceData(dataset, torch.device("cpu"), False, normalisation=IMAGENET_NORMALISATION, frames_on_device=False)
    for split in ("train", "val"):
        assert torch.equal(passes(device, split, None, train=False), passes(host, split, None, train=False))
    state = torch.get_rng_state()
    first = passes(device, "train", seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the augmentation drew nothing from the global generator
    assert torch.equal(first, passes(device, "train", seed=7))
    assert not torch.equal(first, passes(device, "train", seed=8))
    assert not torch.equal(first, passes(device, "train", None, train=False))
    assert first.shape == (12, 3, 32, 32)
    # On the host the same seed also gives the same batches (with its own draws: torchvision's).
    assert torch.equal(passes(host, "train", seed=7), passes(host, "train", seed=7))


def test_device_flip_only_augmentation_mirrors_the_evaluation_crop(tmp_path) -> None:  # type: ignore[no-untyped-def]
    write_urbancars(tmp_path)
    dataset = cached("urbancars", tmp_path)  # UrbanCars trains with a horizontal flip
    assert dataset.splits["train"].images.transform.augment == "flip"
    data = DeviceData(dataset, torch.device("cpu"), False, normalisation=IMAGENET_NORMALISATION,
                      frames_on_device=True)
    evaluation = passes(data, "train", None, train=False)
    mirrored = []
    for seed in range(4):
        for image, plain in zip(passes(data, "train", seed), evaluation):
            assert torch.equal(image, plain) or torch.equal(image, plain.flip(-1))
            mirrored.append(not torch.equal(image, plain))
    assert any(mirrored) and not all(mirrored)


def test_a_host_only_augmentation_stays_on_the_host(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from test_real_datasets import write_spawrious

    write_spawrious(tmp_path)
    dataset = cached("spawrious-o2o-easy", tmp_path)  # colour jitter: applied by the dataset's own code
    assert not dataset.splits["train"].images.transform.on_device
    device = DeviceData(dataset, torch.device("cpu"), False, normalisation=IMAGENET_NORMALISATION,
                        frames_on_device=True)
    host = DeviceData(dataset, torch.device("cpu"), False, normalisation=IMAGENET_NORMALISATION, frames_on_device=False)
    assert torch.equal(passes(device, "train", seed=3), passes(host, "train", seed=3))


# --------------------------------------------------------------------------------------------
# Image files: a persistent worker pool, seeded per batch


class ProcessIds(FileImages):
    """Images whose every pixel is the id of the process that loaded them (over 1e7)."""

    def load_batch(self, indices, train):  # type: ignore[no-untyped-def]
        return torch.full((len(indices), 3, 2, 2), os.getpid() / 1e7)


def test_file_workers_persist_across_passes_and_leave_the_global_generator_alone() -> None:
    images = ProcessIds([Path(f"{i}.png") for i in range(8)], lambda i: i, lambda i: i, (3, 2, 2))
    split = make_split("train", torch.tensor([0, 1] * 4), torch.tensor([0, 0, 1, 1] * 2), images, [2])
    dataset = SpuriousDataset("pids", ["a", "b"], ["c"], [["0", "1"]], {"train": split, "val": split, "test": split},
                              "group_mean")
    data = DeviceData(dataset, torch.device("cpu"), False, workers=2,
                      normalisation=Normalisation((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    state = torch.get_rng_state()
    try:
        pids = [set((passes(data, split, seed=1, batch=2) * 1e7).round().long().unique().tolist())
                for split in ("train", "val", "train")]
    finally:
        data.close()
    assert torch.equal(torch.get_rng_state(), state)
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2] and os.getpid() not in pids[0]


def test_file_batches_are_the_same_for_any_number_of_workers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    write_waterbirds(tmp_path, size=(40, 60))
    dataset = get_dataset("waterbirds").load(tmp_path, {"image_size": 32, "augment": "true"})
    assert type(dataset.splits["train"].images) is FileImages  # no cache: PIL and torchvision transforms
    in_process = DeviceData(dataset, torch.device("cpu"), False, normalisation=IMAGENET_NORMALISATION)
    pooled = DeviceData(dataset, torch.device("cpu"), False, workers=2, normalisation=IMAGENET_NORMALISATION)
    try:
        expected = passes(in_process, "train", seed=5)
        assert torch.equal(passes(pooled, "train", seed=5), expected)
        assert not torch.equal(passes(pooled, "train", seed=6), expected)
        assert torch.equal(passes(pooled, "val", None, train=False), passes(in_process, "val", None, train=False))
    finally:
        pooled.close()


# --------------------------------------------------------------------------------------------
# The prefetching thread


def test_prefetch_keeps_order_raises_where_the_producer_failed_and_stops_early() -> None:
    assert list(prefetch(iter(range(10)))) == list(range(10))

    def failing():  # type: ignore[no-untyped-def]
        yield 1
        raise ValueError("broken batch")

    items = prefetch(failing())
    assert next(items) == 1
    with pytest.raises(ValueError, match="broken batch"):
        next(items)
    before = threading.active_count()
    endless = prefetch(iter(range(10**9)))
    assert next(endless) == 0
    endless.close()  # what a `break` out of the loop does
    assert threading.active_count() == before


# --------------------------------------------------------------------------------------------
# Training on both paths: a resumed run equals an uninterrupted one


class Stop(Exception):
    pass


def erm_run(dataset: SpuriousDataset, folder: Path, stop_after: int | None, **data_options: object) -> list:  # type: ignore[type-arg]
    hparams = resolve_hparams(ERM, "toy", {"backbone": "small-cnn", "optimizer": "adam", "lr": 1e-3, "batch_size": 4,
                                           "epochs": 2})
    structure = GroupStructure.from_info(dataset.info())
    run_dir = RunDir(folder)
    run_dir.path.mkdir(parents=True, exist_ok=True)

    def fresh() -> tuple[ERM, DeviceData]:
        seed_everything(0)
        context = MethodContext(hparams, dataset.info(), torch.device("cpu"), lambda: build_backbone("small-cnn", 2),
                                seed=0)
        return ERM(context), DeviceData(dataset, torch.device("cpu"), False, normalisation=SYMMETRIC_NORMALISATION,
                                          **data_options)  # type: ignore[arg-type]

    def on_epoch_end() -> None:
        if stop_after is not None:
            raise Stop

    method, data = fresh()
    try:
        train(method, data, run_dir, 0, structure, Progress(quiet=True), on_epoch_end)
    except Stop:
        data.close()
        method, data = fresh()
        train(method, data, run_dir, 0, structure, Progress(quiet=True))
    finally:
        data.close()
    return [(r["train"], r["eval"]) for r in run_dir.read_metrics()]


@pytest.mark.parametrize("path", ["device", "file-workers"])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, path: str) -> None:  # type: ignore[no-untyped-def]
    write_waterbirds(tmp_path / "data", size=(40, 60))
    if path == "device":
        dataset = cached("waterbirds", tmp_path / "data", augment="true")
        options: dict[str, object] = {"frames_on_device": True}
    else:
        dataset = get_dataset("waterbirds").load(tmp_path / "data", {"image_size": 32, "augment": "true"})
        options = {"workers": 2}
    whole = erm_run(dataset, tmp_path / "whole", None, **options)
    assert len(whole) == 2
    assert erm_run(dataset, tmp_path / "resumed", 1, **options) == whole
