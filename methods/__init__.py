"""Method registry: one file per method, each registering its class with :func:`register_method`."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from bench.errors import ConfigError
from methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


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
