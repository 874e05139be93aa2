"""The device-side view of a loaded dataset: what the trainer and the methods read from it.

:class:`DeviceData` holds the three splits of a :class:`bench.core.dataset.SpuriousDataset` as the
model sees them: normalised image batches on the device, labels, predictions and penultimate
features of a whole split, and per-group correct/total counts for the evaluator. It never hands
out the dataset object itself, so the one guard on training group labels (:meth:`groups`) cannot
be walked around: a method that does not declare it uses them gets none.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from bench.core.backbones import Normalisation
from bench.core.dataset import FileImages, InMemoryImages, SpuriousDataset
from bench.core.errors import DataError

EVAL_BATCH_SIZE = 512


class TrainingGroupsHidden(RuntimeError):
    """A method that declared it does not use training group labels asked for them."""


class SpuriousMasksHidden(RuntimeError):
    """A method that declared it does not use spurious-region masks asked for them."""


class DeviceData:
    """The splits of a dataset on a device: batches, labels, predictions, features, group counts.

    Images are normalised here, ``(pixels/255 - mean) / std``, with the normalisation of the backbone
    that reads them (its :class:`bench.core.backbones.InputSpec`; the runner passes it).
    Training group labels are only handed out when ``train_groups_allowed``, the spurious-region masks
    of the synthetic twins only when ``masks_allowed``.
    """

    def __init__(self, dataset: SpuriousDataset, device: torch.device, train_groups_allowed: bool, workers: int = 0,
                 *, normalisation: Normalisation, masks_allowed: bool = False):
        self._dataset = dataset
        self.device = device
        self.train_groups_allowed = train_groups_allowed
        self.masks_allowed = masks_allowed
        self.workers = workers
        self.n_groups = dataset.n_groups
        self.normalisation = normalisation
        self._mean = torch.tensor(normalisation.mean, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(normalisation.std, device=device).view(1, -1, 1, 1)
        self._pixels: dict[str, torch.Tensor] = {}
        for name, split in dataset.splits.items():
            if isinstance(split.images, InMemoryImages):
                self._pixels[name] = split.images.pixels.to(device)
        self._labels = {name: split.y.to(device) for name, split in dataset.splits.items()}
        self._groups = {name: split.group.to(device) for name, split in dataset.splits.items()}

    def n(self, split: str) -> int:
        return len(self._dataset.splits[split])

    def labels(self, split: str) -> torch.Tensor:
        return self._labels[split]

    def groups(self, split: str) -> torch.Tensor:
        if split == "train" and not self.train_groups_allowed:
            raise TrainingGroupsHidden("this method declared it does not use training group labels")
        return self._groups[split]

    def spurious_masks(self, split: str, indices: torch.Tensor) -> torch.Tensor:
        """Float ``[B, 1, H, W]`` masks of ``indices`` (1: the spurious region), for the methods that declare
        they use them."""
        if not self.masks_allowed:
            raise SpuriousMasksHidden("this method declared it does not use spurious-region masks")
        mask = self._dataset.splits[split].spurious_mask
        if mask is None:
            raise SpuriousMasksHidden(f"{self._dataset.name} has no spurious-region masks")
        return mask[indices.cpu()].to(self.device, torch.float32)[:, None]

    def record_only_group_counts(self, split: str, indices: torch.Tensor) -> list[int]:
        """How many of ``indices`` fall in each group, for a method's log only (JTT records its error
        set's composition). Counts, never labels: a method must not act on them, and the ones that
        declare they use no training groups are tested to train identically with this door closed."""
        return torch.bincount(self._dataset.splits[split].group[indices.cpu()], minlength=self.n_groups).tolist()

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() / 255.0 - self._mean) / self._std

    def images(self, split: str, indices: torch.Tensor, train: bool) -> torch.Tensor:
        """Normalised images of ``indices`` of a split, on the device."""
        if split in self._pixels:
            return self._normalise(self._pixels[split][indices.to(self.device)])
        source = self._dataset.splits[split].images
        assert isinstance(source, FileImages)
        return self._normalise_file_batch(source.load_batch(indices.tolist(), train))

    def _normalise_file_batch(self, raw: torch.Tensor) -> torch.Tensor:
        """A batch from ``FileImages.load_batch``: uint8 in [0, 255] (image cache) or float in [0, 1]."""
        raw = raw.to(self.device)
        if raw.dtype == torch.uint8:
            return self._normalise(raw)
        return ((raw - self._mean) / self._std).contiguous()

    @staticmethod
    def batches(order: torch.Tensor, batch_size: int, train: bool) -> Iterator[torch.Tensor]:
        """Yield index chunks of ``order``; a trailing batch of one example is dropped in training
        (batch norm cannot train on it)."""
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if train and len(chunk) == 1 and len(order) > 1:
                return
            yield chunk

    def iter_images(
        self, split: str, order: torch.Tensor, batch_size: int, train: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(index chunk, images) pairs; file-backed splits are read by DataLoader workers."""
        chunks = list(self.batches(order, batch_size, train))
        if split in self._pixels or self.workers == 0:
            for chunk in chunks:
                yield chunk, self.images(split, chunk, train)
            return
        source = self._dataset.splits[split].images
        loader = torch.utils.data.DataLoader(
            _FileChunks(source, chunks, train), batch_size=None, num_workers=self.workers, shuffle=False
        )
        for chunk, raw in zip(chunks, loader):
            if isinstance(raw, DataError):  # raised in a worker: passed back whole, as the one-line error it is
                raise raw
            yield chunk, self._normalise_file_batch(raw)

    @torch.no_grad()
    def predict(self, model: nn.Module, split: str, features: bool = False) -> torch.Tensor:
        """Logits (or penultimate features) of every example of a split, in order, in eval mode."""
        was_training = model.training
        model.eval()
        outputs = []
        order = torch.arange(self.n(split))
        for _, x in self.iter_images(split, order, EVAL_BATCH_SIZE, train=False):
            outputs.append(model.featurizer(x) if features else model(x))
        model.train(was_training)
        return torch.cat(outputs)

    def group_counts(self, predictions: torch.Tensor, split: str) -> dict[str, list[int]]:
        """Per-group correct/total counts of class predictions on a split."""
        # Counted on the CPU, from the dataset's own (CPU) labels: CUDA's bincount has no deterministic
        # kernel (``--deterministic``), and only the predictions then cross from the device.
        groups = self._dataset.splits[split].group
        correct = (predictions.cpu() == self._dataset.splits[split].y).long()
        return {
            "correct": torch.bincount(groups, weights=correct, minlength=self.n_groups).long().tolist(),
            "total": torch.bincount(groups, minlength=self.n_groups).tolist(),
        }


class _FileChunks(torch.utils.data.Dataset):
    def __init__(self, source: FileImages, chunks: list[torch.Tensor], train: bool):
        self.source, self.chunks, self.train = source, chunks, train

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> torch.Tensor | DataError:
        # A DataError raised here would reach the main process re-wrapped by the DataLoader, its message
        # grown into a traceback; returning it keeps the one-line error (re-raised by iter_images).
        try:
            return self.source.load_batch(self.chunks[i].tolist(), self.train)
        except DataError as error:
            return error
