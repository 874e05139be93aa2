"""Published numbers of the literature, with their sources, as data: ``published.csv`` and
``published_sources.csv`` beside this module (package data, so an installed package carries them).

``published.csv``, one row per number, in percent:

* ``method``, ``dataset``: a registered method and real dataset (``dataset`` may be a pattern such
  as ``spawrious-*`` when the source does not say which challenge);
* ``metric``: a metric of the report (``worst_group_accuracy``, ``average_accuracy``, UrbanCars'
  ``id_acc``, ``bg_gap``, ``coobj_gap``, ``bg_coobj_gap``) or ``worst_group_gain`` (worst-group
  accuracy gained over the source's baseline, in points);
* ``value``, ``std`` (empty where the source gives none), ``bound`` (``up_to``: the source gives a
  maximum over its settings, never a result to compare with);
* ``average_kind``: which average an ``average_accuracy`` is (bench.core.metrics.AVERAGES);
* ``backbone``, ``selection`` (a model selection rule of bench.core.selection: with or without
  validation group labels), ``seeds``: the source's protocol, empty where it does not say;
* ``source``: a key of ``published_sources.csv``, whose row holds the reference and where it was read.

Every number was read from its source; a number whose source could not be read is not here.
:func:`load_published` checks every row (one-line error naming the file and line); the tests also
check the names against the method and dataset registries (which import torch; this module must not).
"""

from __future__ import annotations

import csv
import fnmatch
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from bench.core.errors import ConfigError
from bench.core.metrics import AVERAGES, METRIC_SETS
from bench.core.selection import RULES

NUMBERS_FILE = Path(__file__).with_name("published.csv")
SOURCES_FILE = Path(__file__).with_name("published_sources.csv")
NUMBER_COLUMNS = ["method", "dataset", "metric", "value", "std", "bound", "average_kind", "backbone", "selection",
                  "seeds", "source", "note"]
SOURCE_COLUMNS = ["key", "reference", "location"]

GAIN_METRIC = "worst_group_gain"
ACCURACY_METRICS = ("worst_group_accuracy", "average_accuracy", "id_acc")
SIGNED_METRICS = tuple(spec.key for spec in METRIC_SETS["urbancars"].metrics if spec.key not in ACCURACY_METRICS)
METRICS = ACCURACY_METRICS + SIGNED_METRICS + (GAIN_METRIC,)
BOUNDS = ("", "up_to")
_NAME = re.compile(r"[a-z0-9][a-z0-9*-]*")
_KEY = re.compile(r"[a-z0-9][a-z0-9-]{0,15}")  # short: the key is printed in a table column


@dataclass(frozen=True)
class Source:
    key: str
    reference: str
    location: str


@dataclass(frozen=True)
class PublishedNumber:
    """One number of ``published.csv`` (percent or points); empty protocol fields are ``""``/None."""

    method: str
    dataset: str
    metric: str
    value: float
    std: float | None
    bound: str
    average_kind: str
    backbone: str
    selection: str
    seeds: int | None
    source: str
    note: str
    shown: str = ""  # the value as the source prints it (its precision), e.g. "88.02 ± 1.6"

    def covers(self, dataset: str) -> bool:
        return fnmatch.fnmatchcase(dataset, self.dataset)

    def applies_to(self, method: str, dataset: str, metric: str) -> bool:
        return self.method == method and self.metric == metric and self.covers(dataset)

    @property
    def names_dataset(self) -> bool:
        """False when the source did not say which dataset (a pattern such as ``spawrious-*``)."""
        return not any(ch in self.dataset for ch in "*?[")


@dataclass(frozen=True)
class Published:
    numbers: tuple[PublishedNumber, ...]
    sources: dict[str, Source]

    def lookup(self, method: str, dataset: str, metric: str) -> list[PublishedNumber]:
        return [n for n in self.numbers if n.applies_to(method, dataset, metric)]


def _read_rows(path: Path, columns: list[str]) -> list[tuple[int, dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames != columns:
                raise ConfigError(f"{path.name}: columns {reader.fieldnames}, expected {columns}")
            return [(number, {k: (v or "").strip() for k, v in row.items()})
                    for number, row in enumerate(reader, start=2)]
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror}); the package is incomplete") from None


