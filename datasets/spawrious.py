"""``spawrious-{o2o,m2m}-{easy,medium,hard}``: the six Spawrious challenges (Lynch et al. 2023).

Read from the released folder tree (``spawrious224__entire_dataset.tar.gz``, or a challenge's own
tarball for O2O; ``--data-root`` may be ``spawrious224/`` itself or a parent of it)::

    spawrious224/{0,1,domain_adaptation_ds}/{beach,desert,dirt,jungle,mountain,snow}/
        {bulldog,corgi,dachshund,labrador}/*.png

Labels are folder names: class = breed (bulldog 0, corgi 1, dachshund 2, labrador 3) and the one
spurious attribute is the location (desert 0, jungle 1, dirt 2, mountain 3, snow 4, beach 5), the
index orders of aengusl/spawrious:spawrious/torch.py; groups are (breed, location), 24 in all, of
which each split uses some. ``domain_adaptation_ds/`` is not used by these challenges.

Splits are built as the reference code builds them (``build_combination``/``_get_combinations``,
with the folder size ``total = 3168``), listed in :data:`COMBINATIONS` (group, test and filler
locations, in the order bulldog, dachshund, labrador, corgi):

* O2O: environment k in {0, 1} reads folder ``k/``: breed i at its spurious location group[i]
  (the first int(0.97*3168) = 3072 images in env 0, int(0.87*3168) = 2756 in env 1), plus every
  breed at the filler location (96 in env 0, 412 in env 1). Test: breed i at test[i], all images of
  ``0/`` and ``1/``.
* M2M: everything from ``0/``: env 0 takes bulldog@g0, dachshund@g1, labrador@g2, corgi@g3, env 1
  bulldog@g1, dachshund@g0, labrador@g3, corgi@g2 (3168 each); test: bulldog@{t0,t1},
  dachshund@{t1,t0}, labrador@{t2,t3}, corgi@{t3,t2}, all images.

"The first N images" is taken in SORTED file-name order (the reference takes ``os.listdir`` order,
which depends on the file system), so splits are reproducible. Validation: as in the reference's
README, a random split of the training set, ``int(n * val_fraction)`` examples drawn by
``torch.utils.data.random_split`` semantics with a generator seeded by ``val_seed`` (options
``--data-option val_fraction=0.2 val_seed=0``, the defaults). The val images are evaluated without
augmentation (the reference's random subset keeps the training transform).
`bench data check` compares train+val and test with the counts of this construction.

Transforms (aengusl/spawrious:spawrious/torch.py up to July 2023, before it switched to timm
transforms of an unset model), image size S: eval Resize((S, S)); train Resize((S, S)) +
RandomHorizontalFlip + ColorJitter(0.3, 0.3, 0.3, 0.3) + RandomGrayscale (on by default as in
``get_spawrious_dataset``; ``--data-option augment=false`` turns it off). The backbone's normalisation by
the trainer. Average accuracy: plain mean over test examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from bench.core.dataset import SPLITS, SpuriousDataset, make_split
from bench.core.errors import ConfigError, DataError
from datasets import register_dataset
from datasets._files import FileDatasetSource, ImagePipeline, data_fingerprint, split_images

CLASSES = ("bulldog", "corgi", "dachshund", "labrador")
LOCATIONS = ("desert", "jungle", "dirt", "mountain", "snow", "beach")
BREED_ORDER = ("bulldog", "dachshund", "labrador", "corgi")  # order of the group/test location lists
FOLDER_TOTAL = 3168  # images per (environment, location, breed) folder the construction assumes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ENVIRONMENT_FOLDERS = ("0", "1", "domain_adaptation_ds")
# challenge: (group locations g0..g3, test locations t0..t3, filler location or None)
COMBINATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str | None]] = {
    "o2o_easy": (("desert", "jungle", "dirt", "snow"), ("dirt", "snow", "desert", "jungle"), "beach"),
    "o2o_medium": (("mountain", "beach", "dirt", "jungle"), ("jungle", "dirt", "beach", "snow"), "desert"),
    "o2o_hard": (("jungle", "mountain", "snow", "desert"), ("mountain", "snow", "desert", "jungle"), "beach"),
    "m2m_easy": (("desert", "mountain", "dirt", "jungle"), ("dirt", "jungle", "mountain", "desert"), None),
    "m2m_medium": (("beach", "snow", "mountain", "desert"), ("desert", "mountain", "beach", "snow"), None),
    "m2m_hard": (("dirt", "jungle", "snow", "beach"), ("snow", "beach", "dirt", "jungle"), None),
}
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_VAL_SEED = 0
OBTAIN_URLS = {
    "entire_dataset": "https://www.dropbox.com/s/hofkueo8qvaqlp3/spawrious224__entire_dataset.tar.gz?dl=1",
    "o2o_easy": "https://www.dropbox.com/s/kwhiv60ihxe3owy/spawrious224__o2o_easy.tar.gz?dl=1",
    "o2o_medium": "https://www.dropbox.com/s/x03gkhdwar5kht4/spawrious224__o2o_medium.tar.gz?dl=1",
    "o2o_hard": "https://www.dropbox.com/s/p1ry121m2gjj158/spawrious224__o2o_hard.tar.gz?dl=1",
}


@dataclass(frozen=True)
class FolderTake:
    """The first ``limit`` images (all when None) of ``env/location/breed`` in sorted order."""

    env: str
    location: str
    breed: str
    limit: int | None

    @property
    def relpath(self) -> str:
        return f"{self.env}/{self.location}/{self.breed}"

    @property
    def group(self) -> int:
        return CLASSES.index(self.breed) * len(LOCATIONS) + LOCATIONS.index(self.location)


def construction(challenge: str, total: int = FOLDER_TOTAL) -> tuple[list[FolderTake], list[FolderTake]]:
    """(training takes, test takes) of a challenge, in the reference's concatenation order."""
    group, test, filler = COMBINATIONS[challenge]
    one_to_one = challenge.startswith("o2o")
    counts = (int(0.97 * total), int(0.87 * total)) if one_to_one else (total, total)
    m2m_train = {"bulldog": (group[0], group[1]), "dachshund": (group[1], group[0]),
                 "labrador": (group[2], group[3]), "corgi": (group[3], group[2])}
    m2m_test = {"bulldog": (test[0], test[1]), "dachshund": (test[1], test[0]),
                "labrador": (test[2], test[3]), "corgi": (test[3], test[2])}
    train: list[FolderTake] = []
    tests: list[FolderTake] = []
    for env in (0, 1):
        folder = str(env) if one_to_one else "0"
        for i, breed in enumerate(BREED_ORDER):
            location = group[i] if one_to_one else m2m_train[breed][env]
            train.append(FolderTake(folder, location, breed, counts[env]))
        if one_to_one:
            assert filler is not None
            train += [FolderTake(folder, filler, breed, total - counts[env]) for breed in BREED_ORDER]
        for i, breed in enumerate(BREED_ORDER):
            location = test[i] if one_to_one else m2m_test[breed][env]
            tests.append(FolderTake(folder, location, breed, None))
    return train, tests


