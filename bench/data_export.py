"""``bench data export NAME DIR``: a synthetic twin written as files in the layout of its real counterpart.

The real loader (``datasets/waterbirds.py``, ``celeba.py``, ``urbancars.py``, ``spawrious.py``) then
reads it like the real release: JPEG/PNG decoding, resizing, the dataset's augmentation, data-loading
workers and ``bench data prepare``'s image cache, all on a CPU in minutes and without downloading
anything. It is also the smoke test of the whole file pipeline on a new machine.

* ``waterbirds-synth`` -> ``waterbird_complete95_forest2water2/``: ``metadata.csv`` (group_DRO's
  columns ``img_id,img_filename,y,split,place,place_filename``) and one JPEG folder per "species",
  which for the twin is the MNIST digit drawn as the bird (``001.digit_0/``, ...).
* ``celeba-synth`` -> ``celeba/``: ``img_align_celeba/000001.jpg ...``, ``list_eval_partition.txt``
  and ``list_attr_celeba.txt`` with the twin's two attributes only (``Blond_Hair Male``: the twin has
  no values for CelebA's 38 others, and none are invented).
* ``urbancars-synth`` -> ``urbancars/``: Whac-A-Mole's generated folders
  (``bg-0.95_co_occur_obj-0.95/train/<group>/NNNN.jpg``, ``bg-0.5_co_occur_obj-0.5/{val,test}/...``;
  the masks the generator also writes are not, the loader ignores them).
* ``spawrious-synth`` -> ``spawrious224/{0,1}/<location>/<breed>/NNNNN.png`` for the challenge
  ``spawrious-o2o-easy`` (the twin is its twin): the folders hold fewer images than the limits of
  the reference construction, so every file is taken, and the files are named and spread over the
  two environments so that the loader's random validation split (``val_fraction=0.2``, ``val_seed=0``)
  is exactly the twin's val: train, val and test are the twin's, example for example.

Every twin picture (28x28) is upscaled to ``--image-size`` pixels (default 64) with PIL's bicubic
resampling and saved as JPEG (quality 95) or, for Spawrious as in its release, PNG. The folder is
written under a temporary name and renamed when complete. ``bench-export.json`` at its root (the
marker, read by the loaders) names the twin, its data version and the image size: the loaded
dataset's ``synthetic`` field is then the twin's name, runs train at the export's image size unless
``--data-option image_size`` says otherwise, and ``bench data check`` compares with the twin's own
group counts (:func:`expected_counts`), not with the real release's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.core.dataset import SPLITS, SpuriousDataset, group_ids
from bench.core.errors import BenchError, ConfigError
from datasets._files import EXPORT_MARKER

MIN_IMAGE_SIZE = 8
JPEG_QUALITY = 95
RESAMPLING = "bicubic"  # PIL's Image.Resampling.BICUBIC
SPAWRIOUS_CHALLENGE = "o2o_easy"

SaveImage = Callable[[np.ndarray, Path], None]  # (uint8 [3, H, W] picture, path) -> file


@dataclass(frozen=True)
class Export:
    """How one twin is written in its real counterpart's layout."""

    twin: str
    dataset: str  # the real dataset whose loader reads the export
    folder: str  # the dataset folder created in DIR
    image_format: str  # "JPEG" or "PNG"
    # The writer: fills the folder with the twin's images and index files; returns marker entries.
    write: Callable[[SpuriousDataset, Path, SaveImage], dict[str, Any]]
    # Index in the real dataset's class list of each twin class (attribute values are in the same order).
    class_map: tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Writers, one per layout


