"""``custom``: bring your own dataset as ``DIR/metadata.csv`` plus image files.

Columns: ``filename`` (path relative to DIR), ``y`` (integer class 0..K-1), ``split``
(``train``/``val``/``test``) and one or more spurious attribute columns: every other column by
default, or those named by ``--attrs a,b``. Attribute values may be numbers or strings; each
attribute's values are sorted to give value ids, in one total order that depends on nothing but the
values (numbers first, by value, then by their text when equal, as ``1`` and ``01``; then any other
text, ``nan`` included, in code-point order), so the group names are the same in every process.
Groups are (y, attributes) as everywhere.

Everything is validated on load, with a one-line error naming the file and row: a missing folder,
file or column, a file without rows, a non-integer or negative label, a class with no training
example, an unknown split value, a missing image file or one outside DIR (an absolute path, ``../``,
a symbolic link out of it: ``datasets/_files.py``), and a group that has examples in some split but
none in another. An image file listed in two splits is warned about (leakage). The image files
themselves are decoded when training reads them; one that cannot be read stops the run with a
one-line error and marks it failed.

Options (``--data-option key=value``): ``image_size`` (default: the backbone's input size, set by
the runner), ``average`` (the reported average kind, default ``plain``), ``n_classes`` (declare K
so that a label >= K is reported as out of range).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch

from bench.core.dataset import (
    AVERAGE_KINDS,
    SPLITS,
    FileImages,
    SpuriousDataset,
    make_split,
)
from bench.core.errors import DataError
from datasets import DatasetSource, register_dataset
from datasets._files import data_fingerprint, image_size_option, int_option, stat_split_files

REQUIRED_COLUMNS = ("filename", "y", "split")


def image_transforms(size: int) -> tuple[Any, Any]:
    """(train, eval) transforms: resize to ``size`` x ``size``, to a [0, 1] tensor."""
    from torchvision import transforms

    plain = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    return plain, plain


@register_dataset
class CustomDataset(DatasetSource):
    name = "custom"
    description = "your own images: DIR/metadata.csv with filename, y, split and attribute columns"
    needs_data_root = True
    accepts_image_size = True
    option_names = ("attrs", "average", "n_classes")
    obtain_hint = "DIR/metadata.csv with columns filename, y, split and one or more attribute columns"
    training_defaults: ClassVar[dict[str, Any]] = {"backbone": "resnet50", "pretrained": True, "optimizer": "sgd",
                                                   "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 64, "epochs": 20}
    defaults_origin = "the common ERM protocol of the Waterbirds/CelebA papers (ResNet-50, SGD, lr 1e-3)"

    @classmethod
    def locate(cls, data_root: Path | None) -> Path | None:
        if data_root is not None and (data_root / "metadata.csv").is_file():
            return data_root
        return None

    @classmethod
    def load(cls, data_root: Path | None, options: dict[str, Any]) -> SpuriousDataset:
        assert data_root is not None
        cls.check_options(options)
        if not data_root.is_dir():
            raise DataError(f"--data-root {data_root}: no such folder")
        csv_path = data_root / "metadata.csv"
        if not csv_path.is_file():
            raise DataError(f"{csv_path}: not found; a custom dataset needs DIR/metadata.csv ({cls.obtain_hint})")
        try:
            table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
            raise DataError(f"{csv_path}: not a readable CSV file ({str(error).splitlines()[0]})") from None
        for column in REQUIRED_COLUMNS:
            if column not in table.columns:
                raise DataError(f"{csv_path}: missing column {column!r} (columns: {', '.join(table.columns)})")
        if table.empty:
            raise DataError(f"{csv_path}: no rows below the header; add one row per image ({cls.obtain_hint})")
        attr_names = cls._attribute_columns(csv_path, table, options.get("attrs"))
        average = options.get("average", "plain")
        if average not in AVERAGE_KINDS:
            raise DataError(f"--data-option average={average}: choose one of {', '.join(AVERAGE_KINDS)}")

        def row(i: int) -> str:
            return f"{csv_path}, row {i + 2}"  # +1 for the header, +1 for 1-based numbering

        labels = []
        for i, value in enumerate(table["y"]):
            try:
                label = int(value)
            except ValueError:
                raise DataError(f"{row(i)}: y={value!r} is not an integer class label") from None
            if label < 0:
                raise DataError(f"{row(i)}: y={label} is out of range; labels must be 0..K-1")
            labels.append(label)
        n_classes = int_option(options, "n_classes", max(labels) + 1, minimum=1)
        for i, label in enumerate(labels):
            if label >= n_classes:
                raise DataError(f"{row(i)}: y={label} is out of range for n_classes={n_classes}")
        for i, split in enumerate(table["split"]):
            if split not in SPLITS:
                raise DataError(f"{row(i)}: split={split!r} is unknown; use train, val or test")
        train_labels = {label for label, split in zip(labels, table["split"]) if split == "train"}
        for label in range(n_classes):
            if label not in train_labels:
                raise DataError(f"{csv_path}: class {label} has no example in the train split; labels must be 0..K-1")

        value_names: list[list[str]] = []
        value_ids: list[list[int]] = []
        for attr in attr_names:
            values = table[attr].tolist()
            if any(v == "" for v in values):
                i = values.index("")
                raise DataError(f"{row(i)}: attribute {attr!r} is empty")
            names = sorted(set(values), key=value_order)
            index = {name: k for k, name in enumerate(names)}
            value_names.append(names)
            value_ids.append([index[v] for v in values])

        split_rows = {split: [i for i, s in enumerate(table["split"]) if s == split] for split in SPLITS}
        filenames = table["filename"].tolist()
        files = stat_split_files(data_root, {split: [filenames[i] for i in rows] for split, rows in split_rows.items()},
                                 where=lambda split, k: row(split_rows[split][k]))
        paths = [data_root / filename for filename in filenames]

        size = image_size_option(options)
        train_transform, eval_transform = image_transforms(size)
        y_all = torch.tensor(labels)
        attrs_all = torch.tensor(value_ids).T.reshape(len(labels), len(attr_names))
        cardinalities = [len(v) for v in value_names]
        splits = {}
        for split in SPLITS:
            rows = split_rows[split]
            if not rows:
                raise DataError(f"{csv_path}: no row has split={split!r}; every split needs examples")
            images = FileImages([paths[i] for i in rows], train_transform, eval_transform, (3, size, size))
            splits[split] = make_split(split, y_all[rows], attrs_all[rows], images, cardinalities)
        dataset = SpuriousDataset(
            name="custom",
            class_names=[str(k) for k in range(n_classes)],
            attr_names=attr_names,
            attr_value_names=value_names,
            splits=splits,
            average_kind=average,
            description=f"custom dataset from {csv_path}",
            data_fingerprint=data_fingerprint(data_root, [csv_path], files),
        )
        cls._check_groups(csv_path, dataset)
        return dataset

    @staticmethod
    def _attribute_columns(csv_path: Path, table: pd.DataFrame, requested: str | None) -> list[str]:
        if requested:
            names = [a.strip() for a in requested.split(",") if a.strip()]
            for name in names:
                if name not in table.columns or name in REQUIRED_COLUMNS:
                    raise DataError(f"--attrs {name!r}: not an attribute column of {csv_path}")
            return names
        names = [c for c in table.columns if c not in REQUIRED_COLUMNS]
        if not names:
            raise DataError(f"{csv_path}: no attribute column; add one besides filename, y and split")
        return names

    @staticmethod
    def _check_groups(csv_path: Path, dataset: SpuriousDataset) -> None:
        counts = {split: dataset.group_counts(split) for split in SPLITS}
        for g, name in enumerate(dataset.group_names):
            present = [s for s in SPLITS if counts[s][g] > 0]
            if present and len(present) < len(SPLITS):
                empty = next(s for s in SPLITS if counts[s][g] == 0)
                raise DataError(
                    f"{csv_path}: group {name} has examples in {', '.join(present)} but none in {empty}; "
                    "every group needs examples in every split (or drop it, or choose other --attrs)"
                )


def value_order(value: str) -> tuple[int, float, str]:
    """Sort key of an attribute value: numbers by value, ties (``1``, ``01``, ``1.0``) by their text, then
    everything else by its text. Total on distinct strings: ``nan`` (which compares unequal to itself)
    and other non-numbers are text, so no order is left to the set's hash-seeded iteration."""
    try:
        number = float(value)
    except ValueError:
        return (1, 0.0, value)
    if math.isnan(number):
        return (1, 0.0, value)
    return (0, number, value)
