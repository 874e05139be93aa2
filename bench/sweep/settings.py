"""A sweep's settings, from a sweep file (YAML/TOML) and/or flags: :class:`SweepSpec`, what runs (it
defines the sweep id), and :class:`LaunchOptions`, how to launch it. Validated here, before anything is
planned or launched: bad settings are one-line ConfigErrors."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.core import records
from bench.core.errors import ConfigError
from bench.core.precision_names import DEFAULT_PRECISION, check_name
from bench.core.selection import DEFAULT_RULE, RULES

STAGES = ("all", "search", "seeds")
# The launchers a sweep may name (bench.sweep.launchers.REGISTRY holds them, and checks it has these).
LAUNCHER_NAMES = ("local", "local-parallel", "slurm")
# Rules that give a validation score to compare draws by (``last`` has none; ``oracle-test`` is not valid).
SWEEP_RULES = tuple(name for name in RULES if name.startswith("val-"))


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep runs. Everything here except ``out``/``data_root``/``device``/``workers``/``deterministic``
    defines the sweep id; launch settings (partition, memory, ...) do not, so a sweep can be relaunched
    elsewhere."""

    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    seeds: int = 1
    n_hparams: int = 1
    stage: str = "all"
    search_seeds: int = 1
    select: str = DEFAULT_RULE
    epochs: int | None = None
    hparam_overrides: tuple[str, ...] = ()  # "KEY=VALUE" items: setting (sweep file key, flag) ``hparams``
    backbone: str | None = None
    weights: str | None = None
    data_options: tuple[tuple[str, str], ...] = ()
    data_root: str | None = None
    out: str = "results"
    device: str = "auto"
    workers: int = 0
    deterministic: bool = False  # like device: how the runs compute, not what; not in the sweep id
    precision: str = DEFAULT_PRECISION  # part of every run's identity (and the sweep id) when not the default
    compile: bool = False  # likewise

    def identity(self) -> dict[str, Any]:
        """The fields that define which runs the sweep plans."""
        spec = {
            "stage": self.stage,
            "methods": list(self.methods),
            "datasets": list(self.datasets),
            "n_hparams": self.n_hparams,
            "epochs": self.epochs,
            "hparams": list(self.hparam_overrides),  # named "hparams" as ever: sweep ids stay the same
            "backbone": self.backbone,
            "weights": self.weights,
            "data_options": dict(self.data_options),
        }
        # Only when not the default, so that the ids of existing sweeps stay the same.
        if self.precision != DEFAULT_PRECISION:
            spec["precision"] = self.precision
        if self.compile:
            spec["compile"] = True
        if self.stage in ("all", "seeds"):
            spec["seeds"] = self.seeds
        if self.stage in ("search", "seeds"):
            spec["search_seeds"] = self.search_seeds
        if self.stage == "seeds":
            spec["select"] = self.select
        return spec

    @property
    def sweep_id(self) -> str:
        return f"{self.stage}-{records.config_hash(self.identity())}"


@dataclass(frozen=True)
class LaunchOptions:
    """How to launch: the launcher and its resources. None leaves a SLURM setting to the cluster."""

    launcher: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str = "24:00:00"
    array_parallelism: int | None = None
    max_timeouts: int = 3
    sbatch_args: tuple[tuple[str, str | bool], ...] = ()

    @property
    def timeout_min(self) -> int:
        return parse_slurm_time(self.time)


# Settings (sweep file keys, flag destinations) named otherwise than their SweepSpec field.
SETTING_OF_FIELD = {"hparam_overrides": "hparams"}
SPEC_KEYS = {SETTING_OF_FIELD.get(f, f) for f in SweepSpec.__dataclass_fields__}
LAUNCH_KEYS = {f for f in LaunchOptions.__dataclass_fields__}
FILE_ONLY_ALIASES = {"slurm_account": "account", "slurm_qos": "qos", "data_option": "data_options",
                     "sbatch_arg": "sbatch_args"}
# What a sweep file may say about itself (a preset's title, the source of its protocol, notes): read by
# bench.sweep.presets, never part of the settings.
DESCRIPTION_KEYS = ("title", "source", "notes")