def expected_counts(challenge: str, total: int = FOLDER_TOTAL) -> dict[str, list[int]]:
    """Group counts of train+val and test when every folder holds ``total`` images."""
    n_groups = len(CLASSES) * len(LOCATIONS)
    result = {}
    for key, takes in zip(("train+val", "test"), construction(challenge, total)):
        counts = [0] * n_groups
        for take in takes:
            counts[take.group] += total if take.limit is None else min(take.limit, total)
        result[key] = counts
    return result


def list_take(root: Path, take: FolderTake, challenge_name: str) -> list[str]:
    folder = root / take.relpath
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; {challenge_name} reads it (get the data from "
                        f"{OBTAIN_URLS['entire_dataset']})")
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(IMAGE_SUFFIXES) and p.is_file())
    if not names:
        raise DataError(f"{folder}: no .png/.jpg/.jpeg image; {challenge_name} needs its images")
    chosen = names if take.limit is None else names[: take.limit]
    return [f"{take.relpath}/{name}" for name in chosen]


class SpawriousChallenge(FileDatasetSource):
    """One Spawrious challenge; subclasses set ``name`` and ``challenge``."""

    challenge: ClassVar[str]
    folder_names = ("spawrious224", "data/spawrious224", "spawrious/spawrious224")
    marker = "0/"
    option_names = ("augment", "val_fraction", "val_seed")
    augment_default = True
    obtain_hint = (f"the Spawrious release, e.g. {OBTAIN_URLS['entire_dataset']} (all challenges; the O2O ones "
                   "also have their own tarballs, see github.com/aengusl/spawrious)")
    training_defaults: ClassVar[dict[str, Any]] = {
        "backbone": "resnet50", "pretrained": True, "optimizer": "sgd", "lr": 1e-3, "weight_decay": 1e-4,
        "momentum": 0.9, "batch_size": 128, "epochs": 3,
    }
    defaults_origin = ("aengusl/spawrious example.py (ImageNet-pretrained ResNet, batch 128, lr 1e-3, momentum "
                       "0.9, 3 epochs) with ResNet-50 as in the paper; example.py's AdamW (its default decoupled "
                       "weight decay 0.01) is replaced by the harness's SGD with momentum 0.9 and wd 1e-4")
    published_origin = (f"the reference construction (aengusl/spawrious build_combination) with {FOLDER_TOTAL} "
                        "images per folder; train and val together, since val is a random part of train")

    @classmethod
    def is_dataset_folder(cls, path: Path) -> bool:
        return (path / "0").is_dir() and any((path / "0" / location).is_dir() for location in LOCATIONS)

    @classmethod
    def published_counts(cls, options: dict[str, Any]) -> dict[str, list[int]] | None:
        return expected_counts(cls.challenge)

    @classmethod
    def pipeline(cls, options: dict[str, Any]) -> ImagePipeline:
        size = cls.image_size(options)
        return ImagePipeline(frame=(size, size), crop=(size, size),
                             augment="flip_colour" if cls.augment(options) else "none")

    @classmethod
    def validation_split(cls, options: dict[str, Any]) -> tuple[float, int]:
        fraction_text = options.get("val_fraction", DEFAULT_VAL_FRACTION)
        seed_text = options.get("val_seed", DEFAULT_VAL_SEED)
        try:
            fraction, seed = float(fraction_text), int(seed_text)
        except (TypeError, ValueError):
            raise ConfigError(f"--data-option val_fraction={fraction_text} val_seed={seed_text}: expected a "
                              "fraction and an integer") from None
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"--data-option val_fraction={fraction}: must be between 0 and 1")
        return fraction, seed

    @classmethod
    def load(cls, data_root: Path | None, options: dict[str, Any]) -> SpuriousDataset:
        cls.check_options(options)
        fraction, seed = cls.validation_split(options)
        folder = cls.require_folder(data_root)
        synthetic = cls.synthetic_origin(folder)  # first: an export for another challenge lacks this one's folders
        return load_challenge(cls.name, cls.challenge, folder, cls.pipeline(options), fraction, seed,
                              synthetic=synthetic)


