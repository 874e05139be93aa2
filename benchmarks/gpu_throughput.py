"""Images per second of a training epoch on a file-backed twin, four ways side by side, in each precision.

    python benchmarks/gpu_throughput.py [--n 4096] [--backbone resnet50] [--batch 128] [--epochs 2]
                                        [--workers 8] [--precisions fp32,bf16] [--device cuda]
    python benchmarks/gpu_throughput.py --tiny      # CI size, on the CPU: the script itself is tested

The twin: ``--n`` training images of ``waterbirds-synth`` (and 64 of val and test each) written as JPEGs
in the Waterbirds layout at the frame the Waterbirds pipeline resizes to before its crop (256 px for the
backbone's 224 px input), with a little noise so that JPEG decoding costs about what it costs on a
photo (the twins' images are smooth). Every path trains ERM's step (forward, cross-entropy, backward,
SGD) on the same backbone, batch and precision, in the device's memory format (channels-last on CUDA):

(a) limit: a bare loop over the training images already on the device (centre crops, normalised once):
    no data path and no per-step synchronisation; what the device can do.
(b) harness, cache: ``bench run --method erm`` after the image cache is built (``bench data prepare``),
    with the Waterbirds training augmentation (random resized crop + flip); on CUDA the frames are
    cropped and flipped on the device (bench.core.device_data).
(c) harness, files: the same run without the cache: JPEG decoding and augmentation in ``--workers``
    processes (a persistent pool, pinned memory on CUDA).
(d) peers' loader: what the reference code bases use, a torchvision ``ImageFolder``-style dataset (PIL
    decode, RandomResizedCrop, flip, ToTensor, Normalize) in a ``DataLoader`` with ``--workers``,
    shuffled, pinned, feeding the loop of (a).

Reported: images/s of the last epoch (the first warms up cuDNN's autotuner, the page cache and the
workers). For the harness, the epoch's ``train_seconds`` from its metrics (evaluation excluded).
Targets on a GPU: (b) at least 0.9x (a) in the same precision, bf16 at least 2x fp32 for ResNet-50.
The twin is written here (``write_twin``) rather than by ``bench data export``, whose images are the twins'
smooth ones (cheap to decode) upscaled to its ``--image-size``. Every path normalises with the backbone's
normalisation (``Backbone.input``), as the harness does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import datasets
from bench.cli import main as bench
from bench.core.backbones import build_backbone, get_backbone, memory_format
from bench.core.precision import Precision
from datasets import get_dataset, load_dataset
from datasets._files import CACHE_ENV, build_cache

PATHS = {"a": "limit: bare loop, tensors on the device", "b": "harness, image cache", "c": "harness, JPEG files",
         "d": "peers' PIL loader"}
EVAL_IMAGES = 64
LR = 1e-3


# --------------------------------------------------------------------------------------------
# The file-backed twin


def write_twin(folder: Path, n_train: int, image_size: int, noise: int, seed: int = 0) -> None:
    """``n_train`` training images of waterbirds-synth (and EVAL_IMAGES of val and test) as JPEGs in the
    Waterbirds layout, resized to the Waterbirds frame for ``image_size``, plus ``metadata.csv``."""
    from PIL import Image

    twin = load_dataset("waterbirds-synth")
    frame = int(image_size * 256 / 224)  # the Waterbirds pipeline's frame for this input size
    rng = np.random.default_rng(seed)
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for code, (split, count) in enumerate((("train", n_train), ("val", EVAL_IMAGES), ("test", EVAL_IMAGES))):
        part = twin.splits[split]
        if count > len(part):
            raise SystemExit(f"--n {n_train}: waterbirds-synth has only {len(part)} {split} images")
        pixels = F.interpolate(part.images.pixels[:count].float(), size=(frame, frame), mode="bilinear",
                               antialias=True, align_corners=False)
        pixels = pixels + torch.from_numpy(rng.integers(-noise, noise + 1, size=pixels.shape)).float()
        pictures = pixels.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i in range(count):
            relpath = f"{split}/{i % 20:03d}.Class_{i % 20}/image_{i:05d}.jpg"
            (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pictures[i]).save(folder / relpath, quality=90)
            y, place = int(part.y[i]), int(part.attrs[i, 0])
            lines.append(f"{len(lines)},{relpath},{y},{code},{place},/x/{len(lines)}.jpg")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# The four paths; each returns images/s of its last epoch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_and_step(backbone: str, device: torch.device, precision: Precision
                    ) -> tuple[torch.nn.Module, Callable[[torch.Tensor, torch.Tensor], None]]:
    torch.manual_seed(0)
    model = build_backbone(backbone, 2).to(device, memory_format=memory_format(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(precision.forward(model, x), y)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)

    return model, step


def limit(folder: Path, args: argparse.Namespace, precision: str) -> float:
    """(a): the training images' centre crops, normalised, in the device's memory format, on the device."""
    device = torch.device(args.device)
    dataset = get_dataset("waterbirds").load(folder, {"image_size": args.image_size})
    source = dataset.splits["train"].images
    pixels = source.load_batch(list(range(len(source))), train=False)  # from the cache: uint8
    normalisation = get_backbone(args.backbone).input.normalisation
    mean = torch.tensor(normalisation.mean).view(1, 3, 1, 1)
    std = torch.tensor(normalisation.std).view(1, 3, 1, 1)
    images = ((pixels.float() / 255 - mean) / std).to(device).contiguous(memory_format=memory_format(device))
    labels = dataset.splits["train"].y.to(device)
    _, step = _model_and_step(args.backbone, device, Precision(precision, device))
    n = len(images)
    for _ in range(args.epochs):
        _synchronize(device)
        started = time.perf_counter()
        for batch in torch.randperm(n, device=device).split(args.batch):
            step(images[batch], labels[batch])
        _synchronize(device)
        seconds = time.perf_counter() - started
    return n / seconds


def peers(folder: Path, args: argparse.Namespace, precision: str) -> float:
    """(d): a PIL + torchvision transforms dataset in a shuffled, pinned DataLoader, as the reference code bases."""
    from PIL import Image
    from torchvision import transforms as T

    device = torch.device(args.device)
    rows = [line.split(",") for line in (folder / "metadata.csv").read_text().splitlines()[1:]]
    files = [(folder / row[1], int(row[2])) for row in rows if row[3] == "0"]
    normalisation = get_backbone(args.backbone).input.normalisation
    transform = T.Compose([T.RandomResizedCrop(args.image_size, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3)),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(normalisation.mean, normalisation.std)])

    class ImageFiles(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            path, label = files[i]
            with Image.open(path) as image:
                return transform(image.convert("RGB")), label

    loader = torch.utils.data.DataLoader(ImageFiles(), batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    _, step = _model_and_step(args.backbone, device, Precision(precision, device))
    for _ in range(args.epochs):
        _synchronize(device)
        started = time.perf_counter()
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format(device))
            step(x, y.to(device, non_blocking=True))
        _synchronize(device)
        seconds = time.perf_counter() - started
    return len(files) / seconds


def harness(folder: Path, args: argparse.Namespace, precision: str, out: Path) -> float:
    """(b) and (c): ``bench run --method erm`` on the twin; images/s from the last epoch's train_seconds."""
    datasets._LOADED.clear()  # the memoised dataset would keep the cache (or its absence) of an earlier run
    arguments = ["run", "--method", "erm", "--dataset", "waterbirds", "--data-root", str(folder), "--data-option",
                 "augment=true", "--backbone", args.backbone, "--hparams", "pretrained=false",
                 f"batch_size={args.batch}", f"lr={LR}", "--epochs", str(args.epochs), "--precision", precision,
                 "--workers", str(args.workers), "--device", args.device, "--out", str(out), "--quiet"]
    with contextlib.redirect_stdout(io.StringIO()):  # its table of accuracies
        status = bench(arguments)
    if status != 0:
        raise SystemExit(f"bench run failed: {' '.join(arguments)}")
    (metrics,) = out.glob("waterbirds/erm/*/seed0/metrics.jsonl")
    last = json.loads(metrics.read_text().splitlines()[-1])
    config = json.loads((metrics.parent / "config.json").read_text())
    return sum(config["dataset_info"]["group_counts"]["train"]) / last["train_seconds"]


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="training images of the twin (default 4096)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per path; the last one is timed")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--noise", type=int, default=12, help="uniform noise (+-) added to the JPEGs' pixels")
    parser.add_argument("--workdir", help="where to write the twin and the runs (default: a temporary folder)")
    parser.add_argument("--tiny", action="store_true",
                        help="CI size: 32 images, small-cnn at 32 px, batch 16, 1 worker")
    args = parser.parse_args(argv)
    if args.tiny:
        args.n, args.backbone, args.batch, args.workers = 32, "small-cnn", 16, 1
    args.image_size = get_backbone(args.backbone).input.size
    precisions = args.precisions.split(",")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        folder = work / "waterbird_complete95_forest2water2"
        os.environ[CACHE_ENV] = str(work / "cache")
        started = time.perf_counter()
        write_twin(folder, args.n, args.image_size, args.noise)
        print(f"wrote {args.n} + {2 * EVAL_IMAGES} JPEGs in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        speeds: dict[tuple[str, str], float] = {}
        for precision in precisions:  # before the cache exists: JPEG files
            speeds[("c", precision)] = harness(folder, args, precision, work / f"files-{precision}")
            speeds[("d", precision)] = peers(folder, args, precision)
        dataset = get_dataset("waterbirds").load(folder, {"image_size": args.image_size})
        build_cache("waterbirds", dataset.extra["image_files"], dataset.extra["pipeline"], workers=args.workers)
        for precision in precisions:
            speeds[("a", precision)] = limit(folder, args, precision)
            speeds[("b", precision)] = harness(folder, args, precision, work / f"cache-{precision}")
    print(table(speeds, precisions, args))
    return 0


def table(speeds: dict[tuple[str, str], float], precisions: list[str], args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = [f"{args.backbone} at {args.image_size} px, batch {args.batch}, {args.n} training images, "
             f"{args.workers} workers; images/s of epoch {args.epochs}",
             f"{name}, torch {torch.__version__}, {os.cpu_count()} CPUs", ""]
    header = ["path"] + precisions + [f"{p} / (a)" for p in precisions]
    if len(precisions) > 1:
        header.append(f"{precisions[1]} / {precisions[0]}")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label in PATHS.items():
        row = [f"({key}) {label}"] + [f"{speeds[(key, p)]:.0f}" for p in precisions]
        row += [f"{speeds[(key, p)] / speeds[('a', p)]:.2f}x" for p in precisions]
        if len(precisions) > 1:
            row.append(f"{speeds[(key, precisions[1])] / speeds[(key, precisions[0])]:.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
