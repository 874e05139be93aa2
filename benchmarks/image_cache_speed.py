"""Images per second of a training epoch read from the image cache vs from JPEG files, side by side.

Generates ``--n`` 256x256 JPEGs in the Waterbirds layout (``metadata.csv`` + class folders, all in
the train split but for a few val/test rows), then reads the train split once per configuration
exactly as the trainer does (``DeviceData.iter_images``: load, augment, normalise, batch of 128):

* files: the dataset loaded without a cache (PIL decode + torchvision transforms per image);
* cache: the same dataset after ``bench data prepare`` (uint8 frames from the memmap).

for evaluation transforms and for the Waterbirds train augmentation (random resized crop + flip).
Run: ``OMP_NUM_THREADS=1 python benchmarks/image_cache_speed.py [--n 1500] [--repeats 2]``.
Prints the images per second of each and the ratio; the result is recorded in docs/datasets.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.core.backbones import IMAGENET_NORMALISATION
from bench.core.device_data import DeviceData
from datasets import get_dataset
from datasets._files import build_cache

BATCH = 128


def write_waterbirds_layout(folder: Path, n: int, size: int = 256, seed: int = 0) -> None:
    """``n`` JPEGs of ``size`` x ``size`` (smooth random colour fields with noise, about the entropy of
    a photo) in 20 class folders, with a metadata.csv; 10 val and 10 test rows, the rest train."""
    rng = np.random.default_rng(seed)
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for i in range(n):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        picture = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
        picture = np.clip(picture + rng.integers(-12, 13, size=picture.shape), 0, 255).astype(np.uint8)
        relpath = f"{i % 20:03d}.Class_{i % 20}/image_{i:05d}.jpg"
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(folder / relpath, quality=90)
        split = 1 if i < 10 else 2 if i < 20 else 0
        lines.append(f"{i + 1},{relpath},{i % 2},{split},{(i // 2) % 2},/x/{i}.jpg")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")


def images_per_second(folder: Path, augment: bool, repeats: int) -> tuple[dict[str, float], bool]:
    """Best-of-``repeats`` images/s of one pass over the train split in shuffled order, two ways:
    ``read``: the batches the data pipeline hands over (``load_batch``: float in [0, 1] from files,
    uint8 from the cache), which is all the CPU does per batch when the model is on a GPU;
    ``trainer_cpu``: ``DeviceData.iter_images`` on the CPU device, which adds the float32
    normalisation of every batch (done on the GPU in a GPU run)."""
    dataset = get_dataset("waterbirds").load(folder, {"image_size": 224, "augment": str(augment)})
    source = dataset.splits["train"].images
    data = DeviceData(dataset, torch.device("cpu"), train_groups_allowed=False, normalisation=IMAGENET_NORMALISATION)
    n = data.n("train")
    best = {"read": 0.0, "trainer_cpu": 0.0}
    for repeat in range(repeats):
        torch.manual_seed(repeat)
        order = torch.randperm(n)
        started = time.perf_counter()
        for start in range(0, n, BATCH):
            batch = source.load_batch(order[start : start + BATCH].tolist(), train=True)
            assert batch.shape[1:] == (3, 224, 224)
        best["read"] = max(best["read"], n / (time.perf_counter() - started))
        started = time.perf_counter()
        for _chunk, images in data.iter_images("train", order, BATCH, train=True):
            assert images.dtype == torch.float32 and images.shape[1:] == (3, 224, 224)
        best["trainer_cpu"] = max(best["trainer_cpu"], n / (time.perf_counter() - started))
    return best, dataset.extra["image_cache"] is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1500, help="number of generated JPEGs")
    parser.add_argument("--repeats", type=int, default=2, help="passes per configuration (best is kept)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "waterbird_complete95_forest2water2"
        os.environ["BENCH_IMAGE_CACHE_DIR"] = str(Path(tmp) / "cache")
        started = time.perf_counter()
        write_waterbirds_layout(folder, args.n)
        print(f"generated {args.n} 256x256 JPEGs in {time.perf_counter() - started:.1f} s")
        results: dict[tuple[str, bool], dict[str, float]] = {}
        for augment in (False, True):
            results[("files", augment)], cached = images_per_second(folder, augment, args.repeats)
            assert not cached
        dataset = get_dataset("waterbirds").load(folder, {"image_size": 224})
        started = time.perf_counter()
        path = build_cache("waterbirds", dataset.extra["image_files"], dataset.extra["pipeline"])
        prepare_seconds = time.perf_counter() - started
        for augment in (False, True):
            results[("cache", augment)], cached = images_per_second(folder, augment, args.repeats)
            assert cached
    print(f"bench data prepare: {args.n} images in {prepare_seconds:.1f} s ({args.n / prepare_seconds:.0f} images/s), "
          f"{path.name}")
    print(f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    print("| train transform | measured | files (images/s) | cache (images/s) | cache / files |")
    print("|---|---|---|---|---|")
    for augment, label in ((False, "Waterbirds default (resize 256, centre crop 224)"),
                           (True, "augment=true (random resized crop 224 + flip)")):
        for kind, what in (("read", "batches read (load_batch)"),
                           ("trainer_cpu", "DeviceData batches, normalised on the CPU")):
            files, cache = results[("files", augment)][kind], results[("cache", augment)][kind]
            print(f"| {label} | {what} | {files:.0f} | {cache:.0f} | {cache / files:.1f}x |")

if __name__ == "__main__":
    main()
