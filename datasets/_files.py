"""Shared machinery of the file-backed benchmarks (waterbirds, celeba, spawrious, urbancars).

* :class:`FileDatasetSource`: finds a dataset's folder under ``--data-root`` (the folder itself or a
  parent holding it under one of its usual names), parses the common dataset options and raises a
  one-line DataError naming the expected folder and where to get the data when it is absent.
* :class:`ImagePipeline`: a dataset's image transforms, once as the reference code applies them to
  image files (PIL, torchvision) and once as the same operations on a cached uint8 frame.
* The image cache: ``bench data prepare NAME`` decodes every image once, resizes the whole image to
  the pipeline's *frame* (the size the reference resizes to before cropping) and stores all frames
  in one uint8 ``.npy`` file ``[N, 3, H, W]`` that training reads as a memory map; the train
  augmentation (random crop, flip) then runs on the uint8 frame instead of on a decoded JPEG.
  The cache file name holds a hash of the dataset name, the frame size and every image file's
  relative path, size and modification time, so a cache built from other files (or at another
  resolution) is never used: loading falls back to the image files and says so.

The cache lives in ``$BENCH_IMAGE_CACHE_DIR`` if set, else in ``.bench-cache/`` inside the dataset
folder (next to the data, where there is room for it: CelebA at 224 px takes about 37 GB).

* Which files are read: :func:`stat_split_files` refuses an image path that is absolute, climbs out
  of the dataset folder (``../``) or leads out of it through a symbolic link (``$BENCH_FOLLOW_SYMLINKS=1``
  allows links, for a data folder assembled from links to other disks), and warns when one file is in
  two splits (leakage). :func:`data_fingerprint` identifies what was read (index files' content, every
  image file's path, size and modification time); it is part of a run's identity.

A synthetic twin written in a real dataset's layout by ``bench data export`` carries a marker file,
``bench-export.json``, at the root of its dataset folder (:func:`read_export_marker`): the loaders
then record the twin's name as the dataset's ``synthetic`` origin, the runner trains at the export's
image size unless told otherwise, and ``bench data check`` compares with the twin's own counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bench.core.dataset import FileImages, FrameImages, FrameTransform, rgb_image
from bench.core.errors import ConfigError, DataError
from bench.core.frame_batches import centre_offsets
from datasets import DatasetSource

CACHE_FORMAT_VERSION = 1  # bump when the cached frames of the same files would differ
CACHE_ENV = "BENCH_IMAGE_CACHE_DIR"
FOLLOW_SYMLINKS_ENV = "BENCH_FOLLOW_SYMLINKS"
FINGERPRINT_VERSION = 1  # bump when data_fingerprint hashes other facts of the same files
CACHE_FOLDER = ".bench-cache"
DEFAULT_IMAGE_SIZE = 224  # the backbones' input size when the runner does not set one
AUGMENTATIONS = ("none", "flip", "resized_crop_flip", "flip_colour")
EXPORT_MARKER = "bench-export.json"
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


# --------------------------------------------------------------------------------------------
# Finding the dataset and reading its options


class FileDatasetSource(DatasetSource):
    """A dataset read from the files of its public release; subclasses describe the layout."""

    needs_data_root = True
    accepts_image_size = True
    # Names (relative paths) under which the dataset folder usually sits in a data root.
    folder_names: ClassVar[tuple[str, ...]] = ()
    # A file or folder inside the dataset folder, named in the "not found" error.
    marker: ClassVar[str] = ""
    option_names: ClassVar[tuple[str, ...]] = ("augment",)
    augment_default: ClassVar[bool] = False
    # Where the published group counts come from (shown by `bench data check`).
    published_origin: ClassVar[str] = ""

    @classmethod
    def is_dataset_folder(cls, path: Path) -> bool:
        raise NotImplementedError

    @classmethod
    def locate(cls, data_root: Path | None) -> Path | None:
        if data_root is None:
            return None
        for candidate in (data_root, *(data_root / name for name in cls.folder_names)):
            if candidate.is_dir() and cls.is_dataset_folder(candidate):
                return candidate
        return None

    @classmethod
    def require_folder(cls, data_root: Path | None) -> Path:
        """The dataset folder, or a one-line DataError saying what was expected and where to get it."""
        if data_root is None:
            raise DataError(f"dataset {cls.name!r} needs its files: pass --data-root DIR or set BENCH_DATA_ROOT "
                            f"(get them from {cls.obtain_hint})")
        if not data_root.is_dir():
            raise DataError(f"--data-root {data_root}: no such folder")
        folder = cls.locate(data_root)
        if folder is None:
            expected = data_root / cls.folder_names[0] / cls.marker
            raise DataError(
                f"{cls.name}: no dataset found in {data_root}: expected {expected} (or pass the dataset folder "
                f"itself as --data-root); get it from {cls.obtain_hint}"
            )
        return folder

    @classmethod
    def image_size(cls, options: dict[str, Any]) -> int:
        return image_size_option(options)

    @classmethod
    def augment(cls, options: dict[str, Any]) -> bool:
        return parse_bool("augment", options.get("augment", cls.augment_default))

    @classmethod
    def published_counts(cls, options: dict[str, Any]) -> dict[str, list[int]] | None:
        """Published group counts per split (a key may join splits, e.g. ``train+val``); None if unknown."""
        return None

    @classmethod
    def export_marker(cls, data_root: Path | None) -> dict[str, Any] | None:
        folder = cls.locate(data_root)
        return read_export_marker(folder, cls.name) if folder is not None else None

    @classmethod
    def synthetic_origin(cls, folder: Path) -> str | None:
        """The twin a dataset folder was exported from (its marker's ``twin``), None for real data."""
        marker = read_export_marker(folder, cls.name)
        return marker["twin"] if marker else None


def read_export_marker(folder: Path, dataset_name: str | None) -> dict[str, Any] | None:
    """The ``bench-export.json`` of a dataset folder written by ``bench data export``, or None for real data.

    Its keys: ``twin`` (the twin's name), ``dataset`` (the real dataset whose loader reads it),
    ``data_version`` (the twin's), ``image_size`` (pixels) and more that the loaders do not read.
    DataError when it is malformed or written for another dataset than ``dataset_name`` (e.g. another
    Spawrious challenge; None: any).
    """
    path = folder / EXPORT_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not readable JSON ({error}); export the twin again (bench data export)") from None
    expected = {"twin": str, "dataset": str, "data_version": str, "image_size": int}
    if not isinstance(marker, dict) or any(not isinstance(marker.get(k), t) for k, t in expected.items()):
        raise DataError(f"{path}: needs the keys {', '.join(expected)}; export the twin again (bench data export)")
    if dataset_name is not None and marker["dataset"] != dataset_name:
        raise DataError(f"{folder} holds the twin {marker['twin']} exported for {marker['dataset']}, which is the only "
                        f"dataset that can read it, not {dataset_name}")
    return marker


def image_size_option(options: dict[str, Any]) -> int:
    """The ``image_size`` option (default :data:`DEFAULT_IMAGE_SIZE`); ConfigError unless an integer >= 8."""
    return int_option(options, "image_size", DEFAULT_IMAGE_SIZE, minimum=8)


def int_option(options: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = options.get(name, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--data-option {name}={value!r}: expected an integer") from None
    if number < minimum:
        raise ConfigError(f"--data-option {name}={number}: must be at least {minimum}")
    return number


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ConfigError(f"--data-option {name}={value!r}: expected true or false")


# --------------------------------------------------------------------------------------------
# Transforms


class CenterSquareCrop:
    """Centre crop to a square of the shorter side (CelebA's ``CenterCrop(178)`` for 178x218 images)."""

    def __call__(self, image: Any) -> Any:
        from torchvision.transforms import functional as TF

        side = min(image.size)
        return TF.center_crop(image, [side, side])


@dataclass(frozen=True)
class ImagePipeline:
    """How a dataset turns an image into a model input, on files and on cached frames.

    ``frame`` (H, W): the whole image is resized to this (the cache stores it); ``crop`` (h, w): the
    centre crop of the frame used for evaluation, also the output size. ``augment``: the training
    augmentation, one of :data:`AUGMENTATIONS` (``none``: training uses the evaluation transform).
    ``square_crop_first``: the file evaluation transform crops the original image to a centred
    square and resizes that to ``crop`` (CelebA), instead of resizing to ``frame`` and cropping.
    """

    frame: tuple[int, int]
    crop: tuple[int, int]
    augment: str = "none"
    crop_scale: tuple[float, float] = (0.7, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    square_crop_first: bool = False

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if self.crop[0] > self.frame[0] or self.crop[1] > self.frame[1]:
            raise ValueError(f"crop {self.crop} is larger than the frame {self.frame}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.crop[0], self.crop[1])

    def describe(self) -> str:
        if self.square_crop_first:
            evaluation = f"centre square crop, resize to {self.crop[0]}x{self.crop[1]}"
        else:
            evaluation = f"resize to {self.frame[0]}x{self.frame[1]}"
            if self.crop != self.frame:
                evaluation += f", centre crop {self.crop[0]}x{self.crop[1]}"
        training = {
            "none": "as evaluation",
            "flip": "as evaluation + random horizontal flip",
            "resized_crop_flip": f"random resized crop {self.crop[0]}x{self.crop[1]} (scale {self.crop_scale}, "
                                 f"ratio ({self.crop_ratio[0]:.3f}, {self.crop_ratio[1]:.3f})) + horizontal flip",
            "flip_colour": "as evaluation + horizontal flip, colour jitter 0.3 (brightness, contrast, saturation, "
                           "hue), random grayscale (p 0.1)",
        }[self.augment]
        return f"eval: {evaluation}; train: {training}"

    # -- on image files (PIL), as the reference code does ----------------------------------------
    def file_transforms(self) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
        """(train, eval) transforms from a PIL image to a float tensor in [0, 1]."""
        from torchvision import transforms as T

        if self.square_crop_first:
            evaluation = [CenterSquareCrop(), T.Resize(self.crop)]
        else:
            evaluation = [T.Resize(self.frame), T.CenterCrop(self.crop)]
        eval_transform = T.Compose([*evaluation, T.ToTensor()])
        if self.augment == "none":
            return eval_transform, eval_transform
        if self.augment == "resized_crop_flip":
            training = [T.RandomResizedCrop(self.crop, scale=self.crop_scale, ratio=self.crop_ratio),
                        T.RandomHorizontalFlip()]
        elif self.augment == "flip":
            training = [*evaluation, T.RandomHorizontalFlip()]
        else:  # flip_colour
            training = [*evaluation, *_colour_ops()]
        return T.Compose([*training, T.ToTensor()]), eval_transform

    # -- on cached frames ------------------------------------------------------------------------
    def frame_array(self, image: Any) -> np.ndarray:
        """The cached form of a PIL image: the whole image resized to ``frame``, uint8 ``[3, H, W]``."""
        from torchvision import transforms as T

        resized = T.Resize(self.frame)(rgb_image(image))
        return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))

    def from_frames(self, frames: np.ndarray, rows: np.ndarray, train: bool) -> torch.Tensor:
        """The evaluation or training transform of frames ``frames[rows]`` (``frames``: uint8
        ``[N, 3, H, W]``, typically the cache memmap); returns uint8 ``[B, 3, h, w]``.

        Only the needed pixels are copied out of ``frames``: the centre crop, or the random window.
        """
        if train and self.augment == "resized_crop_flip":
            return self._resized_crop_flip(frames, rows)
        top, left = centre_offsets(tuple(frames.shape[-2:]), self.crop)  # type: ignore[arg-type]
        cropped = torch.empty((len(rows), 3, *self.crop), dtype=torch.uint8)
        window = np.s_[:, top : top + self.crop[0], left : left + self.crop[1]]
        buffer = cropped.numpy()  # shares memory with ``cropped``
        for i, row in enumerate(rows):  # row by row: several times faster than one fancy index on a memmap
            buffer[i] = frames[row][window]
        if not train or self.augment == "none":
            return cropped
        if self.augment == "flip":
            return torch.stack([_random_flip(image) for image in cropped])
        return torch.stack([self._colour(image) for image in cropped])

    def _resized_crop_flip(self, frames: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        from torchvision.transforms import RandomResizedCrop

        size_probe = torch.empty((1, *frames.shape[-2:])).expand(3, -1, -1)  # get_params reads only its size
        out = torch.empty((len(rows), 3, *self.crop), dtype=torch.uint8)
        for i, row in enumerate(rows):
            # The same parameter draw as torchvision's RandomResizedCrop, then an antialiased bilinear
            # resize of the uint8 window (the resize torchvision applies to tensors), then the flip.
            top, left, height, width = RandomResizedCrop.get_params(size_probe, list(self.crop_scale),
                                                                    list(self.crop_ratio))
            window = torch.from_numpy(np.array(frames[row, :, top : top + height, left : left + width]))
            resized = F.interpolate(window[None], size=self.crop, mode="bilinear", antialias=True,
                                    align_corners=False)
            out[i] = _random_flip(resized[0])
        return out

    def _colour(self, image: torch.Tensor) -> torch.Tensor:
        # Colour jitter runs on PIL images (torchvision's tensor hue adjustment is several times slower),
        # with the same ops and random draws as the file transform.
        from PIL import Image
        from torchvision import transforms as T

        picture = Image.fromarray(image.permute(1, 2, 0).numpy())
        picture = T.Compose(_colour_ops())(picture)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(picture).transpose(2, 0, 1)))


def _colour_ops() -> list[Any]:
    from torchvision import transforms as T

    return [T.RandomHorizontalFlip(), T.ColorJitter(0.3, 0.3, 0.3, 0.3), T.RandomGrayscale()]


def _random_flip(image: torch.Tensor) -> torch.Tensor:
    # The draw torchvision's RandomHorizontalFlip makes, so cached and file pipelines consume the RNG alike.
    return image.flip(-1) if torch.rand(1) < 0.5 else image


# --------------------------------------------------------------------------------------------
# Image files and their cache


@dataclass
class ImageFiles:
    """Every image file of a loaded dataset, once each, sorted by path relative to the dataset folder."""

    root: Path
    relpaths: list[str]
    sizes: list[int]
    mtimes_ns: list[int]

    def __len__(self) -> int:
        return len(self.relpaths)

    def paths(self) -> list[Path]:
        return [self.root / relpath for relpath in self.relpaths]

    def digest(self, dataset_name: str, frame: tuple[int, int]) -> str:
        """Hash of everything a cached frame depends on: format, dataset, frame size, each file's identity."""
        hasher = hashlib.sha256(f"v{CACHE_FORMAT_VERSION}\n{dataset_name}\n{frame[0]}x{frame[1]}\n".encode())
        for relpath, size, mtime in zip(self.relpaths, self.sizes, self.mtimes_ns):
            hasher.update(f"{relpath}\t{size}\t{mtime}\n".encode())
        return hasher.hexdigest()


def cache_folder(dataset_folder: Path) -> Path:
    """``$BENCH_IMAGE_CACHE_DIR`` if set, else ``.bench-cache/`` inside the dataset folder."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else dataset_folder / CACHE_FOLDER


def cache_stem(dataset_name: str, frame: tuple[int, int]) -> str:
    return f"{dataset_name}-{frame[0]}x{frame[1]}-"


def cache_path(dataset_name: str, files: ImageFiles, frame: tuple[int, int]) -> Path:
    digest = files.digest(dataset_name, frame)
    return cache_folder(files.root) / f"{cache_stem(dataset_name, frame)}{digest[:20]}.npy"


def stale_caches(dataset_name: str, files: ImageFiles, frame: tuple[int, int]) -> list[Path]:
    """Caches of this dataset and frame size built from other files (unusable, safe to delete)."""
    current = cache_path(dataset_name, files, frame)
    folder = current.parent
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{cache_stem(dataset_name, frame)}*.npy") if p != current)


def open_cache(path: Path, n_images: int, frame: tuple[int, int]) -> np.ndarray | None:
    """The cache as a read-only memory map, or None if it is absent or not of the expected shape."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if array.dtype != np.uint8 or array.shape != (n_images, 3, *frame):
        return None
    return array


class CachedImages(FrameImages):
    """A split's images read from the cache memmap; ``paths`` still name the source files.

    ``load``/``load_batch`` gather the uint8 frames of the requested rows and apply the pipeline's
    crop/flip on them; the trainer may instead gather whole frames (``frames()``, ``rows``) and apply
    ``transform`` on the device. The memmap is opened lazily in each process (DataLoader workers
    included) and never pickled.
    """

    def __init__(self, paths: Sequence[Path], rows: Sequence[int], cache_file: Path, n_rows: int,
                 pipeline: ImagePipeline) -> None:
        train_transform, eval_transform = pipeline.file_transforms()
        super().__init__(paths, train_transform, eval_transform, pipeline.shape)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.transform = FrameTransform(pipeline.crop, pipeline.augment, pipeline.crop_scale, pipeline.crop_ratio)
        self.cache_file = cache_file
        self.n_rows = n_rows
        self.pipeline = pipeline
        self._frames: np.ndarray | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_frames"] = None
        return state

    def subset(self, rows: np.ndarray) -> CachedImages:
        clone = super().subset(rows)
        assert isinstance(clone, CachedImages)
        clone.rows = self.rows[np.asarray(rows, dtype=np.int64)]
        return clone

    def frames(self) -> np.ndarray:
        if self._frames is None or self._pid != os.getpid():
            frames = open_cache(self.cache_file, self.n_rows, self.pipeline.frame)
            if frames is None:
                raise DataError(f"{self.cache_file}: image cache unreadable or changed while in use; "
                                "delete it and rerun `bench data prepare`")
            self._frames, self._pid = frames, os.getpid()
        return self._frames

    def load_batch(self, indices: Sequence[int], train: bool) -> torch.Tensor:
        """uint8 ``[B, 3, h, w]`` images of positions ``indices`` of this split (the trainer normalises)."""
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        return self.pipeline.from_frames(self.frames(), rows, train)

    def load(self, index: int, train: bool) -> torch.Tensor:
        """One image as a float tensor in [0, 1], like :meth:`FileImages.load`."""
        return self.load_batch([index], train)[0].float().div_(255.0)


def stat_split_files(
    root: Path, split_relpaths: dict[str, list[str]], where: Callable[[str, int], str] | None = None
) -> ImageFiles:
    """Check every listed image file (DataError naming the file and its row otherwise): it exists, is a
    regular file, and lies inside ``root`` (:class:`ConfinedFiles`). Collects the size and modification
    time of each distinct file, and warns on stderr when one file is listed in more than one split
    (train/test leakage)."""
    confined = ConfinedFiles(root)
    seen: dict[str, os.stat_result] = {}
    first_split: dict[tuple[int, int], tuple[str, str]] = {}  # (device, inode) -> (split, relpath) first seen
    leaks: dict[tuple[int, int], tuple[str, str, str]] = {}  # files in two splits: (relpath, split, other split)
    for split, relpaths in split_relpaths.items():
        for i, relpath in enumerate(relpaths):
            if relpath not in seen:
                prefix = f"{where(split, i)}: " if where else ""
                info, outside = confined.stat(relpath)
                if outside:
                    raise DataError(f"{prefix}image file {relpath} {outside}; image paths must stay inside the "
                                    f"dataset folder {root}")
                if info is None or not stat.S_ISREG(info.st_mode):
                    problem = "not found" if info is None else "is not a file"
                    raise DataError(f"{prefix}image file {root / relpath} {problem}")
                seen[relpath] = info
            # The same file under two names (a link, a/../a) is the same file: compare by inode.
            key = (seen[relpath].st_dev, seen[relpath].st_ino)
            first = first_split.setdefault(key, (split, relpath))
            if first[0] != split:
                leaks.setdefault(key, (first[1], first[0], split))
    if leaks:
        relpath, split_a, split_b = next(iter(leaks.values()))
        print(f"warning: {len(leaks)} image file(s) are in more than one split (e.g. {relpath} in {split_a} and "
              f"{split_b}): a model is then evaluated on images it may have trained on (leakage)", file=sys.stderr)
    relpaths = sorted(seen)
    return ImageFiles(root, relpaths, [seen[r].st_size for r in relpaths], [seen[r].st_mtime_ns for r in relpaths])


class ConfinedFiles:
    """Stats files by their path relative to a dataset folder, refusing any that leads out of it: an
    absolute path, ``..`` out of it, or a symbolic link (to the file, or through a folder) out of it unless
    ``$BENCH_FOLLOW_SYMLINKS=1``. One ``lstat`` per file; each folder is resolved once."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.real_prefix = os.path.realpath(root).rstrip(os.sep) + os.sep
        self.follow_links = os.environ.get(FOLLOW_SYMLINKS_ENV, "").strip().lower() in TRUE_WORDS
        self._folder_problems: dict[str, str | None] = {}

    def stat(self, relpath: str) -> tuple[os.stat_result | None, str | None]:
        """(the file's stat, or None when it does not exist; why it is outside the folder, or None)."""
        if os.path.isabs(relpath):
            return None, "is an absolute path"
        normal = os.path.normpath(relpath)
        if normal == os.pardir or normal.startswith(os.pardir + os.sep):
            return None, "climbs out of the dataset folder (..)"
        path = os.path.join(self.root, relpath)
        try:
            info: os.stat_result | None = os.lstat(path)
        except OSError:
            info = None
        is_link = info is not None and stat.S_ISLNK(info.st_mode)
        if not self.follow_links:
            folder = os.path.dirname(normal)
            if folder not in self._folder_problems:
                self._folder_problems[folder] = self._problem(os.path.realpath(os.path.join(self.root, folder)))
            problem = self._folder_problems[folder] or (self._problem(os.path.realpath(path)) if is_link else None)
            if problem:
                return None, problem
        if is_link:
            try:
                info = os.stat(path)
            except OSError:
                info = None  # a dangling link: not found
        return info, None

    def _problem(self, target: str) -> str | None:
        if (target + os.sep).startswith(self.real_prefix):
            return None
        return (f"is reached through a symbolic link to {target}, outside the dataset folder (set "
                f"{FOLLOW_SYMLINKS_ENV}=1 to follow links you trust)")


def data_fingerprint(folder: Path, index_files: Sequence[Path], files: ImageFiles) -> str:
    """Identity of a file dataset as read: the content of its index files (metadata.csv, CelebA's lists)
    and every image file's path, size and modification time (the facts the image cache keys on; hashing
    every image's bytes would cost minutes on CelebA). Copying the data without keeping modification
    times (``cp -p``, ``rsync -a`` keep them) therefore gives new run identities."""
    hasher = hashlib.sha256(f"data v{FINGERPRINT_VERSION}\n".encode())
    for path in index_files:
        content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        hasher.update(f"{Path(path).relative_to(folder).as_posix()}\t{content}\n".encode())
    for relpath, size, mtime in zip(files.relpaths, files.sizes, files.mtimes_ns):
        hasher.update(f"{relpath}\t{size}\t{mtime}\n".encode())
    return hasher.hexdigest()[:16]


def split_images(
    dataset_name: str,
    root: Path,
    split_relpaths: dict[str, list[str]],
    pipeline: ImagePipeline,
    where: Callable[[str, int], str] | None = None,
) -> tuple[dict[str, FileImages], dict[str, Any]]:
    """Image sources of every split, read from the cache when an up-to-date one exists.

    Returns the sources and the ``extra`` entries of the dataset: ``image_files`` (ImageFiles),
    ``pipeline`` and ``image_cache`` (the cache file in use, or None).
    """
    files = stat_split_files(root, split_relpaths, where)
    cache_file = cache_path(dataset_name, files, pipeline.frame)
    cached = open_cache(cache_file, len(files), pipeline.frame) is not None
    if not cached:
        stale = stale_caches(dataset_name, files, pipeline.frame)
        if stale:
            print(f"note: {dataset_name}: image cache {stale[0]} was built from other files (they changed since "
                  f"`bench data prepare`), so the image files are read instead; rerun `bench data prepare "
                  f"{dataset_name}` to rebuild it", file=sys.stderr)
    row_of = {relpath: row for row, relpath in enumerate(files.relpaths)}
    train_transform, eval_transform = pipeline.file_transforms()
    sources: dict[str, FileImages] = {}
    for split, relpaths in split_relpaths.items():
        paths = [root / relpath for relpath in relpaths]
        if cached:
            rows = [row_of[relpath] for relpath in relpaths]
            sources[split] = CachedImages(paths, rows, cache_file, len(files), pipeline)
        else:
            sources[split] = FileImages(paths, train_transform, eval_transform, pipeline.shape)
    extra = {"image_files": files, "pipeline": pipeline, "image_cache": cache_file if cached else None}
    return sources, extra


def decode_error(path: Path) -> str | None:
    """None if ``path`` decodes completely as an image, else the reason it does not."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: a truncated file raises here
            rgb_image(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _decode_error_of(path: str) -> str | None:
    return decode_error(Path(path))


def _frame_of(job: tuple[str, ImagePipeline]) -> np.ndarray | str:
    from PIL import Image

    path, pipeline = job
    try:
        with Image.open(path) as image:
            return pipeline.frame_array(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return f"{type(error).__name__}: {error}"


def parallel_map(function: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterator[Any]:
    """``map`` in order, in ``workers`` processes when ``workers > 0`` (else in this process)."""
    if workers <= 0:
        yield from map(function, items)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(function, items, chunksize=64)


def find_unreadable(paths: Sequence[Path], workers: int = 0, progress: Callable[[int], None] | None = None
                    ) -> list[tuple[Path, str]]:
    """(path, reason) of every image file that does not decode."""
    bad = []
    for i, reason in enumerate(parallel_map(_decode_error_of, [str(p) for p in paths], workers)):
        if reason is not None:
            bad.append((Path(paths[i]), reason))
        if progress is not None:
            progress(1)
    return bad


def build_cache(dataset_name: str, files: ImageFiles, pipeline: ImagePipeline, workers: int = 0,
                progress: Callable[[int], None] | None = None) -> Path:
    """Decode and resize every image once into the cache file; returns its path.

    Written to a temporary name and renamed when complete, so an interrupted build leaves no cache
    that could be mistaken for a finished one.
    """
    target = cache_path(dataset_name, files, pipeline.frame)
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the cache folder {folder} ({error.strerror}); set {CACHE_ENV} to a "
                        "writable folder (or pass --cache-dir)") from None
    shape = (len(files), 3, *pipeline.frame)
    needed = int(np.prod(shape))
    free = _free_bytes(folder)
    if free is not None and needed > free:
        raise DataError(f"the cache needs {needed / 1e9:.1f} GB but {folder} has {free / 1e9:.1f} GB free; "
                        f"set {CACHE_ENV} (or --cache-dir) to a folder with room")
    partial = folder / f".{target.name}.partial"
    try:
        frames = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
    except OSError as error:
        raise DataError(f"cannot write {partial} ({error.strerror}); set {CACHE_ENV} (or --cache-dir) to a "
                        "writable folder") from None
    try:
        jobs = [(str(path), pipeline) for path in files.paths()]
        for i, frame in enumerate(parallel_map(_frame_of, jobs, workers)):
            if isinstance(frame, str):
                raise DataError(f"{jobs[i][0]}: cannot read image ({frame}); re-copy or remove that file "
                                f"(`bench data check {dataset_name}` lists every unreadable file)")
            frames[i] = frame
            if progress is not None:
                progress(1)
        frames.flush()
        del frames
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _free_bytes(folder: Path) -> int | None:
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None
