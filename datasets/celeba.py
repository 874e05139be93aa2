"""``celeba``: CelebA (Liu et al., ICCV 2015) as a spurious-correlation benchmark, read from its release.

Target attribute ``Blond_Hair`` with spurious attribute ``Male`` by default (GroupDRO, JTT, DFR, LfF);
any of the 40 attributes can be chosen: ``--data-option target=Smiling --attrs Male,Young`` (several
spurious attributes give one group per value combination). Attribute values -1/1 become 0/1, so
groups are ``g = 2*target + Male``: 0 not-blond female, 1 not-blond male, 2 blond female, 3 blond male.

Layouts (``--data-root`` may be the dataset folder itself or a parent of it, e.g. torchvision's
``celeba/``, group_DRO's ``celebA/data/``, WILDS' ``celebA_v1.0/``):

* original (mmlab) files: ``img_align_celeba/000001.jpg ...``, ``list_eval_partition.txt`` (no header,
  ``000001.jpg 0`` per line; 0 train, 1 val, 2 test) and ``list_attr_celeba.txt`` (line 1 the number
  of images, line 2 the 40 attribute names, then ``000001.jpg -1  1 ...`` separated by one or more
  spaces); the Google Drive tree ``Anno/``, ``Eval/``, ``Img/img_align_celeba/`` is accepted too;
* the CSV variant (Kaggle, used by group_DRO/JTT/WILDS): ``list_attr_celeba.csv`` (header ``image_id,
  5_o_Clock_Shadow, ...``), ``list_eval_partition.csv`` (header ``image_id,partition``) and
  ``img_align_celeba/`` (Kaggle's nested ``img_align_celeba/img_align_celeba/`` also works).

Both index files must list the same images; every value is checked (one-line error naming file and
line). Published counts (Blond_Hair, Male), checked by `bench data check celeba`: train
71,629/66,874/22,880/1,387, val 8,535/8,276/2,874/182, test 9,767/7,535/2,480/180. Average accuracy:
the plain mean over test examples (val/test keep the skewed distribution), average_kind ``plain``.

Transforms (kohpangwei/group_DRO:data/celebA_dataset.py ``get_transform_celebA``), image size S:

* eval, and train without augmentation: CenterCrop(178) (the shorter side of the 178x218 images)
  -> Resize((S, S));
* train with ``--data-option augment=true``: RandomResizedCrop(S, scale (0.7, 1), ratio (1, 4/3)) +
  RandomHorizontalFlip (off by default, as in group_DRO's runs; DFR's protocol turns it on).

With an image cache the whole image is stored resized to (round(S*218/178), S) = 274x224 at S=224
and evaluation takes its centre S x S crop: the same region as CenterCrop(178) -> Resize, resampled
in the other order (values differ by interpolation rounding only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from bench.core.dataset import SPLITS, SpuriousDataset, make_split
from bench.core.errors import ConfigError, DataError
from datasets import register_dataset
from datasets._files import FileDatasetSource, ImagePipeline, data_fingerprint, split_images

DEFAULT_TARGET = "Blond_Hair"
DEFAULT_ATTRS = ("Male",)
PARTITION_CODES = {"0": "train", "1": "val", "2": "test"}
ORIGINAL_SIZE = (218, 178)  # (H, W) of the aligned-and-cropped images
PUBLISHED_COUNTS = {
    "train": [71629, 66874, 22880, 1387],
    "val": [8535, 8276, 2874, 182],
    "test": [9767, 7535, 2480, 180],
}
ATTRIBUTE_FILES = ("list_attr_celeba.txt", "Anno/list_attr_celeba.txt", "list_attr_celeba.csv")
PARTITION_FILES = ("list_eval_partition.txt", "Eval/list_eval_partition.txt", "list_eval_partition.csv")
IMAGE_FOLDERS = ("img_align_celeba/img_align_celeba", "img_align_celeba", "Img/img_align_celeba")


class IndexTable:
    """A parsed index file: a string table with ``image_id`` first, and how to name its rows."""

    def __init__(self, path: Path, table: pd.DataFrame, first_line: int) -> None:
        self.path, self.table, self.first_line = path, table, first_line

    def where(self, row: int) -> str:
        return f"{self.path}, line {row + self.first_line}"


def _parser_error(path: Path, error: Exception) -> DataError:
    return DataError(f"{path}: not a readable index file ({str(error).strip().splitlines()[-1]})")


def read_attributes(path: Path) -> IndexTable:
    """``list_attr_celeba.txt`` (count line, names line, whitespace-separated rows) or ``.csv``."""
    try:
        if path.suffix == ".csv":
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
            if "image_id" not in table.columns:
                raise DataError(f"{path}: missing column 'image_id' (columns: {', '.join(table.columns[:5])}, ...)")
            return IndexTable(path, table, first_line=2)
        with open(path, encoding="utf-8") as handle:
            count_line, names_line = handle.readline().strip(), handle.readline()
        try:
            declared = int(count_line)
        except ValueError:
            raise DataError(f"{path}, line 1: expected the number of images, found {count_line[:40]!r}") from None
        names = names_line.split()
        if not names:
            raise DataError(f"{path}, line 2: expected the attribute names")
        table = pd.read_csv(path, sep=r"\s+", skiprows=2, header=None, names=["image_id", *names], dtype=str,
                            keep_default_na=False, engine="c")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise _parser_error(path, error) from None
    if len(table) != declared:
        raise DataError(f"{path}: line 1 declares {declared} images but {len(table)} rows follow")
    index = IndexTable(path, table, first_line=3)
    short = np.flatnonzero(table[names[-1]].to_numpy() == "")
    if len(short):
        raise DataError(f"{index.where(int(short[0]))}: fewer than {len(names) + 1} fields")
    return index


def read_partition(path: Path) -> IndexTable:
    """``list_eval_partition.txt`` (``000001.jpg 0``, no header) or ``.csv`` (``image_id,partition``)."""
    try:
        if path.suffix == ".csv":
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
            for column in ("image_id", "partition"):
                if column not in table.columns:
                    raise DataError(f"{path}: missing column {column!r} (columns: {', '.join(table.columns)})")
            index = IndexTable(path, table, first_line=2)
        else:
            table = pd.read_csv(path, sep=r"\s+", header=None, names=["image_id", "partition"], dtype=str,
                                keep_default_na=False, engine="c")
            index = IndexTable(path, table, first_line=1)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise _parser_error(path, error) from None
    codes = index.table["partition"].str.strip().to_numpy()
    bad = np.flatnonzero(~np.isin(codes, tuple(PARTITION_CODES)))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{index.where(i)}: partition {index.table['partition'].iloc[i]!r} is not 0, 1 or 2 "
                        "(train, val, test)")
    index.table["partition"] = codes
    return index


def _first_existing(folder: Path, candidates: tuple[str, ...], want_dir: bool = False) -> Path | None:
    for candidate in candidates:
        path = folder / candidate
        if (path.is_dir() if want_dir else path.is_file()):
            return path
    return None


def _binary(index: IndexTable, column: str) -> np.ndarray:
    """Values -1/1 of an attribute column as 0/1; DataError naming the line of any other value."""
    values = index.table[column].str.strip().to_numpy()
    bad = np.flatnonzero(~np.isin(values, ("-1", "1")))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{index.where(i)}: {column}={index.table[column].iloc[i]!r} is not -1 or 1")
    return (values == "1").astype(np.int64)


@register_dataset
class CelebA(FileDatasetSource):
    name = "celeba"
    description = "CelebA (Liu et al. 2015): Blond_Hair vs Male by default (any attribute pair), real images"
    folder_names = ("celeba", "CelebA", "celebA", "celebA/data", "celebA_v1.0", "celeba-dataset")
    marker = "list_attr_celeba.txt"
    option_names = ("augment", "target", "attrs")
    obtain_hint = ("https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (img_align_celeba, list_attr_celeba.txt, "
                   "list_eval_partition.txt), or the CSV version on Kaggle (jessicali9530/celeba-dataset)")
    training_defaults: ClassVar[dict[str, Any]] = {
        "backbone": "resnet50", "pretrained": True, "optimizer": "sgd", "lr": 1e-4, "weight_decay": 1e-4,
        "momentum": 0.9, "batch_size": 128, "epochs": 50,
    }
    defaults_origin = ("the paper's standard-regularisation protocol (Sagawa et al. 2020), as in the sample GroupDRO "
                       "command of the kohpangwei/group_DRO README without its --reweight_groups --robust flags: "
                       "ResNet-50 ImageNet-pretrained, SGD momentum 0.9, lr 1e-4, wd 1e-4, batch 128, 50 epochs, "
                       "no augmentation")
    published_origin = ("the widely cited (Blond_Hair, Male) counts of the spurious-correlation literature (not "
                        "re-computed from a real attribute file for this harness); their per-split sums are the "
                        "partition sizes 162,770/19,867/19,962")

    @classmethod
    def is_dataset_folder(cls, path: Path) -> bool:
        return _first_existing(path, ATTRIBUTE_FILES) is not None

    @classmethod
    def target_and_attrs(cls, options: dict[str, Any]) -> tuple[str, list[str]]:
        target = str(options.get("target", DEFAULT_TARGET)).strip()
        requested = options.get("attrs")
        attrs = [a.strip() for a in str(requested).split(",") if a.strip()] if requested else list(DEFAULT_ATTRS)
        if not attrs:
            raise ConfigError("--attrs: name at least one CelebA attribute, e.g. --attrs Male")
        if target in attrs:
            raise ConfigError(f"--attrs {','.join(attrs)}: the target {target} cannot also be a spurious attribute")
        if len(set(attrs)) != len(attrs):
            raise ConfigError(f"--attrs {','.join(attrs)}: an attribute is named twice")
        return target, attrs

    @classmethod
    def published_counts(cls, options: dict[str, Any]) -> dict[str, list[int]] | None:
        if cls.target_and_attrs(options) != (DEFAULT_TARGET, list(DEFAULT_ATTRS)):
            return None
        return {split: list(counts) for split, counts in PUBLISHED_COUNTS.items()}

    @classmethod
    def pipeline(cls, options: dict[str, Any]) -> ImagePipeline:
        size = cls.image_size(options)
        frame_height = int(round(size * ORIGINAL_SIZE[0] / ORIGINAL_SIZE[1]))
        return ImagePipeline(frame=(frame_height, size), crop=(size, size),
                             augment="resized_crop_flip" if cls.augment(options) else "none",
                             crop_scale=(0.7, 1.0), crop_ratio=(1.0, 4 / 3), square_crop_first=True)

    @classmethod
    def load(cls, data_root: Path | None, options: dict[str, Any]) -> SpuriousDataset:
        cls.check_options(options)
        target, attrs = cls.target_and_attrs(options)
        folder = cls.require_folder(data_root)
        attr_path = _first_existing(folder, ATTRIBUTE_FILES)
        partition_path = _first_existing(folder, PARTITION_FILES)
        image_folder = _first_existing(folder, IMAGE_FOLDERS, want_dir=True)
        if partition_path is None:
            raise DataError(f"{folder / PARTITION_FILES[0]}: not found (nor {PARTITION_FILES[-1]}); CelebA needs its "
                            f"split file, from {cls.obtain_hint}")
        if image_folder is None:
            raise DataError(f"{folder / 'img_align_celeba'}: no such folder; CelebA needs its aligned images, "
                            f"from {cls.obtain_hint}")
        assert attr_path is not None  # located by is_dataset_folder
        attributes = read_attributes(attr_path)
        names = [c for c in attributes.table.columns if c != "image_id"]
        for name in (target, *attrs):
            if name not in names:
                raise ConfigError(f"{name!r} is not a CelebA attribute of {attr_path}; "
                                  f"choose among: {', '.join(names)}")
        partition = read_partition(partition_path)
        rows_in_attributes = cls._align(attributes, partition)

        y_all = _binary(attributes, target)[rows_in_attributes]
        attrs_all = np.stack([_binary(attributes, a)[rows_in_attributes] for a in attrs], axis=1)
        image_ids = partition.table["image_id"].str.strip().to_numpy()
        partition_split = partition.table["partition"].map(PARTITION_CODES).to_numpy()
        rows = {split: np.flatnonzero(partition_split == split) for split in SPLITS}
        for split in SPLITS:
            if len(rows[split]) == 0:
                raise DataError(f"{partition_path}: no image is in the {split} partition; every split needs examples")
        image_prefix = image_folder.relative_to(folder).as_posix()
        split_relpaths = {split: [f"{image_prefix}/{image_ids[i]}" for i in rows[split]] for split in SPLITS}
        pipeline = cls.pipeline(options)
        images, extra = split_images(cls.name, folder, split_relpaths, pipeline,
                                     where=lambda split, i: partition.where(int(rows[split][i])))
        cardinalities = [2] * len(attrs)
        splits = {
            split: make_split(split, torch.tensor(y_all[rows[split]]), torch.tensor(attrs_all[rows[split]]),
                              images[split], cardinalities)
            for split in SPLITS
        }
        return SpuriousDataset(
            name=cls.name,
            class_names=[f"not {target}", target],
            attr_names=list(attrs),
            attr_value_names=[[f"not {a}", a] for a in attrs],
            splits=splits,
            average_kind="plain",
            description=f"CelebA from {folder}, target {target}, spurious {', '.join(attrs)}; {pipeline.describe()}",
            data_fingerprint=data_fingerprint(folder, [attr_path, partition_path], extra["image_files"]),
            extra={**extra, "target": target},
            synthetic=cls.synthetic_origin(folder),
        )

    @staticmethod
    def _align(attributes: IndexTable, partition: IndexTable) -> np.ndarray:
        """Row of each partition entry in the attribute table; both files must list the same images."""
        attribute_ids = pd.Index(attributes.table["image_id"].str.strip())
        partition_ids = pd.Index(partition.table["image_id"].str.strip())
        for ids, index in ((attribute_ids, attributes), (partition_ids, partition)):
            duplicated = np.flatnonzero(ids.duplicated())
            if len(duplicated):
                i = int(duplicated[0])
                raise DataError(f"{index.where(i)}: image {ids[i]} is listed twice")
        positions = attribute_ids.get_indexer(partition_ids)
        missing = np.flatnonzero(positions < 0)
        if len(missing):
            i = int(missing[0])
            raise DataError(f"{partition.where(i)}: image {partition_ids[i]} has no row in {attributes.path}")
        if len(attribute_ids) != len(partition_ids):
            extra = np.flatnonzero(partition_ids.get_indexer(attribute_ids) < 0)
            i = int(extra[0])
            raise DataError(f"{attributes.where(i)}: image {attribute_ids[i]} is not in {partition.path}")
        return positions