def parse_slurm_time(text: str) -> int:
    """SLURM time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not match:
        raise ConfigError(f"--time {text!r}: expected a SLURM time such as 90, 12:00:00 or 1-12:00:00")
    days, first, second, third = match.groups()
    if days is not None:  # D-H[:M[:S]]
        seconds = int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
    elif third is not None:  # H:M:S
        seconds = int(first) * 3600 + int(second) * 60 + int(third)
    elif second is not None:  # M:S
        seconds = int(first) * 60 + int(second)
    else:  # M
        seconds = int(first) * 60
    if seconds <= 0:
        raise ConfigError(f"--time {text!r}: must be positive")
    return math.ceil(seconds / 60)


def _as_list(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    raise ConfigError(f"{key}: expected a list or a comma-separated string, got {value!r}")


def _as_pairs(key: str, value: Any, allow_flag: bool = False) -> tuple[tuple[str, Any], ...]:
    """A mapping, or KEY=VALUE strings (KEY alone means a flag where ``allow_flag``), as sorted pairs."""
    if value is None:
        return ()
    if isinstance(value, dict):
        return tuple(sorted((str(k), v if isinstance(v, bool) else str(v)) for k, v in value.items()))
    pairs: dict[str, Any] = {}
    for item in _as_list(key, value) if isinstance(value, str) else value:
        item = str(item)
        if "=" in item:
            name, text = item.split("=", 1)
            pairs[name.strip()] = text.strip()
        elif allow_flag:
            pairs[item.strip()] = True
        else:
            raise ConfigError(f"{key} {item!r}: expected KEY=VALUE")
    return tuple(sorted(pairs.items()))


def _as_int(key: str, value: Any, minimum: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    try:
        number = int(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{key}: must be at least {minimum}, got {number}")
    return number


def read_sweep_file(path: str | Path) -> dict[str, Any]:
    """A sweep file's content as written (a mapping); ConfigError when it is missing or cannot be parsed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path}: not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            content = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            content = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"sweep file {path}: expected a .yaml, .yml or .toml file")
    except ConfigError:
        raise
    except Exception as error:  # parse errors of either format: one line with the parser's message
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"sweep file {path}: cannot parse it ({first_line})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"sweep file {path}: expected a mapping of settings at the top level")
    return content


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML (.yaml/.yml) or TOML (.toml) sweep file; keys as the flags, with ``_`` or ``-``,
    and SLURM settings either at the top level or in a ``slurm`` table. :data:`DESCRIPTION_KEYS` are
    left out."""
    path = Path(path)
    settings: dict[str, Any] = {}
    for key, value in read_sweep_file(path).items():
        if key in DESCRIPTION_KEYS:
            continue
        if key == "slurm" and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                settings[_normalise_key(path, sub_key)] = sub_value
        else:
            settings[_normalise_key(path, key)] = value
    return settings


def _normalise_key(path: Path, key: str) -> str:
    name = str(key).replace("-", "_")
    name = FILE_ONLY_ALIASES.get(name, name)
    if name not in SPEC_KEYS | LAUNCH_KEYS:
        known = ", ".join(sorted(SPEC_KEYS | LAUNCH_KEYS))
        raise ConfigError(f"sweep file {path}: unknown setting {key!r}; known: {known}")
    return name


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    return value


def build_settings(settings: dict[str, Any]) -> tuple[SweepSpec, LaunchOptions]:
    """Validate merged settings (file < flags) into a spec and launch options; ConfigError on bad input."""
    methods = _as_list("methods", settings.get("methods"))
    datasets = _as_list("datasets", settings.get("datasets"))
    if not methods:
        raise ConfigError("no methods: pass --methods erm,jtt,... or set methods in the sweep file")
    if not datasets:
        raise ConfigError("no datasets: pass --datasets waterbirds-synth,... or set datasets in the sweep file")
    stage = settings.get("stage") or "all"
    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
    select = settings.get("select") or DEFAULT_RULE
    if select not in SWEEP_RULES:
        raise ConfigError(f"--select {select!r}: a sweep compares draws by a validation score; "
                          f"choose one of {', '.join(SWEEP_RULES)}")
    hparams = settings.get("hparams")
    if isinstance(hparams, dict):
        hparam_items = tuple(f"{k}={v}" for k, v in sorted(hparams.items()))
    else:
        hparam_items = tuple(_as_list("hparams", hparams) if isinstance(hparams, str) else (hparams or ()))
    spec = SweepSpec(
        methods=tuple(dict.fromkeys(methods)),
        datasets=tuple(dict.fromkeys(datasets)),
        seeds=_as_int("seeds", settings.get("seeds", 1), 1),  # type: ignore[arg-type]
        n_hparams=_as_int("n_hparams", settings.get("n_hparams", 1), 1),  # type: ignore[arg-type]
        stage=stage,
        search_seeds=_as_int("search_seeds", settings.get("search_seeds", 1), 1),  # type: ignore[arg-type]
        select=select,
        epochs=_as_int("epochs", settings.get("epochs"), 1, optional=True),
        hparam_overrides=tuple(str(h) for h in hparam_items),
        backbone=settings.get("backbone"),
        weights=settings.get("weights"),
        data_options=_as_pairs("data_options", settings.get("data_options")),
        data_root=str(settings["data_root"]) if settings.get("data_root") else None,
        out=str(settings.get("out") or "results"),
        device=str(settings.get("device") or "auto"),
        workers=_as_int("workers", settings.get("workers", 0), 0),  # type: ignore[arg-type]
        deterministic=_as_bool("deterministic", settings.get("deterministic", False)),
        precision=check_name(str(settings.get("precision") or DEFAULT_PRECISION)),
        compile=_as_bool("compile", settings.get("compile", False)),
    )
    launcher = settings.get("launcher") or "local"
    if launcher not in LAUNCHER_NAMES:
        raise ConfigError(f"--launcher {launcher!r}: choose one of {', '.join(LAUNCHER_NAMES)}")
    mem = settings.get("mem")
    if mem is not None and not re.fullmatch(r"\d+[KMGT]?B?", str(mem).strip(), flags=re.IGNORECASE):
        raise ConfigError(f"--mem {mem!r}: expected a SLURM memory size such as 32G or 16000M")
    options = LaunchOptions(
        launcher=launcher,
        partition=settings.get("partition"),
        account=settings.get("account"),
        qos=settings.get("qos"),
        constraint=settings.get("constraint"),
        gpus_per_task=_as_int("gpus_per_task", settings.get("gpus_per_task"), 0, optional=True),
        cpus_per_task=_as_int("cpus_per_task", settings.get("cpus_per_task"), 1, optional=True),
        mem=str(mem).strip() if mem is not None else None,
        time=str(settings.get("time") or "24:00:00"),
        array_parallelism=_as_int("array_parallelism", settings.get("array_parallelism"), 1, optional=True),
        max_timeouts=_as_int("max_timeouts", settings.get("max_timeouts", 3), 0),  # type: ignore[arg-type]
        sbatch_args=_as_pairs("sbatch_args", settings.get("sbatch_args"), allow_flag=True),
    )
    options.timeout_min  # noqa: B018  (validates --time now, not at submission)
    return spec, options
