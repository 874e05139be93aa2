"""``urbancars``: UrbanCars (Li et al., CVPR 2023, "A Whac-A-Mole Dilemma"), from its generated folders.

UrbanCars is not distributed as images: it is generated with facebookresearch/Whac-A-Mole
(``scripts/prepare_dataset_models/create_urbancars.sh``), which writes (``--data-root`` may be the
``urbancars/`` folder itself or a parent of it, e.g. Whac-A-Mole's ``data/``)::

    urbancars/bg-0.95_co_occur_obj-0.95/train/<group>/000.jpg, 000_mask.png, 000_co_occur_obj_mask.png, ...
    urbancars/bg-0.5_co_occur_obj-0.5/val/<group>/...
    urbancars/bg-0.5_co_occur_obj-0.5/test/<group>/...

with the 8 group folders ``obj-{urban,country}_bg-{urban,country}_co_occur_obj-{urban,country}``.
As in facebookresearch/Whac-A-Mole:dataset/urbancars.py, each folder's ``*.jpg`` are the images (the
``*_mask.png`` files are ignored; the JPEGs are read in sorted order) and the labels come from the
folder name: class = car type (0 urban, 1 country), attributes ``[bg, co_occur_obj]`` (0 urban,
1 country), so ``g = 4*obj + 2*bg + co_occur_obj``. Generated counts, checked by `bench data
check urbancars`: per object class 3610 (both cues aligned) / 190 (background conflicting) / 190
(co-occurring object conflicting) / 10 (both) in train, 125 per group in val and test.

Metrics: average_kind ``urbancars_id`` (I.D. Acc), with the BG / CoObj / BG+CoObj gaps of
bench.core.metrics reported beside worst-group accuracy.

Transforms (facebookresearch/Whac-A-Mole:model/classifiers.py ``get_transforms``): the 256x256
images are used as they are (no resize, no crop); train: RandomHorizontalFlip (``--data-option
augment=false`` turns it off); the backbone's normalisation by the trainer. The resolution follows the
backbone in the reference's proportion: int(S*256/224) pixels for a backbone of input size S, i.e.
256 (the native size) for the ResNets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from bench.core.dataset import SPLITS, SpuriousDataset, make_split
from bench.core.errors import DataError
from datasets import register_dataset
from datasets._files import FileDatasetSource, ImagePipeline, data_fingerprint, split_images

CATEGORIES = ("urban", "country")
SPLIT_FOLDERS = {
    "train": "bg-0.95_co_occur_obj-0.95/train",
    "val": "bg-0.5_co_occur_obj-0.5/val",
    "test": "bg-0.5_co_occur_obj-0.5/test",
}
NATIVE_SIZE = 256
# Group g = 4*obj + 2*bg + co: obj 0 aligned 3610, bg-conflict 190, co-conflict 190, both 10; obj 1 mirrored.
PUBLISHED_COUNTS = {
    "train": [3610, 190, 190, 10, 10, 190, 190, 3610],
    "val": [125] * 8,
    "test": [125] * 8,
}


def group_folder(obj: int, bg: int, co_occur_obj: int) -> str:
    return f"obj-{CATEGORIES[obj]}_bg-{CATEGORIES[bg]}_co_occur_obj-{CATEGORIES[co_occur_obj]}"


@register_dataset
class UrbanCars(FileDatasetSource):
    name = "urbancars"
    description = ("UrbanCars (Li et al. 2023): urban vs country car with two spurious cues, background and "
                   "co-occurring object (generated images)")
    folder_names = ("urbancars", "data/urbancars")
    marker = SPLIT_FOLDERS["train"]
    augment_default = True
    obtain_hint = ("generate it with github.com/facebookresearch/Whac-A-Mole "
                   "(scripts/prepare_dataset_models/create_urbancars.sh); it is not distributed as images")
    training_defaults: ClassVar[dict[str, Any]] = {
        "backbone": "resnet50", "pretrained": True, "optimizer": "sgd", "lr": 1e-3, "weight_decay": 1e-4,
        "momentum": 0.9, "batch_size": 128, "epochs": 300,
    }
    defaults_origin = ("facebookresearch/Whac-A-Mole urbancars_trainers/launcher.py defaults (ResNet-50 "
                       "ImageNet-pretrained, SGD momentum 0.9, lr 1e-3, wd 1e-4, batch 128, 300 epochs; "
                       "the reference also trains with AMP, which the harness does not)")
    published_origin = ("facebookresearch/Whac-A-Mole create_datasets/urbancars/gen_urbancars.py: "
                        "int(ratio_bg * ratio_co * N) images per group, N = 4000 train / 500 val / 500 test per class")

    @classmethod
    def is_dataset_folder(cls, path: Path) -> bool:
        return any((path / relpath).is_dir() for relpath in SPLIT_FOLDERS.values())

    @classmethod
    def published_counts(cls, options: dict[str, Any]) -> dict[str, list[int]] | None:
        return {split: list(counts) for split, counts in PUBLISHED_COUNTS.items()}

    @classmethod
    def pipeline(cls, options: dict[str, Any]) -> ImagePipeline:
        side = int(cls.image_size(options) * NATIVE_SIZE / 224)
        return ImagePipeline(frame=(side, side), crop=(side, side), augment="flip" if cls.augment(options) else "none")

    @classmethod
    def load(cls, data_root: Path | None, options: dict[str, Any]) -> SpuriousDataset:
        cls.check_options(options)
        folder = cls.require_folder(data_root)
        split_relpaths: dict[str, list[str]] = {}
        labels: dict[str, list[tuple[int, int, int]]] = {}
        for split, split_folder in SPLIT_FOLDERS.items():
            split_relpaths[split], labels[split] = [], []
            for obj in (0, 1):
                for bg in (0, 1):
                    for co_occur_obj in (0, 1):
                        relpath = f"{split_folder}/{group_folder(obj, bg, co_occur_obj)}"
                        directory = folder / relpath
                        if not directory.is_dir():
                            raise DataError(f"{directory}: no such folder; UrbanCars has 8 group folders per split "
                                            f"({cls.obtain_hint})")
                        names = sorted(p.name for p in directory.glob("*.jpg") if p.is_file())
                        if not names:
                            raise DataError(f"{directory}: no *.jpg image; the UrbanCars generation did not finish")
                        split_relpaths[split] += [f"{relpath}/{name}" for name in names]
                        labels[split] += [(obj, bg, co_occur_obj)] * len(names)
        pipeline = cls.pipeline(options)
        images, extra = split_images(cls.name, folder, split_relpaths, pipeline)
        splits = {}
        for split in SPLITS:
            table = torch.tensor(labels[split])
            splits[split] = make_split(split, table[:, 0], table[:, 1:], images[split], [2, 2])
        return SpuriousDataset(
            name=cls.name,
            class_names=["urban car", "country car"],
            attr_names=["bg", "co_occur_obj"],
            attr_value_names=[list(CATEGORIES), list(CATEGORIES)],
            splits=splits,
            average_kind="urbancars_id",
            extra_metrics=("urbancars",),
            description=f"UrbanCars from {folder}; {pipeline.describe()}",
            data_fingerprint=data_fingerprint(folder, [], extra["image_files"]),  # labels: the folder names
            extra=extra,
            synthetic=cls.synthetic_origin(folder),
        )