def _number(where: str, name: str, text: str, low: float, high: float, optional: bool = False) -> float | None:
    if not text and optional:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {name} {text!r} is not a number") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{where}: {name} {value} is outside [{low}, {high}]")
    return value


def _parse_number(where: str, row: dict[str, str], sources: dict[str, Source]) -> PublishedNumber:
    for key in ("method", "dataset"):
        if not _NAME.fullmatch(row[key]):
            raise ConfigError(f"{where}: {key} {row[key]!r} is not a method/dataset name")
    if row["dataset"].endswith("-synth"):
        raise ConfigError(f"{where}: {row['dataset']} is a synthetic twin; papers report real datasets only")
    metric = row["metric"]
    if metric not in METRICS:
        raise ConfigError(f"{where}: metric {metric!r}; known: {', '.join(METRICS)}")
    low = 0.0 if metric in ACCURACY_METRICS else -100.0
    value = _number(where, "value", row["value"], low, 100.0)
    std = _number(where, "std", row["std"], 0.0, 100.0, optional=True)
    if row["bound"] not in BOUNDS:
        raise ConfigError(f"{where}: bound {row['bound']!r}; choose one of: (empty), up_to")
    if metric == "average_accuracy" and row["average_kind"] not in AVERAGES:
        raise ConfigError(f"{where}: an average_accuracy needs its average_kind, one of {', '.join(AVERAGES)}")
    if metric != "average_accuracy" and row["average_kind"]:
        raise ConfigError(f"{where}: average_kind applies to average_accuracy only")
    if row["backbone"] and not _NAME.fullmatch(row["backbone"]):
        raise ConfigError(f"{where}: backbone {row['backbone']!r} is not a backbone name")
    if row["selection"] and row["selection"] not in RULES:
        raise ConfigError(f"{where}: selection {row['selection']!r}; known: {', '.join(RULES)}")
    seeds = _number(where, "seeds", row["seeds"], 1, 10_000, optional=True)
    if seeds is not None and not float(seeds).is_integer():
        raise ConfigError(f"{where}: seeds {row['seeds']!r} is not a whole number")
    if row["source"] not in sources:
        raise ConfigError(f"{where}: source {row['source']!r} has no line in {SOURCES_FILE.name}")
    assert value is not None
    return PublishedNumber(row["method"], row["dataset"], metric, value, std, row["bound"], row["average_kind"],
                           row["backbone"], row["selection"], None if seeds is None else int(seeds), row["source"],
                           row["note"], row["value"] + (f" ± {row['std']}" if row["std"] else ""))


def parse_published(numbers_file: Path = NUMBERS_FILE, sources_file: Path = SOURCES_FILE) -> Published:
    """Read and check both files; ConfigError naming the file and line of the first bad row."""
    sources: dict[str, Source] = {}
    for line, row in _read_rows(sources_file, SOURCE_COLUMNS):
        where = f"{sources_file.name} line {line}"
        if not _KEY.fullmatch(row["key"]):
            raise ConfigError(f"{where}: key {row['key']!r}: lower case, digits and '-', at most 16 characters")
        if row["key"] in sources:
            raise ConfigError(f"{where}: key {row['key']!r} is listed twice")
        if not row["reference"] or not row["location"]:
            raise ConfigError(f"{where}: {row['key']} needs a reference and where it was read (location)")
        sources[row["key"]] = Source(row["key"], row["reference"], row["location"])
    numbers: list[PublishedNumber] = []
    seen: dict[tuple[str, str, str, str], int] = {}
    for line, row in _read_rows(numbers_file, NUMBER_COLUMNS):
        where = f"{numbers_file.name} line {line}"
        number = _parse_number(where, row, sources)
        key = (number.method, number.dataset, number.metric, number.source)
        if key in seen:
            raise ConfigError(f"{where}: the same method, dataset, metric and source as line {seen[key]}")
        seen[key] = line
        numbers.append(number)
    unused = set(sources) - {n.source for n in numbers}
    if unused:
        raise ConfigError(f"{sources_file.name}: source(s) {', '.join(sorted(unused))} back no number")
    return Published(tuple(numbers), sources)


@lru_cache(maxsize=1)
def load_published() -> Published:
    """The package's published numbers (checked, read once)."""
    return parse_published()
