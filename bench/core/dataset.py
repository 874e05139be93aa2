"""The one dataset contract every dataset in the harness follows.

Every example has an image, a class label ``y``, one value per spurious attribute, a group id derived
from ``(y, attributes)`` and exactly one split (``train``/``val``/``test``).  The group id is the
mixed-radix number ``y, a_1, ..., a_k`` (most significant digit first), which reproduces the
conventions of the reference code: Waterbirds ``g = 2*y + place``, CelebA ``g = 2*Blond_Hair + Male``,
UrbanCars ``g = 4*obj + 2*bg + co_obj``.

Images come from one of two sources: :class:`InMemoryImages` (a uint8 tensor, used by the synthetic
twins; batches are gathered by indexing, no per-item Python) or :class:`FileImages` (paths read with
PIL and a torchvision transform, used by real datasets and ``custom``). Every image file becomes 8-bit
RGB through :func:`rgb_image` (16-bit greyscale is scaled, not clipped).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.core.errors import DataError
from bench.core.metrics import AVERAGES, metric_set_problem

SPLITS = ("train", "val", "test")

# The average a dataset reports as "its" average accuracy, named by kind (see bench.core.metrics).
AVERAGE_KINDS = tuple(AVERAGES)


class InMemoryImages:
    """Images held as one uint8 tensor ``[N, C, H, W]``; the trainer gathers batches by indexing."""

    def __init__(self, pixels: torch.Tensor) -> None:
        if pixels.dtype != torch.uint8 or pixels.ndim != 4:
            raise ValueError("InMemoryImages needs a uint8 tensor of shape [N, C, H, W]")
        self.pixels = pixels

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.pixels.shape[1:])  # type: ignore[return-value]

    def subset(self, rows: np.ndarray) -> InMemoryImages:
        return InMemoryImages(self.pixels[torch.from_numpy(rows)])


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def rgb_image(image: Any) -> Any:
    """A PIL image as 8-bit RGB. Pillow's own ``convert("RGB")`` clips 16-bit greyscale (300, 30000 and
    65535 all become 255); here such an image keeps its high byte (65535 -> 255, 30000 -> 117), as Pillow
    does itself for 16-bit colour PNGs. Mode ``I`` (32-bit integers, how some readers hold 16-bit
    greyscale) is taken as 16-bit when its values fit; other 32-bit and floating-point images are refused
    (ValueError), since no scale can be assumed for them."""
    from PIL import Image

    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image)
        if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError("a 32-bit integer image; convert it to 8 or 16 bits per channel")
        return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        raise ValueError("a floating-point image; convert it to 8 or 16 bits per channel")
    return image.convert("RGB")


class FileImages:
    """Images read from files; ``load(i)`` returns a float tensor ``[C, H, W]`` in [0, 1]."""

    def __init__(
        self,
        paths: Sequence[Path],
        train_transform: Callable[[Any], torch.Tensor],
        eval_transform: Callable[[Any], torch.Tensor],
        shape: tuple[int, int, int],
    ) -> None:
        self.paths = list(paths)
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self._shape = shape

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape

    def subset(self, rows: np.ndarray) -> FileImages:
        """The images at positions ``rows`` (a subclass keeps its own state: a copy with fewer paths)."""
        clone = copy.copy(self)
        clone.paths = [self.paths[int(i)] for i in rows]
        return clone

    def load(self, index: int, train: bool) -> torch.Tensor:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image = rgb_image(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(f"{path}: cannot read image ({reason}); re-copy or remove that file") from None
        transform = self.train_transform if train else self.eval_transform
        return transform(image)

    def load_batch(self, indices: Sequence[int], train: bool) -> torch.Tensor:
        """Images of ``indices`` as one batch ``[B, C, H, W]``: float in [0, 1], or uint8 in [0, 255]
        (the image cache hands out uint8 so that the trainer normalises once per batch, on the device)."""
        return torch.stack([self.load(int(i), train) for i in indices])


# Training augmentations of cached frames that bench.core.device_data can apply on the device, to a batch.
DEVICE_AUGMENTATIONS = ("none", "flip", "resized_crop_flip")


@dataclass(frozen=True)
class FrameTransform:
    """How a cached frame becomes a model input, in terms that can be applied to a whole batch.

    ``crop`` (h, w): the output size; evaluation takes the frame's centre crop of that size (offsets
    rounded as torchvision's ``CenterCrop``). ``augment``: the training augmentation, ``none`` (as
    evaluation), ``flip`` (as evaluation, then a horizontal flip with probability 1/2),
    ``resized_crop_flip`` (torchvision's ``RandomResizedCrop(crop, crop_scale, crop_ratio)`` of the frame,
    then the flip) or the name of one only the dataset's own code applies (e.g. colour jitter).
    """

    crop: tuple[int, int]
    augment: str = "none"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @property
    def on_device(self) -> bool:
        """Whether the device can apply the training augmentation (evaluation it always can)."""
        return self.augment in DEVICE_AUGMENTATIONS


class FrameImages(FileImages):
    """File images whose decoded frames are also held as one uint8 array (the image cache), so that a batch
    can be gathered as whole frames and transformed on the device (``transform``).

    ``frames()``: uint8 ``[N_all, 3, H, W]`` (a memory map); ``rows``: this split's rows of it, by position.
    ``load_batch`` still applies the whole transform on the host.
    """

    rows: np.ndarray
    transform: FrameTransform

    def frames(self) -> np.ndarray:
        raise NotImplementedError


@dataclass
class Split:
    """One split of a dataset: labels, attributes, groups and the image source."""

    name: str
    y: torch.Tensor  # [N] long
    attrs: torch.Tensor  # [N, n_attrs] long
    group: torch.Tensor  # [N] long
    images: InMemoryImages | FileImages
    # Optional, [N, H, W] uint8: 1 where a pixel belongs to the spurious region (the twins know it: the
    # background and co-occurring objects, everything but the core object). Like training group labels,
    # only methods that declare they use it ever see it (rrr, the oracle of docs/ule.md).
    spurious_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, rows: np.ndarray) -> Split:
        index = torch.from_numpy(rows)
        mask = self.spurious_mask[index] if self.spurious_mask is not None else None
        return Split(self.name, self.y[index], self.attrs[index], self.group[index], self.images.subset(rows), mask)


@dataclass
class SpuriousDataset:
    """A loaded dataset: names, group structure and the three splits."""

    name: str
    class_names: list[str]
    attr_names: list[str]
    attr_value_names: list[list[str]]  # attr_value_names[k][v]: name of value v of attribute k
    splits: dict[str, Split]
    average_kind: str  # which average is this dataset's headline "average accuracy"
    description: str = ""
    # Metric sets (bench.core.metrics.METRIC_SETS) reported beside worst-group accuracy and the average.
    extra_metrics: tuple[str, ...] = ()
    # Identity of the files a dataset was read from (its index files' content, every image file's path,
    # size and modification time): part of a run's identity. Empty for generated data, whose source's
    # ``data_version`` identifies it instead.
    data_fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # None for real data; the name of the synthetic twin the images come from otherwise: a twin itself,
    # or a twin written in a real dataset's layout by `bench data export` (read by the real loader).
    synthetic: str | None = None

    def __post_init__(self) -> None:
        if self.average_kind not in AVERAGE_KINDS:
            raise ValueError(f"average_kind must be one of {AVERAGE_KINDS}, got {self.average_kind!r}")
        problem = metric_set_problem(self.extra_metrics, self.n_groups)
        if problem:
            raise ValueError(f"extra_metrics: {problem}")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def attr_cardinalities(self) -> list[int]:
        return [len(values) for values in self.attr_value_names]

    @property
    def n_groups(self) -> int:
        return self.n_classes * int(np.prod(self.attr_cardinalities))

    @property
    def group_names(self) -> list[str]:
        names = []
        for y in range(self.n_classes):
            for values in itertools.product(*[range(c) for c in self.attr_cardinalities]):
                parts = [self.class_names[y]] + [self.attr_value_names[k][v] for k, v in enumerate(values)]
                names.append("/".join(parts))
        return names

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.splits["train"].images.shape

    @property
    def has_spurious_masks(self) -> bool:
        return all(split.spurious_mask is not None for split in self.splits.values())

    def group_counts(self, split: str) -> list[int]:
        counts = torch.bincount(self.splits[split].group, minlength=self.n_groups)
        return [int(c) for c in counts]

    def info(self) -> dict[str, Any]:
        """Everything the evaluator and the records need to know about the dataset."""
        return {
            "name": self.name,
            "class_names": self.class_names,
            "attr_names": self.attr_names,
            "attr_value_names": self.attr_value_names,
            "group_names": self.group_names,
            "n_classes": self.n_classes,
            "n_groups": self.n_groups,
            "average_kind": self.average_kind,
            "extra_metrics": list(self.extra_metrics),
            "group_counts": {split: self.group_counts(split) for split in self.splits},
            "image_shape": list(self.image_shape),
            "synthetic": self.synthetic,
        }


def group_ids(y: torch.Tensor, attrs: torch.Tensor, attr_cardinalities: Sequence[int]) -> torch.Tensor:
    """Mixed-radix group id of ``(y, a_1, ..., a_k)``: ``y`` is the most significant digit."""
    group = y.clone().long()
    for k, cardinality in enumerate(attr_cardinalities):
        group = group * cardinality + attrs[:, k].long()
    return group


def make_split(
    name: str,
    y: torch.Tensor,
    attrs: torch.Tensor,
    images: InMemoryImages | FileImages,
    attr_cardinalities: Sequence[int],
    spurious_mask: torch.Tensor | None = None,
) -> Split:
    """Build a split, deriving the group ids; checks that the arrays agree in length (and the mask, when
    given, in shape with the images)."""
    y = torch.as_tensor(y, dtype=torch.long)
    attrs = torch.as_tensor(attrs, dtype=torch.long)
    if attrs.ndim == 1:
        attrs = attrs[:, None]
    if not (len(y) == attrs.shape[0] == len(images)):
        raise ValueError(f"split {name}: {len(y)} labels, {attrs.shape[0]} attribute rows, {len(images)} images")
    if spurious_mask is not None:
        spurious_mask = torch.as_tensor(spurious_mask, dtype=torch.uint8)
        expected = (len(y), *images.shape[1:])
        if tuple(spurious_mask.shape) != expected:
            raise ValueError(f"split {name}: spurious mask of shape {tuple(spurious_mask.shape)}, expected {expected}")
    return Split(name=name, y=y, attrs=attrs, group=group_ids(y, attrs, attr_cardinalities), images=images,
                 spurious_mask=spurious_mask)


def subsample(dataset: SpuriousDataset, fraction: float, seed: int = 0) -> SpuriousDataset:
    """``dataset`` with ``fraction`` of each group of each split (rounded, at least one example of every
    non-empty group), drawn without replacement by a generator seeded with ``seed`` and the split; the
    kept examples stay in their order. ``extra`` is kept as loaded (it describes the whole dataset)."""
    splits = {}
    for name, split in dataset.splits.items():
        rng = np.random.default_rng([seed, SPLITS.index(name)])
        groups = split.group.numpy()
        kept = []
        for group in range(dataset.n_groups):
            members = np.flatnonzero(groups == group)
            if len(members):
                kept.append(rng.choice(members, size=max(1, int(round(fraction * len(members)))), replace=False))
        rows = np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)
        splits[name] = split.subset(rows.astype(np.int64))
    return dataclasses.replace(dataset, splits=splits)
