"""The device-side view of a loaded dataset: what the trainer and the methods read from it.

:class:`DeviceData` holds the three splits of a :class:`bench.core.dataset.SpuriousDataset` as the
model sees them: normalised image batches on the device, labels, predictions and penultimate
features of a whole split, and per-group correct/total counts for the evaluator; how the batches of a
file-backed split reach the device is described on :class:`DeviceData`. It never hands
out the dataset object itself, so the one guard on training group labels (:meth:`groups`) cannot
be walked around: a method that does not declare it uses them gets none.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from bench.core.backbones import Normalisation, memory_format
from bench.core.dataset import FileImages, FrameImages, InMemoryImages, SpuriousDataset
from bench.core.errors import DataError
from bench.core.frame_batches import batch_seeds, draw_boxes, seeded_global_rng, transform_frames
from bench.core.precision import Precision
from bench.core.prefetch import InFlight, copier, pinned_empty, prefetch

EVAL_BATCH_SIZE = 512


class TrainingGroupsHidden(RuntimeError):
    """A method that declared it does not use training group labels asked for them."""


class SpuriousMasksHidden(RuntimeError):
    """A method that declared it does not use spurious-region masks asked for them."""


class DeviceData:
    """The splits of a dataset on a device: batches, labels, predictions, features, group counts.

    Images are normalised here, ``(pixels/255 - mean) / std``, with the normalisation of the backbone
    that reads them (its :class:`bench.core.backbones.InputSpec`; the runner passes it), and handed out
    in ``memory_format`` (channels-last on CUDA). Training group labels are only handed out when
    ``train_groups_allowed``, the spurious-region masks of the synthetic twins only when
    ``masks_allowed``. ``precision``: the autocast of :meth:`predict`.

    How batches of a split are read (:meth:`iter_images`):

    * in memory (the synthetic twins): the whole split lives on the device, batches are indexed there;
    * from the image cache (:class:`FrameImages`) with ``frames_on_device`` (default: on CUDA): a
      background thread gathers each batch's whole uint8 frames into pinned memory and copies them to
      the device on a side stream, one batch ahead; the crop, the training augmentation (when the
      device can apply it, ``FrameTransform.on_device``) and the normalisation run there on the batch;
    * otherwise from the host: ``load_batch`` in this process (``workers=0``), or in a persistent pool
      of ``workers`` DataLoader processes that prefetch and, on CUDA, return pinned batches, copied to
      the device by the same background thread.

    Training augmentations draw their random numbers from per-batch seeds derived from the ``seed`` the
    trainer passes for the epoch, so a batch is augmented the same on every path and for any ``workers``.
    """

    def __init__(self, dataset: SpuriousDataset, device: torch.device, train_groups_allowed: bool, workers: int = 0,
                 *, normalisation: Normalisation, masks_allowed: bool = False, precision: Precision | None = None,
                 frames_on_device: bool | None = None):
        self._dataset = dataset
        self.device = device
        self.train_groups_allowed = train_groups_allowed
        self.masks_allowed = masks_allowed
        self.workers = workers
        self.precision = precision if precision is not None else Precision()
        self.frames_on_device = device.type == "cuda" if frames_on_device is None else frames_on_device
        self.memory_format = memory_format(device)
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
        self._file_loader: FileBatchLoader | None = None

    def close(self) -> None:
        """Stop the data-loading worker processes (if any)."""
        if self._file_loader is not None:
            self._file_loader.close()
            self._file_loader = None

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
        """uint8 pixels in [0, 255], or floats in [0, 1], normalised, in the device's memory format."""
        unit = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels
        x = (unit - self._mean) / self._std
        if self.memory_format != torch.contiguous_format:
            x = x.contiguous(memory_format=self.memory_format)
        return x

    def images(self, split: str, indices: torch.Tensor, train: bool, seed: int | None = None) -> torch.Tensor:
        """Normalised images of ``indices`` of a split, on the device, read on the host (file-backed splits
        augment with the global generator, or with ``seed`` when given)."""
        if split in self._pixels:
            return self._normalise(self._pixels[split][indices.to(self.device)])
        source = self._dataset.splits[split].images
        assert isinstance(source, FileImages)
        with seeded_global_rng(seed):
            raw = source.load_batch(indices.tolist(), train)
        return self._normalise(raw.to(self.device))

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
        self, split: str, order: torch.Tensor, batch_size: int, train: bool, seed: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(index chunk, images) pairs of ``order`` in batches; ``seed``: the epoch's augmentation seed
        (training batches of file-backed splits; None: one drawn from the global generator, here)."""
        chunks = list(self.batches(order, batch_size, train))
        if split in self._pixels:
            for chunk in chunks:
                yield chunk, self.images(split, chunk, train)
            return
        if train and seed is None:
            seed = int(torch.randint(2**62, (1,)))
        seeds = batch_seeds(seed if train else None, len(chunks))
        source = self._dataset.splits[split].images
        if isinstance(source, FrameImages) and self.frames_on_device and (not train or source.transform.on_device):
            yield from self._frames_on_device(source, chunks, seeds)
        elif self.workers > 0:
            if self._file_loader is None:
                self._file_loader = FileBatchLoader(self._dataset, self.workers, self.device)
            copy = copier(self.device)
            requests = [(split, chunk.tolist(), train, batch_seed) for chunk, batch_seed in zip(chunks, seeds)]
            loaded = self._file_loader.load(requests)  # started here, in the main thread

            def copied() -> Iterator[InFlight]:  # runs in the prefetch thread, which hands errors to this one
                for raw in loaded:
                    if isinstance(raw, DataError):  # raised in a worker: passed back whole, as its one line
                        raise raw
                    yield copy((raw,), None)

            for chunk, batch in zip(chunks, prefetch(copied())):
                yield chunk, self._normalise(*batch.wait())
        else:
            for chunk, batch_seed in zip(chunks, seeds):
                yield chunk, self.images(split, chunk, train, batch_seed)

    def _frames_on_device(self, source: FrameImages, chunks: list[torch.Tensor], seeds: list[int | None]
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The device path: whole frames gathered and copied by the prefetch thread, transformed here
        (``seeds``: a training batch's augmentation seed, None for evaluation batches)."""
        copy = copier(self.device)

        def gathered() -> Iterator[InFlight]:  # runs in the prefetch thread
            frames = source.frames()
            for chunk, batch_seed in zip(chunks, seeds):
                rows = source.rows[chunk.numpy()]
                pixels = pinned_empty((len(rows), *frames.shape[1:]), torch.uint8, self.device)
                buffer = pixels.numpy()
                for i, row in enumerate(rows):  # row by row: several times faster than a fancy index on a memmap
                    buffer[i] = frames[row]
                boxes = None
                if batch_seed is not None:  # a training batch
                    generator = torch.Generator().manual_seed(batch_seed)
                    boxes = draw_boxes(len(rows), tuple(frames.shape[-2:]), source.transform, generator)
                yield copy((pixels,), boxes)

        for chunk, batch in zip(chunks, prefetch(gathered())):
            (pixels,) = batch.wait()
            yield chunk, self._normalise(transform_frames(pixels, source.transform, batch.extra))

    @torch.no_grad()
    def predict(self, model: nn.Module, split: str, features: bool = False) -> torch.Tensor:
        """Logits (or penultimate features) of every example of a split, in order, in eval mode, as float32
        (computed under the run's autocast)."""
        was_training = model.training
        model.eval()
        outputs = []
        order = torch.arange(self.n(split))
        for _, x in self.iter_images(split, order, EVAL_BATCH_SIZE, train=False):
            with self.precision.autocast():
                outputs.append((model.featurizer(x) if features else model(x)).float())
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