def validation_split_positions(n_train: int, val_fraction: float, val_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions in the listed training images: ``torch.utils.data.random_split``'s
    semantics, one permutation of which the first ``n - int(n * val_fraction)`` positions train."""
    n_val = int(n_train * val_fraction)
    permutation = torch.randperm(n_train, generator=torch.Generator().manual_seed(val_seed)).numpy()
    return permutation[: n_train - n_val], permutation[n_train - n_val :]


def load_challenge(name: str, challenge: str, folder: Path, pipeline: ImagePipeline, val_fraction: float,
                   val_seed: int, total: int = FOLDER_TOTAL, synthetic: str | None = None) -> SpuriousDataset:
    """Build a challenge from the folder tree (``total``: the folder size the construction assumes;
    ``synthetic``: the twin the folder was exported from, if it was)."""
    train_takes, test_takes = construction(challenge, total)
    listed: dict[str, tuple[list[str], list[int], list[int]]] = {}
    for key, takes in (("train", train_takes), ("test", test_takes)):
        relpaths, labels, locations = [], [], []
        for take in takes:
            files = list_take(folder, take, name)
            relpaths += files
            labels += [CLASSES.index(take.breed)] * len(files)
            locations += [LOCATIONS.index(take.location)] * len(files)
        listed[key] = (relpaths, labels, locations)

    n_train = len(listed["train"][0])
    train_positions, val_positions = validation_split_positions(n_train, val_fraction, val_seed)
    if len(val_positions) == 0 or len(train_positions) == 0:
        raise DataError(f"{folder}: {n_train} training images leave no "
                        f"{'validation' if len(val_positions) == 0 else 'training'} example with "
                        f"val_fraction={val_fraction}")
    positions = {"train": train_positions, "val": val_positions, "test": np.arange(len(listed["test"][0]))}
    split_relpaths, labels, locations = {}, {}, {}
    for split in SPLITS:
        relpaths, y, location = listed["test" if split == "test" else "train"]
        split_relpaths[split] = [relpaths[i] for i in positions[split]]
        labels[split] = torch.tensor([y[i] for i in positions[split]])
        locations[split] = torch.tensor([location[i] for i in positions[split]])
    images, extra = split_images(name, folder, split_relpaths, pipeline)
    splits = {
        split: make_split(split, labels[split], locations[split], images[split], [len(LOCATIONS)])
        for split in SPLITS
    }
    return SpuriousDataset(
        name=name,
        class_names=list(CLASSES),
        attr_names=["location"],
        attr_value_names=[list(LOCATIONS)],
        splits=splits,
        average_kind="plain",
        description=f"Spawrious {challenge} from {folder}; val = {val_fraction} of train (seed {val_seed}); "
                    f"{pipeline.describe()}",
        data_fingerprint=data_fingerprint(folder, [], extra["image_files"]),  # labels: the folder names
        extra=extra,
        synthetic=synthetic,
    )


def _register(challenge: str) -> None:
    kind, level = challenge.split("_")
    structure = "one spurious location per breed" if kind == "o2o" else "two spurious locations per breed"
    cls = type(f"Spawrious{kind.upper()}{level.capitalize()}", (SpawriousChallenge,), {
        "name": f"spawrious-{kind}-{level}",
        "challenge": challenge,
        "description": f"Spawrious {kind.upper()}-{level} (Lynch et al. 2023): dog breed vs location, {structure}",
    })
    register_dataset(cls)


for _challenge in COMBINATIONS:
    _register(_challenge)
