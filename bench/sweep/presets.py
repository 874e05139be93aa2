"""Presets: sweep files that reproduce a paper's main-table protocol, shipped with the package
(``bench/presets/<name>.yaml``; a checkout also shows them as ``presets/``).

A preset is an ordinary sweep file (bench.sweep.settings) with three descriptive keys: ``title``,
``source`` (where its protocol comes from) and ``notes`` (what differs from the paper, what was not
known). ``bench list --presets`` lists them; ``bench sweep presets/NAME.yaml`` (or just ``NAME``)
runs one from anywhere: a sweep file argument that is not a file is looked up among the presets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.core.errors import ConfigError
from bench.sweep.settings import read_sweep_file

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"
SUFFIX = ".yaml"


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    title: str
    source: str
    notes: str
    methods: tuple[str, ...]
    datasets: tuple[str, ...]


def _names(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def load_preset(path: Path) -> Preset:
    content = read_sweep_file(path)
    for key in ("title", "source"):
        if not isinstance(content.get(key), str) or not content[key].strip():
            raise ConfigError(f"preset {path.name}: needs a '{key}' (text)")
    return Preset(path.stem, path, " ".join(content["title"].split()), " ".join(content["source"].split()),
                  " ".join(str(content.get("notes", "")).split()), _names(content.get("methods")),
                  _names(content.get("datasets")))


def presets() -> list[Preset]:
    """Every packaged preset, by name."""
    return [load_preset(path) for path in sorted(PRESETS_DIR.glob(f"*{SUFFIX}"))]


def find_preset(argument: str) -> Path | None:
    """The packaged preset an argument names: ``NAME``, ``NAME.yaml`` or ``.../presets/NAME.yaml``."""
    path = Path(argument)
    if path.parent.name not in ("", "presets") or path.suffix not in ("", SUFFIX):
        return None
    candidate = PRESETS_DIR / f"{path.stem}{SUFFIX}"
    return candidate if candidate.is_file() else None


def resolve_sweep_file(argument: str) -> Path:
    """The sweep file to read: the path itself when it exists, else the packaged preset it names."""
    path = Path(argument).expanduser()
    if path.is_file():
        return path
    preset = find_preset(argument)
    if preset is not None:
        return preset
    raise ConfigError(f"sweep file {argument}: not found (nor a preset of that name; `bench list --presets` "
                      "lists them)")