class FileBatchLoader:
    """A persistent pool of DataLoader worker processes reading batches of any split of a dataset from files.

    One pool serves every split (training and evaluation passes alternate, one at a time), started at the
    first pass and kept until :meth:`close`: workers are not forked again every epoch. Each request
    ``(split, indices, train, seed)`` is one batch; a training batch is augmented under its own ``seed``,
    so the result does not depend on which worker reads it. Batches come back in request order, in pinned
    memory when the device is a GPU.
    """

    def __init__(self, dataset: SpuriousDataset, workers: int, device: torch.device) -> None:
        sources = {name: split.images for name, split in dataset.splits.items() if isinstance(split.images, FileImages)}
        self._requests = _Requests()
        self._loader: torch.utils.data.DataLoader | None = torch.utils.data.DataLoader(
            _SplitBatches(sources), batch_size=None, sampler=self._requests, num_workers=workers,
            persistent_workers=True, pin_memory=device.type == "cuda",
            # Its own generator: the workers' seeds (unused: batches carry theirs) must not draw from the
            # global one, whose state a checkpoint restores.
            generator=torch.Generator().manual_seed(0),
        )

    def load(self, requests: list[tuple[str, list[int], bool, int | None]]) -> Iterator[torch.Tensor]:
        """An iterator over the batches of ``requests``. Call it in the main thread (it may start the worker
        processes); the iterator may be advanced from another one."""
        if self._loader is None:
            raise RuntimeError("FileBatchLoader used after close()")
        self._requests.items = requests
        return iter(self._loader)

    def close(self) -> None:
        self._loader = None  # the pool's iterator shuts its workers down when it is dropped


class _Requests(torch.utils.data.Sampler):
    """The batch requests of the current pass (the DataLoader's sampler, iterated in the main process)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, list[int], bool, int | None]] = []

    def __iter__(self) -> Iterator[tuple[str, list[int], bool, int | None]]:
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


class _SplitBatches(torch.utils.data.Dataset):
    def __init__(self, sources: dict[str, FileImages]) -> None:
        self.sources = sources

    def __getitem__(self, request: tuple[str, list[int], bool, int | None]) -> torch.Tensor | DataError:
        # A DataError raised here would reach the main process re-wrapped by the DataLoader, its message
        # grown into a traceback; returning it keeps the one-line error (re-raised by iter_images).
        split, indices, train, seed = request
        try:
            with seeded_global_rng(seed):
                return self.sources[split].load_batch(indices, train)
        except DataError as error:
            return error
