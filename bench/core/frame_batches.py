"""Batches of cached frames transformed on the device, and the random numbers of every augmentation.

Augmentation randomness comes from per-batch seeds (:func:`batch_seeds`, derived from the epoch's seed
that the trainer derives from the run's seed, stage and epoch), never from the order in which threads or
worker processes happen to run: a batch is augmented the same whichever path, worker or thread loads
it, and a resumed run sees the augmentations an uninterrupted one would.

On the device, a batch of whole uint8 frames becomes the model input in a few batched operations
(:func:`transform_frames`): the evaluation centre crop is a slice; the random resized crop is one
``torchvision.ops.roi_align`` over every example's box (bilinear, averaging ``ceil(box / output)``
samples per output pixel and axis when it shrinks, the way an antialiased resize averages), and the
flip one ``torch.where``. The crop boxes follow torchvision's ``RandomResizedCrop.get_params`` (up to
ten tries of a scale and a log-uniform aspect ratio, the first that fits, else the centre crop clamped
to the ratio range), drawn for the whole batch at once (:func:`draw_resized_crops`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from bench.core.dataset import FrameTransform

CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params
_SEED_STEP = 0x9E3779B97F4A7C15  # spreads the batch seeds of one epoch over the 63-bit range
_SEED_RANGE = 2**63


def batch_seeds(seed: int | None, n_batches: int) -> list[int | None]:
    """The augmentation seed of each batch of an epoch whose augmentation seed is ``seed`` (None: none)."""
    if seed is None:
        return [None] * n_batches
    return [(seed + (k + 1) * _SEED_STEP) % _SEED_RANGE for k in range(n_batches)]


@contextlib.contextmanager
def seeded_global_rng(seed: int | None) -> Iterator[None]:
    """Run the block with torch's global CPU generator seeded by ``seed`` (the host transforms, torchvision's,
    draw from it), and give the generator its state back afterwards (nothing when ``seed`` is None)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass
class CropBoxes:
    """Per example of a batch: the crop window (``top``, ``left``, ``height``, ``width``, in frame pixels) and
    whether it is flipped."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> CropBoxes:
        return CropBoxes(*(getattr(self, name).to(device, non_blocking=non_blocking)
                           for name in ("top", "left", "height", "width", "flip")))


def draw_resized_crops(n: int, frame: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float],
                       generator: torch.Generator) -> CropBoxes:
    """``n`` crop windows distributed as torchvision's ``RandomResizedCrop.get_params`` on a frame of size
    ``frame`` (H, W), each flipped with probability 1/2, from ``generator`` in a fixed order."""
    height, width = frame
    area = height * width
    low, high = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, CROP_TRIES, generator=generator,
                                                                     dtype=torch.float64))
    aspect = torch.exp(low + (high - low) * torch.rand(n, CROP_TRIES, generator=generator, dtype=torch.float64))
    # torch.round and Python's round both round halves to even.
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    found = fits.any(dim=1)
    fallback_h, fallback_w = _centre_fallback(height, width, ratio)
    h = torch.where(found, h.gather(1, first)[:, 0], fallback_h)
    w = torch.where(found, w.gather(1, first)[:, 0], fallback_w)
    # torch.randint(0, m, ...) per example, as one uniform draw each: floor(u * m).
    top = (torch.rand(n, generator=generator, dtype=torch.float64) * (height - h + 1)).floor().long()
    left = (torch.rand(n, generator=generator, dtype=torch.float64) * (width - w + 1)).floor().long()
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    flip = torch.rand(n, generator=generator) < 0.5
    return CropBoxes(top, left, h, w, flip)


def _centre_fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback crop (h, w) when no try fits: the whole frame clamped to the ratio range."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def centre_offsets(frame: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of a centred crop, with torchvision CenterCrop's rounding: int(round((H - h) / 2))."""
    return int(round((frame[0] - crop[0]) / 2.0)), int(round((frame[1] - crop[1]) / 2.0))


def draw_boxes(n: int, frame: tuple[int, int], transform: FrameTransform, generator: torch.Generator
               ) -> CropBoxes:
    """The training windows and flips of ``n`` frames under ``transform`` (``transform.on_device`` must hold)."""
    if transform.augment == "resized_crop_flip":
        return draw_resized_crops(n, frame, transform.crop_scale, transform.crop_ratio, generator)
    top, left = centre_offsets(frame, transform.crop)
    full = torch.full((n,), 1, dtype=torch.long)
    flip = torch.rand(n, generator=generator) < 0.5 if transform.augment == "flip" else torch.zeros(n, dtype=torch.bool)
    return CropBoxes(full * top, full * left, full * transform.crop[0], full * transform.crop[1], flip)


def transform_frames(frames: torch.Tensor, transform: FrameTransform, boxes: CropBoxes | None) -> torch.Tensor:
    """Model inputs in [0, 1] (float32 ``[B, 3, h, w]``) from uint8 frames ``[B, 3, H, W]`` on any device.

    ``boxes`` None: the evaluation centre crop (the same pixels as the host's). Otherwise the training
    windows and flips of :func:`draw_boxes`: a window of the output size is sliced, any other is resized
    to it by ``roi_align``.
    """
    crop = transform.crop
    if boxes is None or transform.augment in ("none", "flip"):
        top, left = centre_offsets(tuple(frames.shape[-2:]), crop)  # type: ignore[arg-type]
        x = frames[:, :, top : top + crop[0], left : left + crop[1]].float()
    else:
        from torchvision.ops import roi_align

        index = torch.arange(len(frames), device=frames.device, dtype=torch.float32)
        corners = torch.stack([boxes.left, boxes.top, boxes.left + boxes.width, boxes.top + boxes.height], dim=1)
        rois = torch.cat([index[:, None], corners.to(frames.device, torch.float32)], dim=1)
        # aligned=True: pixel k spans [k, k + 1), so a box of the output's size samples pixel centres exactly.
        x = roi_align(frames.float(), rois, output_size=crop, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if boxes is not None:
        flip = boxes.flip.to(frames.device)[:, None, None, None]
        x = torch.where(flip, x.flip(-1), x)
    return x.div_(255.0)
