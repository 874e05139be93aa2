"""Dataset registry: one file per dataset, each registering itself with :func:`register_dataset`.

A registered dataset is a subclass of :class:`DatasetSource` with class attributes describing it
(without loading anything) and a ``load`` method returning a :class:`bench.core.dataset.SpuriousDataset`.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path
from typing import Any, ClassVar

from bench.core.dataset import SpuriousDataset, subsample
from bench.core.errors import ConfigError, DataError

_REGISTRY: dict[str, type[DatasetSource]] = {}


# A dataset option every dataset understands: keep this fraction of each group of each split.
SUBSAMPLE_OPTION = "subsample"


class DatasetSource:
    """Describes one dataset and knows how to load it."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    needs_data_root: ClassVar[bool] = False  # False for the synthetic twins
    # True when the images are resized on load to the backbone's input size (option "image_size").
    accepts_image_size: ClassVar[bool] = False
    # The ``--data-option`` keys this dataset understands (besides image_size); anything else is a typo,
    # refused rather than ignored (it would still change the run's identity).
    option_names: ClassVar[tuple[str, ...]] = ()
    # Where a user obtains the files (shown when they are missing).
    obtain_hint: ClassVar[str] = ""
    # Training protocol defaults of this dataset (backbone, optimiser, lr, ...), with their origin.
    training_defaults: ClassVar[dict[str, Any]] = {}
    defaults_origin: ClassVar[str] = ""

    @classmethod
    def locate(cls, data_root: Path | None) -> Path | None:
        """The folder holding this dataset's files, or None when it is not found."""
        return None

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """ConfigError naming an option this dataset does not understand."""
        known = (*(("image_size",) if cls.accepts_image_size else ()), *cls.option_names, SUBSAMPLE_OPTION)
        for key in options:
            if key not in known:
                raise ConfigError(f"--data-option {key}: not an option of {cls.name}; "
                                  + f"known: {', '.join(known)}")

    @classmethod
    def load(cls, data_root: Path | None, options: dict[str, Any]) -> SpuriousDataset:
        raise NotImplementedError

    @classmethod
    def export_marker(cls, data_root: Path | None) -> dict[str, Any] | None:
        """The marker of a synthetic twin written in this dataset's layout (``bench data export``) found
        under ``data_root``, or None (real files, or a dataset that is not read from files)."""
        return None

    @classmethod
    def data_version(cls) -> str:
        """A token that changes whenever the data this source yields changes without its files changing
        (a synthetic twin's generator); part of a run's identity when not empty."""
        return ""


def register_dataset(cls: type[DatasetSource]) -> type[DatasetSource]:
    """Class decorator adding a dataset to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"dataset {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _import_all() -> None:
    package_dir = Path(__file__).parent
    for module in pkgutil.iter_modules([str(package_dir)]):
        if not module.name.startswith("_") and module.name != "base":
            importlib.import_module(f"datasets.{module.name}")


def dataset_names() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def get_dataset(name: str) -> type[DatasetSource]:
    _import_all()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def resolve_data_root(data_root: str | Path | None) -> Path | None:
    """``--data-root`` if given, else the ``BENCH_DATA_ROOT`` environment variable, else None."""
    if data_root:
        return Path(data_root).expanduser()
    env = os.environ.get("BENCH_DATA_ROOT")
    return Path(env).expanduser() if env else None


_LOADED: dict[tuple, SpuriousDataset] = {}


def subsample_fraction(options: dict[str, Any]) -> float | None:
    """The ``subsample`` option as a fraction in (0, 1], None when absent; ConfigError otherwise."""
    if SUBSAMPLE_OPTION not in options:
        return None
    value = options[SUBSAMPLE_OPTION]
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = float("nan")
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--data-option {SUBSAMPLE_OPTION}={value!r}: expected a fraction in (0, 1], e.g. "
                          f"{SUBSAMPLE_OPTION}=0.1 (keeps 10% of each group of each split)")
    return fraction


def load_dataset(
    name: str, data_root: str | Path | None = None, options: dict[str, Any] | None = None
) -> SpuriousDataset:
    """Load (and memoise per process) a dataset by name; raises DataError when its files are missing.

    The option ``subsample`` (see :func:`bench.core.dataset.subsample`) applies to every dataset.
    """
    source = get_dataset(name)
    root = resolve_data_root(data_root)
    options = dict(options or {})
    key = (name, str(root), tuple(sorted((k, str(v)) for k, v in options.items())))
    if key not in _LOADED:
        if source.needs_data_root and root is None:
            raise DataError(
                f"dataset {name!r} needs its files: pass --data-root DIR or set BENCH_DATA_ROOT"
                + (f" ({source.obtain_hint})" if source.obtain_hint else "")
            )
        fraction = subsample_fraction(options)
        options.pop(SUBSAMPLE_OPTION, None)
        dataset = source.load(root, options)
        _LOADED[key] = subsample(dataset, fraction) if fraction is not None else dataset
    return _LOADED[key]
