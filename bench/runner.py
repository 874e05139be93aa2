"""One run from a config: resolve it, check it, skip it if done, train it, write its records.

Used by ``bench run`` (seeds one after another in this process) and by sweeps (one run per job).
Everything that can be wrong with the user's input is checked in :func:`prepare` before any file
is written, so bad input leaves nothing half-written on disk.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from bench import records
from bench.backbones import INPUT_SIZE, build_backbone
from bench.errors import ConfigError
from bench.metrics import GroupStructure
from bench.records import RunDir
from bench.trainer import (
    NonFiniteLossError,
    Progress,
    TrainData,
    failure_record,
    pick_device,
    seed_everything,
    train,
    use_deterministic_kernels,
)
from datasets import get_dataset, load_dataset
from methods import get_method
from methods.base import MethodContext, hparam_specs, parse_overrides, resolve_hparams, sample_hparams

PACKAGES = ("torch", "torchvision", "numpy", "pandas", "scipy", "scikit-learn", "debias-bench")


@dataclass
class RunRequest:
    """What the user asked for (the flags of ``bench run``)."""

    method: str
    dataset: str
    hparams: list[str] = field(default_factory=list)
    epochs: int | None = None
    backbone: str | None = None
    data_root: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    out: str = "results"
    device: str = "auto"
    workers: int = 0
    # Hyperparameter draw of a sweep (methods.base.sample_hparams); 0 is the defaults. ``hparams``,
    # ``epochs`` and ``backbone`` still override the drawn values.
    draw: int = 0
    # Deterministic GPU kernels only (bench.trainer.use_deterministic_kernels). Not part of the run's
    # identity: it changes how the numbers are computed, not what is computed; recorded in config.json.
    deterministic: bool = False


@dataclass
class PreparedRun:
    """A checked, resolved request: everything needed to train any of its seeds."""

    request: RunRequest
    identity: dict[str, Any]  # what defines the run (hashed into its folder name)
    device: torch.device

    @property
    def hparams(self) -> dict[str, Any]:
        return self.identity["hparams"]

    def run_dir(self, seed: int) -> RunDir:
        return RunDir.for_run(self.request.out, self.request.dataset, self.request.method, self.identity, seed)


def run_identity(request: RunRequest) -> dict[str, Any]:
    """What defines the run (hence its folder), resolved and validated without loading data or building
    a model, so that sweeps can plan thousands of runs in seconds. Sets ``dataset_options["image_size"]``
    as :func:`prepare` does."""
    method_cls = get_method(request.method)
    source = get_dataset(request.dataset)
    overrides: dict[str, Any] = parse_overrides(request.hparams)
    if request.epochs is not None:
        overrides["epochs"] = request.epochs
    if request.backbone is not None:
        overrides["backbone"] = request.backbone
    if request.draw < 0:
        raise ConfigError(f"hyperparameter draw {request.draw}: must be >= 0")
    if request.draw:
        # Only the tuned hparams are drawn; the user's overrides still win over them.
        drawn = sample_hparams(method_cls, request.dataset, source.training_defaults, request.draw)
        tuned = {name: drawn[name] for name, spec in hparam_specs(method_cls).items() if spec.search is not None}
        overrides = {**tuned, **overrides}
    hparams = resolve_hparams(method_cls, request.dataset, source.training_defaults, overrides)
    if source.accepts_image_size:
        request.dataset_options.setdefault("image_size", INPUT_SIZE[hparams["backbone"]])
    weights = Path(request.weights).expanduser().resolve() if request.weights else None
    identity = {
        "method": request.method,
        "dataset": request.dataset,
        "dataset_options": request.dataset_options,
        "hparams": hparams,
        "weights": str(weights) if weights else None,
    }
    # Only where a source has one, so that the identities of datasets read from files stay as they were.
    if data_version := source.data_version():
        identity["data_version"] = data_version
    return identity


def prepare(request: RunRequest) -> PreparedRun:
    """Resolve and validate a request; loads the dataset and builds the model once to fail early."""
    identity = run_identity(request)
    hparams = identity["hparams"]
    dataset = load_dataset(request.dataset, request.data_root, request.dataset_options)
    device = pick_device(request.device)
    weights = Path(identity["weights"]) if identity["weights"] else None
    build_backbone(hparams["backbone"], dataset.n_classes, dataset.image_shape[0], hparams["pretrained"], weights)
    return PreparedRun(request=request, identity=identity, device=device)


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def execute(prepared: PreparedRun, seed: int, quiet: bool = False, force: bool = False) -> dict[str, Any]:
    """Train one seed (or return its finished result); writes the run folder. Returns final.json's content,
    or a failure record (also written as failed.json) if training raised."""
    request = prepared.request
    run_dir = prepared.run_dir(seed)
    if run_dir.is_done() and not force:
        return {**run_dir.read_final(), "skipped": True}
    if force and run_dir.path.exists():
        for name in (records.FINAL, records.FAILED, records.CHECKPOINT, records.METRICS):
            (run_dir.path / name).unlink(missing_ok=True)
    run_dir.failed.unlink(missing_ok=True)

    dataset = load_dataset(request.dataset, request.data_root, request.dataset_options)
    method_cls = get_method(request.method)
    info = dataset.info()
    structure = GroupStructure.from_info(info)
    config = {
        **prepared.identity,
        "seed": seed,
        "hparams_draw": request.draw,
        "config_hash": records.config_hash(prepared.identity),
        "dataset_info": info,
        "primary": method_cls.primary,
        "uses_train_group_labels": method_cls.uses_train_group_labels,
        "paper": method_cls.paper,
        "device": str(prepared.device),
        # CPU results are bit-identical for a seed only at the same thread count (it sets the order of
        # float sums), so it is recorded with the versions.
        "torch_threads": torch.get_num_threads(),
        "deterministic": request.deterministic,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "command": sys.argv,
        "host": platform.node(),
        "created": time.time(),
    }
    if not run_dir.config.exists():
        records.atomic_write_json(run_dir.config, config)

    if request.deterministic:
        use_deterministic_kernels()
    seed_everything(seed)
    weights = Path(prepared.identity["weights"]) if prepared.identity["weights"] else None
    hparams = prepared.hparams

    def make_model():  # type: ignore[no-untyped-def]
        return build_backbone(
            hparams["backbone"], dataset.n_classes, dataset.image_shape[0], hparams["pretrained"], weights
        )

    context = MethodContext(
        hparams=hparams,
        dataset_info=info,
        device=prepared.device,
        make_model=make_model,
        seed=seed,
        extras={"run_dir": run_dir, "out": request.out, "request": request},
    )
    progress = Progress(quiet=quiet, label=f"{request.method} {request.dataset} seed{seed}")
    try:
        method = method_cls(context)
        data = TrainData(dataset, prepared.device, method_cls.uses_train_group_labels, request.workers)
        final = train(method, data, run_dir, seed, structure, progress)
    except (NonFiniteLossError, RuntimeError, ValueError, OSError) as error:
        failure = failure_record(error)
        records.atomic_write_json(run_dir.failed, failure)
        return failure
    final.update({"method": request.method, "dataset": request.dataset, "seed": seed,
                  "config_hash": config["config_hash"], "run_dir": str(run_dir.path)})
    records.atomic_write_json(run_dir.final, final)
    return final