def _write_waterbirds(twin: SpuriousDataset, folder: Path, save: SaveImage) -> dict[str, Any]:
    from datasets._synth import mnist_digits

    _, digit_labels = mnist_digits()
    sources = twin.extra["background_sources"]
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    img_id = 0
    for code, split in enumerate(SPLITS):
        data = twin.splits[split]
        digits = digit_labels[twin.extra["source_digits"][split]]
        boxes = twin.extra["source_boxes"][split]
        for i in range(len(data)):
            img_id += 1
            digit = int(digits[i])
            relpath = f"{digit + 1:03d}.digit_{digit}/digit_{digit}_{img_id:05d}.jpg"
            save(data.images.pixels[i].numpy(), folder / relpath)
            source = sources[int(boxes[i, 0])]
            place_file = f"/{source[0]}/{source}/{int(boxes[i, 1]):04d}_{int(boxes[i, 2]):04d}.jpg"
            lines.append(f"{img_id},{relpath},{int(data.y[i])},{code},{int(data.attrs[i, 0])},{place_file}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return {}


def _write_celeba(twin: SpuriousDataset, folder: Path, save: SaveImage) -> dict[str, Any]:
    attributes, partition = [], []
    number = 0
    for code, split in enumerate(SPLITS):
        data = twin.splits[split]
        for i in range(len(data)):
            number += 1
            name = f"{number:06d}.jpg"
            save(data.images.pixels[i].numpy(), folder / "img_align_celeba" / name)
            blond, male = (1 if int(v) else -1 for v in (data.y[i], data.attrs[i, 0]))
            attributes.append(f"{name} {blond:>2} {male:>2}")
            partition.append(f"{name} {code}")
    (folder / "list_attr_celeba.txt").write_text("\n".join([str(number), "Blond_Hair Male ", *attributes]) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    return {"attributes": ["Blond_Hair", "Male"]}


def _write_urbancars(twin: SpuriousDataset, folder: Path, save: SaveImage) -> dict[str, Any]:
    from datasets.urbancars import SPLIT_FOLDERS, group_folder

    for split in SPLITS:
        data = twin.splits[split]
        written: dict[tuple[int, int, int], int] = {}
        for i in range(len(data)):
            key = (int(data.y[i]), int(data.attrs[i, 0]), int(data.attrs[i, 1]))
            k = written.get(key, 0)
            written[key] = k + 1
            save(data.images.pixels[i].numpy(), folder / SPLIT_FOLDERS[split] / group_folder(*key) / f"{k:04d}.jpg")
    return {}


def _write_spawrious(twin: SpuriousDataset, folder: Path, save: SaveImage) -> dict[str, Any]:
    from datasets.spawrious import construction

    twin_classes = twin.class_names
    locations = twin.attr_value_names[0]
    members = {split: _members_by_group(twin, split) for split in SPLITS}
    train_takes, test_takes = construction(SPAWRIOUS_CHALLENGE)

    def key(take: Any) -> tuple[int, int]:
        return twin_classes.index(take.breed), locations.index(take.location)

    # Train and val: both takes of a group (environment 0 and 1) read all of their files; their sizes
    # and file order put the twin's val examples exactly where the loader's random split takes val.
    env0 = [take for take in train_takes if take.env == "0"]
    env1 = [take for take in train_takes if take.env == "1"]
    sizes = [len(members["train"][key(t)]) + len(members["val"][key(t)]) for t in env0]
    val_sizes = [len(members["val"][key(t)]) for t in env0]
    limits = [(t0.limit, t1.limit) for t0, t1 in zip(env0, env1)]
    is_val = _loader_val_mask(sum(sizes))
    first = _spread_over_environments(sizes, val_sizes, limits, is_val)
    position = 0
    for takes, counts in ((env0, first), (env1, [s - a for s, a in zip(sizes, first)])):
        for take, count in zip(takes, counts):
            for k in range(count):
                split = "val" if is_val[position] else "train"
                index = members[split][key(take)].pop(0)
                save(twin.splits[split].images.pixels[index].numpy(), folder / take.relpath / f"{k:05d}.png")
                position += 1
    # Test: every file of both environments' folders is read; half of each group in each.
    for take in test_takes:
        remaining = members["test"][key(take)]
        count = (len(remaining) + 1) // 2 if take.env == "0" else len(remaining)
        for k in range(count):
            index = remaining.pop(0)
            save(twin.splits["test"].images.pixels[index].numpy(), folder / take.relpath / f"{k:05d}.png")
    return {"challenge": SPAWRIOUS_CHALLENGE, "val_split": "the twin's val (with val_fraction=0.2, val_seed=0)"}


def _members_by_group(twin: SpuriousDataset, split: str) -> dict[tuple[int, int], list[int]]:
    data = twin.splits[split]
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(len(data)):
        groups.setdefault((int(data.y[i]), int(data.attrs[i, 0])), []).append(i)
    return groups


def _loader_val_mask(n_train: int) -> np.ndarray:
    from datasets.spawrious import DEFAULT_VAL_FRACTION, DEFAULT_VAL_SEED, validation_split_positions

    _, val_positions = validation_split_positions(n_train, DEFAULT_VAL_FRACTION, DEFAULT_VAL_SEED)
    mask = np.zeros(n_train, dtype=bool)
    mask[val_positions] = True
    return mask


def _spread_over_environments(sizes: list[int], val_sizes: list[int], limits: list[tuple[int | None, int | None]],
                              is_val: np.ndarray) -> list[int]:
    """How many images of each group go to environment 0 (the rest to 1), such that the loader's val
    positions in the group's two blocks number exactly the group's val examples.

    The loader lists environment 0's blocks (one per group, in order), then environment 1's; block
    sizes fix which positions fall in which block. A depth-first search, nearest to an even spread
    first, over the first groups; the last group's count follows from the total, and its val count
    from all the others'.
    """
    n, n_groups = len(is_val), len(sizes)
    counted = np.concatenate([[0], np.cumsum(is_val)])

    def allowed(g: int) -> np.ndarray:
        low, high = 1, sizes[g] - 1
        if limits[g][0] is not None:
            high = min(high, int(limits[g][0]))
        if limits[g][1] is not None:
            low = max(low, sizes[g] - int(limits[g][1]))
        return np.arange(low, high + 1)

    def search(total: int, g: int, start0: int, start1: int, chosen: list[int]) -> list[int] | None:
        if g == n_groups - 1:
            last = total - start0
            fits = last in allowed(g) and start1 + sizes[g] - last == n
            if fits and counted[total] - counted[start0] + counted[n] - counted[start1] == val_sizes[g]:
                return [*chosen, last]
            return None
        first = allowed(g)
        stop0, stop1 = start0 + first, start1 + sizes[g] - first
        inside = (stop0 <= total - (n_groups - 1 - g)) & (stop1 <= n)
        first, stop0, stop1 = first[inside], stop0[inside], stop1[inside]
        val = counted[stop0] - counted[start0] + counted[stop1] - counted[start1]
        hits = first[val == val_sizes[g]]
        # A few alternatives per level, nearest to an even spread first: fast, and finds one in practice.
        for a in sorted(hits.tolist(), key=lambda a: abs(2 * a - sizes[g]))[:4]:
            found = search(total, g + 1, start0 + a, start1 + sizes[g] - a, [*chosen, a])
            if found is not None:
                return found
        return None

    for total in sorted(range(n_groups, n - n_groups + 1), key=lambda t: abs(2 * t - n)):
        found = search(total, 0, 0, total, [])
        if found is not None:
            return found
    raise BenchError("bench data export: found no way to spread the twin over the Spawrious environments that "
                     "reproduces its val split; this is a bug, please report it")


EXPORTS: dict[str, Export] = {
    export.twin: export
    for export in (
        Export("waterbirds-synth", "waterbirds", "waterbird_complete95_forest2water2", "JPEG", _write_waterbirds,
               (0, 1)),
        Export("celeba-synth", "celeba", "celeba", "JPEG", _write_celeba, (0, 1)),
        Export("urbancars-synth", "urbancars", "urbancars", "JPEG", _write_urbancars, (0, 1)),
        # twin classes bulldog, dachshund, labrador, corgi; the release's bulldog, corgi, dachshund, labrador
        Export("spawrious-synth", f"spawrious-{SPAWRIOUS_CHALLENGE.replace('_', '-')}", "spawrious224", "PNG",
               _write_spawrious, (0, 2, 3, 1)),
    )
}


# --------------------------------------------------------------------------------------------
# Writing


def image_saver(size: int, image_format: str) -> SaveImage:
    """Upscale a uint8 ``[3, 28, 28]`` picture to ``size`` pixels (bicubic) and save it."""
    from PIL import Image

    def save(pixels: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        if image_format == "JPEG":
            image.save(path, format="JPEG", quality=JPEG_QUALITY)
        else:
            image.save(path, format="PNG")

    return save


def get_export(twin: str) -> Export:
    if twin not in EXPORTS:
        raise ConfigError(f"bench data export: {twin!r} is not a synthetic twin with a real layout; choose one of "
                          f"{', '.join(EXPORTS)}")
    return EXPORTS[twin]


def export_twin(twin: str, out_dir: Path, image_size: int, data_seed: int = 0, force: bool = False
                ) -> tuple[Path, dict[str, Any]]:
    """Write ``twin`` under ``out_dir`` in its real layout; returns the dataset folder and its marker."""
    from datasets import get_dataset, load_dataset

    export = get_export(twin)
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"--image-size {image_size}: must be at least {MIN_IMAGE_SIZE} pixels")
    target = out_dir / export.folder
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists; remove it, choose another folder, or pass --force to replace it")
    twin_data = load_dataset(twin, options={"data_seed": data_seed})
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create {out_dir} ({error.strerror})") from None
    partial = out_dir / f".{export.folder}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    marker = {
        "twin": twin,
        "dataset": export.dataset,
        "data_version": get_dataset(twin).data_version(),
        "data_seed": data_seed,
        "image_size": image_size,
        "resampling": f"{RESAMPLING} (PIL), from {twin_data.image_shape[1]} px",
        "image_format": f"JPEG quality {JPEG_QUALITY}" if export.image_format == "JPEG" else "PNG",
        "n_images": sum(len(split) for split in twin_data.splits.values()),
        "written_by": f"bench data export (debias-bench {_version()})",
        "created": time.time(),
    }
    try:
        partial.mkdir()
        marker.update(export.write(twin_data, partial, image_saver(image_size, export.image_format)))
        (partial / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
    except OSError as error:
        raise ConfigError(f"cannot write {partial} ({error.strerror or error}); nothing was exported") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target, marker


def _version() -> str:
    try:
        return metadata.version("debias-bench")
    except metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# What `bench data check` compares an export with


def expected_counts(marker: dict[str, Any], dataset: SpuriousDataset, options: dict[str, Any]) -> dict[str, list[int]]:
    """The twin's own group counts, in the real loader's group order, for the splits the loader builds.

    Spawrious builds val as a random part of train: with other ``val_fraction``/``val_seed`` options
    than the defaults the export was written for, only train+val and test are the twin's.
    """
    from datasets import load_dataset

    export = get_export(marker["twin"])
    twin = load_dataset(export.twin, options={"data_seed": int(marker.get("data_seed", 0))})
    class_map = torch.tensor(export.class_map)
    counts = {}
    for split in SPLITS:
        data = twin.splits[split]
        groups = group_ids(class_map[data.y], data.attrs, dataset.attr_cardinalities)
        counts[split] = torch.bincount(groups, minlength=dataset.n_groups).tolist()
    if export.dataset.startswith("spawrious"):
        from datasets.spawrious import DEFAULT_VAL_FRACTION, DEFAULT_VAL_SEED

        if (float(options.get("val_fraction", DEFAULT_VAL_FRACTION)) != DEFAULT_VAL_FRACTION
                or int(options.get("val_seed", DEFAULT_VAL_SEED)) != DEFAULT_VAL_SEED):
            joined = [a + b for a, b in zip(counts.pop("train"), counts.pop("val"))]
            counts = {"train+val": joined, "test": counts["test"]}
    return counts
