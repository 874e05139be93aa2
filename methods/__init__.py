"""Method registry: one file per method, each registering its class with :func:`register_method`.

A class is registered under its ``name``. A variant of a method that differs only in some
hyperparameters (DFR_train is DFR on training-set subsets) is the same class registered again under
another name with those hyperparameters re-declared (:func:`register_variant`); its records carry
its own name and paper line, and nothing of the class is repeated.

Registration validates the class's per-dataset defaults: every value must name a hyperparameter the
method has and pass its checks (that every dataset name is a registered dataset is checked by
tests/test_method_contract.py, since methods do not import the dataset registry).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from bench.core.errors import ConfigError
from methods.base import Hparam, Method, hparam_specs

_REGISTRY: dict[str, type[Method]] = {}


def _validate_defaults(cls: type[Method]) -> None:
    specs = hparam_specs(cls)
    for dataset, values in cls.defaults_per_dataset.items():
        for key, value in values.items():
            if key not in specs:
                raise ValueError(f"method {cls.name}: defaults_per_dataset[{dataset!r}] sets unknown hparam {key!r}")
            try:
                specs[key].parse(key, value)
            except ConfigError as error:
                raise ValueError(f"method {cls.name}: defaults_per_dataset[{dataset!r}]: {error}") from None


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _validate_defaults(cls)
    _REGISTRY[cls.name] = cls
    return cls


def register_variant(cls: type[Method], name: str, paper: str, own_hparams: dict[str, Hparam],
                     **class_values: Any) -> type[Method]:
    """Register ``cls`` again as ``name``, with the hparams in ``own_hparams`` re-declared (others kept).

    The registered object is a subclass that only carries these class values, so that the variant's
    runs record its own name, paper line and hparam declarations.
    """
    variant = type(cls.__name__, (cls,), {
        "name": name, "paper": paper, "own_hparams": {**cls.own_hparams, **own_hparams},
        "__module__": cls.__module__, "__qualname__": f"{cls.__qualname__}[{name}]", **class_values,
    })
    return register_method(variant)


def _import_all() -> None:
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not module.name.startswith("_") and module.name != "base":
            importlib.import_module(f"methods.{module.name}")


def method_names() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    _import_all()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
