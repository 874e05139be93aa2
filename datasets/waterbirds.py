"""``waterbirds``: Waterbirds (Sagawa et al., ICLR 2020), read from its public release.

Layouts (either is accepted; ``--data-root`` may be the dataset folder itself or a parent of it):

* group_DRO's ``waterbird_complete95_forest2water2/`` (from ``waterbird_complete95_forest2water2.tar.gz``;
  group_DRO expects it as ``<root>/cub/data/waterbird_complete95_forest2water2``, DFR takes the folder
  itself), holding ``metadata.csv`` and the 200 CUB class folders of composited JPEGs;
* WILDS' ``waterbirds_v1.0/`` (the same ``metadata.csv`` and image folders, plus ``RELEASE_v1.0.txt``).

``metadata.csv`` columns used: ``img_filename`` (path relative to the folder), ``y`` (0 landbird,
1 waterbird), ``split`` (0 train, 1 val, 2 test), ``place`` (0 land, 1 water background). Groups
``g = 2*y + place`` (kohpangwei/group_DRO:data/cub_dataset.py): 0 landbird/land, 1 landbird/water,
2 waterbird/land, 3 waterbird/water. The released file has train 3498/184/56/1057, val 467/466/133/133,
test 2255/2255/642/642 (`bench data check waterbirds` compares against these).

Average accuracy: group accuracies weighted by the training group proportions (GroupDRO /
WILDS ``adj_acc_avg``), average_kind ``train_weighted``.

Transforms (kohpangwei/group_DRO:data/cub_dataset.py ``get_transform_cub``), for image size S
(224 for the ResNets; set from the backbone by the runner, or ``--data-option image_size=S``):

* eval, and train without augmentation: Resize((int(S*256/224),) * 2) -> CenterCrop(S);
* train with ``--data-option augment=true``: RandomResizedCrop(S, scale (0.7, 1), ratio (0.75, 4/3))
  + RandomHorizontalFlip. group_DRO's runs use no augmentation, so it is off by default (DFR's
  protocol turns it on for its base model: ``methods/dfr.py``, ``data_options_per_dataset``).

The backbone's normalisation is applied by the trainer (ImageNet's for the ResNets). With an image cache (``bench
data prepare waterbirds``), the cache holds the Resize((int(S*256/224),) * 2) frame: evaluation is
bit-identical to the file transform; the random resized crop is taken from that frame instead of
the full-resolution image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from bench.core.dataset import SPLITS, SpuriousDataset, make_split
from bench.core.errors import DataError
from datasets import register_dataset
from datasets._files import FileDatasetSource, ImagePipeline, data_fingerprint, split_images

METADATA = "metadata.csv"
REQUIRED_COLUMNS = ("img_filename", "y", "split", "place")
SPLIT_CODES = {"0": "train", "1": "val", "2": "test"}
PUBLISHED_COUNTS = {
    "train": [3498, 184, 56, 1057],
    "val": [467, 466, 133, 133],
    "test": [2255, 2255, 642, 642],
}


def read_metadata(csv_path: Path) -> pd.DataFrame:
    """The metadata table with its four columns checked; DataError naming the file and row otherwise."""
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{csv_path}: not a readable CSV file ({str(error).splitlines()[0]})") from None
    for column in REQUIRED_COLUMNS:
        if column not in table.columns:
            raise DataError(f"{csv_path}: missing column {column!r} (columns: {', '.join(table.columns)})")
    allowed = {"y": ("0", "1"), "place": ("0", "1"), "split": tuple(SPLIT_CODES)}
    for column, values in allowed.items():
        cells = table[column].str.strip().to_numpy()
        bad = np.flatnonzero(~np.isin(cells, values))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{csv_path}, row {i + 2}: {column}={table[column].iloc[i]!r} is not one of "
                            f"{', '.join(values)}" + (" (0 train, 1 val, 2 test)" if column == "split" else ""))
        table[column] = cells
    empty = np.flatnonzero(table["img_filename"].str.strip().to_numpy() == "")
    if len(empty):
        raise DataError(f"{csv_path}, row {int(empty[0]) + 2}: img_filename is empty")
    return table


@register_dataset
class Waterbirds(FileDatasetSource):
    name = "waterbirds"
    description = "Waterbirds (Sagawa et al. 2020): bird type vs land/water background, real images"
    folder_names = ("waterbird_complete95_forest2water2", "waterbirds_v1.0",
                    "cub/data/waterbird_complete95_forest2water2", "data/waterbird_complete95_forest2water2",
                    "waterbirds")
    marker = METADATA
    obtain_hint = ("https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz (group_DRO), "
                   "or WILDS' waterbirds_v1.0 (pip install wilds; wilds.get_dataset('waterbirds', download=True))")
    training_defaults: ClassVar[dict[str, Any]] = {
        "backbone": "resnet50", "pretrained": True, "optimizer": "sgd", "lr": 1e-3, "weight_decay": 1e-4,
        "momentum": 0.9, "batch_size": 128, "epochs": 300,
    }
    defaults_origin = ("the paper's standard-regularisation protocol (Sagawa et al. 2020), as in the sample GroupDRO "
                       "command of the kohpangwei/group_DRO README without its --reweight_groups --robust flags: "
                       "ResNet-50 ImageNet-pretrained, SGD momentum 0.9, lr 1e-3, wd 1e-4, batch 128, 300 epochs, "
                       "no augmentation")
    published_origin = ("the released metadata.csv (also hard-coded in p-lambda/wilds "
                        "wilds/datasets/waterbirds_dataset.py for train)")

    @classmethod
    def is_dataset_folder(cls, path: Path) -> bool:
        return (path / METADATA).is_file()

    @classmethod
    def published_counts(cls, options: dict[str, Any]) -> dict[str, list[int]] | None:
        return {split: list(counts) for split, counts in PUBLISHED_COUNTS.items()}

    @classmethod
    def pipeline(cls, options: dict[str, Any]) -> ImagePipeline:
        size = cls.image_size(options)
        frame = int(size * 256 / 224)
        return ImagePipeline(frame=(frame, frame), crop=(size, size),
                             augment="resized_crop_flip" if cls.augment(options) else "none",
                             crop_scale=(0.7, 1.0), crop_ratio=(0.75, 4 / 3))

    @classmethod
    def load(cls, data_root: Path | None, options: dict[str, Any]) -> SpuriousDataset:
        cls.check_options(options)
        folder = cls.require_folder(data_root)
        csv_path = folder / METADATA
        table = read_metadata(csv_path)
        pipeline = cls.pipeline(options)
        split_names = table["split"].map(SPLIT_CODES).to_numpy()
        rows = {split: np.flatnonzero(split_names == split) for split in SPLITS}
        for split in SPLITS:
            if len(rows[split]) == 0:
                raise DataError(f"{csv_path}: no row has split={split!r}; every split needs examples")
        filenames = table["img_filename"].str.strip().to_numpy()
        split_relpaths = {split: [str(filenames[i]) for i in rows[split]] for split in SPLITS}
        images, extra = split_images(
            cls.name, folder, split_relpaths, pipeline,
            where=lambda split, i: f"{csv_path}, row {int(rows[split][i]) + 2}",
        )
        y_all = torch.tensor(table["y"].astype(int).to_numpy())
        place_all = torch.tensor(table["place"].astype(int).to_numpy())
        splits = {
            split: make_split(split, y_all[rows[split]], place_all[rows[split]], images[split], [2])
            for split in SPLITS
        }
        return SpuriousDataset(
            name=cls.name,
            class_names=["landbird", "waterbird"],
            attr_names=["place"],
            attr_value_names=[["land", "water"]],
            splits=splits,
            average_kind="train_weighted",
            description=f"Waterbirds from {folder}; {pipeline.describe()}",
            data_fingerprint=data_fingerprint(folder, [csv_path], extra["image_files"]),
            extra=extra,
            synthetic=cls.synthetic_origin(folder),
        )
