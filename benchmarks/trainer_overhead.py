"""Trainer overhead: the shared trainer's epoch vs a bare PyTorch loop doing the same math on the same data.

Both sides train ERM (SmallCNN, Adam, batch 128) for one epoch on waterbirds-synth's training split,
in the same shuffled order, then evaluate val and test and count correct predictions per group.
The trainer side also writes its metrics line and its checkpoint, as it does in every real run.
Runs alternate (bare, trainer, bare, trainer, ...) so that machine noise hits both alike; the
ratio of the medians is printed.

    python benchmarks/trainer_overhead.py [--repeats 5] [--dataset waterbirds-synth]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.core.backbones import SYMMETRIC_NORMALISATION, build_backbone
from bench.core.device_data import EVAL_BATCH_SIZE, DeviceData
from bench.core.metrics import GroupStructure
from bench.core.records import RunDir
from bench.trainer import Progress, _epoch_generator, train
from datasets import get_dataset, load_dataset
from methods import get_method
from methods.base import MethodContext, resolve_hparams


def bare_epoch(dataset, hparams: dict, seed: int) -> float:
    """One epoch + evaluation written as a plain PyTorch loop."""
    torch.manual_seed(seed)
    model = build_backbone("small-cnn", dataset.n_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=hparams["lr"], weight_decay=hparams["weight_decay"])
    mean = torch.tensor(SYMMETRIC_NORMALISATION.mean).view(1, -1, 1, 1)  # small-cnn's (DeviceData's below)
    std = torch.tensor(SYMMETRIC_NORMALISATION.std).view(1, -1, 1, 1)
    train_split = dataset.splits["train"]
    started = time.perf_counter()
    order = torch.randperm(len(train_split), generator=_epoch_generator(seed, 0, 0))
    for start in range(0, len(order), hparams["batch_size"]):
        index = order[start : start + hparams["batch_size"]]
        x = (train_split.images.pixels[index].float() / 255 - mean) / std
        loss = F.cross_entropy(model(x), train_split.y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
    model.eval()
    with torch.no_grad():
        for name in ("val", "test"):
            split = dataset.splits[name]
            predictions = torch.cat([
                model((split.images.pixels[i : i + EVAL_BATCH_SIZE].float() / 255 - mean) / std).argmax(1)
                for i in range(0, len(split), EVAL_BATCH_SIZE)
            ])
            correct = (predictions == split.y).long()
            torch.bincount(split.group, weights=correct, minlength=dataset.n_groups)
            torch.bincount(split.group, minlength=dataset.n_groups)
    return time.perf_counter() - started


def trainer_epoch(dataset, dataset_name: str, hparams: dict, seed: int) -> float:
    """One epoch through bench.trainer.train (records and checkpoint included)."""
    torch.manual_seed(seed)
    info = dataset.info()
    context = MethodContext(hparams={**hparams, "epochs": 1}, dataset_info=info, device=torch.device("cpu"),
                            make_model=lambda: build_backbone("small-cnn", dataset.n_classes), seed=seed)
    method = get_method("erm")(context)
    data = DeviceData(dataset, torch.device("cpu"), train_groups_allowed=False, normalisation=SYMMETRIC_NORMALISATION)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = RunDir(Path(tmp))
        started = time.perf_counter()
        train(method, data, run_dir, seed, GroupStructure.from_info(info), Progress(quiet=True))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="waterbirds-synth")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dataset = load_dataset(args.dataset)
    hparams = resolve_hparams(get_method("erm"), args.dataset, get_dataset(args.dataset).training_defaults,
                              {"optimizer": "adam"})
    bare_epoch(dataset, hparams, 0)  # warm-up (allocator, kernels)
    bare, trainer = [], []
    for repeat in range(args.repeats):
        bare.append(bare_epoch(dataset, hparams, repeat))
        trainer.append(trainer_epoch(dataset, args.dataset, hparams, repeat))
    print(f"{args.dataset}: {len(dataset.splits['train'])} training images, batch {hparams['batch_size']}, "
          f"{torch.get_num_threads()} threads, {args.repeats} alternating repeats")
    print(f"bare PyTorch loop: median {statistics.median(bare):.3f} s/epoch  {[round(t, 3) for t in bare]}")
    print(f"bench trainer:     median {statistics.median(trainer):.3f} s/epoch  {[round(t, 3) for t in trainer]}")
    print(f"ratio trainer / bare: {statistics.median(trainer) / statistics.median(bare):.3f}x")


if __name__ == "__main__":
    main()
