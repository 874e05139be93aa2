"""``custom``: bring your own dataset as ``DIR/metadata.csv`` plus image files.

Columns: ``filename`` (path relative to DIR), ``y`` (integer class 0..K-1), ``split``
(``train``/``val``/``test``) and one or more spurious attribute columns: every other column by
default, or those named by ``--attrs a,b``. Attribute values may be numbers or strings; each
attribute's values are sorted to give value ids. Groups are (y, attributes) as everywhere.

Everything is validated on load, with a one-line error naming the file and row: a missing folder,
file or column, a non-integer or negative label, a class with no training example, an unknown split
value, a missing image file, and a group that has examples in some split but none in another.

Options (``--data-option key=value``): ``image_size`` (default: the backbone's input size, set by
the runner), ``average`` (the reported average kind, default ``plain``), ``n_classes`` (declare K
so that a label >= K is reported as out of range).
"""

from __future__ import annotations

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
        declared = options.get("n_classes")
        n_classes = int(declared) if declared is not None else max(labels) + 1
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
            names = sorted(set(values), key=_natural_key)
            index = {name: k for k, name in enumerate(names)}
            value_names.append(names)
            value_ids.append([index[v] for v in values])

        paths = []
        for i, filename in enumerate(table["filename"]):
            path = data_root / filename
            if not path.is_file():
                raise DataError(f"{row(i)}: image file {path} not found")
            paths.append(path)

        size = int(options.get("image_size", 224))
        train_transform, eval_transform = image_transforms(size)
        y_all = torch.tensor(labels)
        attrs_all = torch.tensor(value_ids).T.reshape(len(labels), len(attr_names))
        cardinalities = [len(v) for v in value_names]
        splits = {}
        for split in SPLITS:
            rows = [i for i, s in enumerate(table["split"]) if s == split]
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


def _natural_key(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)
