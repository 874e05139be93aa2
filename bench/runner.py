"""One run from a config: resolve it, check it, skip it if done, train it, write its records.

Used by ``bench run`` (seeds one after another in this process) and by sweeps (one run per job).
Everything that can be wrong with the user's input is checked in :func:`prepare` before any file
is written, so bad input leaves nothing half-written on disk. A run is trained under its lock
(``bench.run_lock.hold_run``); a user error met while training (an unreadable image, a damaged
checkpoint or metrics file) is recorded in failed.json before it is raised, so that a run never
looks resumable or done when it is neither.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from bench.core import records
from bench.core.artifacts import ArtifactStore
from bench.core.backbones import get_backbone, memory_format
from bench.core.device_data import DeviceData
from bench.core.errors import BenchError, ConfigError, DataError
from bench.core.metrics import GroupStructure
from bench.core.precision import Precision, check_available
from bench.core.precision_names import DEFAULT_PRECISION, check_name
from bench.core.records import RunDir
from bench.run_lock import describe_holder, hold_run
from bench.trainer import (
    NonFiniteLossError,
    Progress,
    failure_record,
    pick_device,
    seed_everything,
    train,
    use_deterministic_kernels,
)
from datasets import get_dataset, load_dataset, resolve_data_root
from methods import get_method
from methods.base import (
    TRAINING_HPARAMS,
    BaseRun,
    MethodContext,
    hparam_specs,
    parse_overrides,
    resolve_hparams,
    sample_hparams,
)

PACKAGES = ("torch", "torchvision", "numpy", "pandas", "scipy", "scikit-learn", "debias-bench")


@dataclass
class RunRequest:
    """What the user asked for (the flags of ``bench run``)."""

    method: str
    dataset: str
    hparam_overrides: list[str] = field(default_factory=list)  # the ``--hparams KEY=VALUE`` items
    epochs: int | None = None
    backbone: str | None = None
    data_root: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    out: str = "results"
    device: str = "auto"
    workers: int = 0
    # Hyperparameter draw of a sweep (methods.base.sample_hparams); 0 is the defaults.
    # ``hparam_overrides``, ``epochs`` and ``backbone`` still override the drawn values.
    draw: int = 0
    # Deterministic GPU kernels only (bench.trainer.use_deterministic_kernels). Not part of the run's
    # identity: it changes how the numbers are computed, not what is computed; recorded in config.json.
    deterministic: bool = False
    # The networks' arithmetic (bench.core.precision) and torch.compile. Part of the run's identity when not
    # the default (fp32, not compiled): they change the numbers a run computes, beyond rounding order.
    precision: str = DEFAULT_PRECISION
    compile: bool = False
    # Wait for another process that holds a run's lock instead of stopping with an error.
    wait: bool = False


@dataclass
class PreparedRun:
    """A checked, resolved request: everything needed to train any of its seeds."""

    request: RunRequest
    identity: dict[str, Any]  # what defines the run (hashed into its folder name)
    device: torch.device
    # The weights file the backbone starts from (bench.core.weights.LoadedWeights.record()), None: random.
    backbone_weights: dict[str, str] | None = None

    @property
    def hparams(self) -> dict[str, Any]:
        return self.identity["hparams"]

    def run_dir(self, seed: int) -> RunDir:
        return RunDir.for_run(self.request.out, self.request.dataset, self.request.method, self.identity, seed)


def run_identity(request: RunRequest) -> dict[str, Any]:
    """What defines the run (hence its folder), resolved and validated without building a model, so that
    sweeps can plan thousands of runs in seconds. Sets ``dataset_options["image_size"]`` as :func:`prepare`
    does.

    The identity covers the data the run reads: a synthetic twin's ``data_version`` (the code that
    generates it), and for a dataset read from files its ``data_fingerprint`` (the index files' content,
    every image file's path, size and modification time). The fingerprint needs the dataset loaded;
    ``datasets.load_dataset`` memoises that per process, so a sweep loads each dataset once.
    """
    method_cls = get_method(request.method)
    source = get_dataset(request.dataset)
    overrides: dict[str, Any] = parse_overrides(request.hparam_overrides)
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
    # The method's dataset options for this dataset (DFR's base-model augmentation), under the user's.
    for key, value in method_cls.data_options_per_dataset.get(request.dataset, {}).items():
        request.dataset_options.setdefault(key, value)
    # A twin exported as files (bench data export) is trained at the size it was written at by default.
    marker = source.export_marker(resolve_data_root(request.data_root))
    if source.accepts_image_size:
        default_size = marker["image_size"] if marker else get_backbone(hparams["backbone"]).input.size
        request.dataset_options.setdefault("image_size", default_size)
    source.check_options(request.dataset_options)
    weights = Path(request.weights).expanduser().resolve() if request.weights else None
    identity = {
        "method": request.method,
        "dataset": request.dataset,
        "dataset_options": request.dataset_options,
        "hparams": hparams,
        "weights": str(weights) if weights else None,
    }
    if data_version := source.data_version():
        identity["data_version"] = data_version
    # Likewise only when not the default, so that every float32, uncompiled run keeps its identity.
    if check_name(request.precision) != DEFAULT_PRECISION:
        identity["precision"] = request.precision
    if request.compile:
        if reason := method_cls.double_backward(hparams):
            raise ConfigError(f"--compile: {reason}, which torch.compile cannot compile; run without --compile")
        identity["compile"] = True
    if source.needs_data_root:
        dataset = load_dataset(request.dataset, request.data_root, request.dataset_options)
        identity["data_fingerprint"] = dataset.data_fingerprint
    # An exported twin says so in its identity (its fingerprint alone already tells it from the real files).
    if marker:
        identity["synthetic_export"] = {key: marker[key] for key in ("twin", "data_version", "image_size")}
    return identity


def check_out_folder(out: str | Path) -> None:
    """ConfigError unless ``out`` is (or can be made) a folder this process can write in; writes nothing."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder; pass the folder to write the results in")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, not a folder; pass another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot write in {existing} (read-only file system or no permission); "
                          "pass a folder you can write to")


def prepare(request: RunRequest) -> PreparedRun:
    """Resolve and validate a request; loads the dataset and builds the model once to fail early."""
    identity = run_identity(request)
    hparams = identity["hparams"]
    check_out_folder(request.out)
    dataset = load_dataset(request.dataset, request.data_root, request.dataset_options)
    if get_method(request.method).uses_spurious_masks(hparams) and not dataset.has_spurious_masks:
        raise ConfigError(f"method {request.method} needs the spurious-region masks that only some synthetic twins "
                          f"provide (waterbirds-synth, urbancars-synth, spawrious-synth); {request.dataset} has none")
    device = pick_device(request.device)
    check_available(request.precision, device)
    weights = Path(identity["weights"]) if identity["weights"] else None
    backbone = get_backbone(hparams["backbone"])
    backbone.check_image_size(dataset.image_shape)
    model = backbone.build(dataset.n_classes, dataset.image_shape[0], hparams["pretrained"], weights)
    loaded = model.loaded_weights.record() if model.loaded_weights is not None else None
    return PreparedRun(request=request, identity=identity, device=device, backbone_weights=loaded)


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


def find_base_run(prepared: PreparedRun, seed: int) -> RunDir | None:
    """The finished run whose model this run's first stage would train again, if there is one.

    For a method with a ``base_method`` (DFR: ``erm``): the finished run of that method under the same
    ``--out`` with this run's dataset, dataset options, weights, seed and training hparams (the shared
    ones of ``TRAINING_HPARAMS``), found by the identity ``run_identity`` gives it; None otherwise.
    """
    base_method = get_method(prepared.request.method).base_method
    if base_method is None:
        return None
    request = prepared.request
    base_request = dataclasses.replace(
        request,
        method=base_method,
        hparam_overrides=[f"{name}={prepared.hparams[name]}" for name in TRAINING_HPARAMS],
        epochs=None,
        backbone=None,
        dataset_options=dict(request.dataset_options),
        draw=0,
    )
    base_dir = RunDir.for_run(request.out, request.dataset, base_method, run_identity(base_request), seed)
    return base_dir if base_dir.is_done() and base_dir.checkpoint.exists() else None


def _base_run(run_dir: RunDir, out: str, decided: str | None) -> BaseRun | None:
    """The :class:`BaseRun` of a decision recorded in config.json (a folder relative to ``out``)."""
    if decided is None:
        return None
    checkpoint = RunDir(Path(out) / decided).checkpoint

    def load_state() -> dict[str, Any]:
        try:
            return torch.load(checkpoint, map_location="cpu", weights_only=False)["method"]
        except (OSError, RuntimeError, KeyError) as error:
            raise DataError(f"{run_dir.path}: cannot read the base run's checkpoint {checkpoint} ({error}); "
                            "rerun with --force to train the base model here") from error

    return BaseRun(source=decided, load_state=load_state)


# What a resumed run must find in config.json as the dataset gives it now: the group structure its
# records count under (the names of classes, attribute values and groups, in order) and the counts.
RESUME_CHECKED_INFO = ("class_names", "attr_names", "attr_value_names", "group_names", "group_counts")


def check_resumed_groups(run_dir: RunDir, recorded: dict[str, Any], info: dict[str, Any]) -> None:
    """DataError when the dataset's groups differ from those the run started with (its config.json)."""
    started = recorded.get("dataset_info") or {}
    for key in RESUME_CHECKED_INFO:
        if key in started and started[key] != info[key]:
            raise DataError(
                f"{run_dir.config}: the dataset's {key.replace('_', ' ')} are now {_brief(info[key])}, but this run "
                f"started with {_brief(started[key])}; its records would count under the wrong groups, so it "
                "cannot resume: rerun with --force to restart it")


def _brief(value: Any, limit: int = 120) -> str:
    text = records.canonical_json(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finished_result(run_dir: RunDir) -> dict[str, Any] | None:
    """final.json's content marked ``skipped`` when the run is done; None when it is not; DataError when
    a final.json is there but does not record a finished run."""
    problem = run_dir.final_problem()
    if problem is not None:
        raise DataError(f"{problem}; the run's result is lost: rerun with --force to train it again")
    return {**run_dir.read_final(), "skipped": True} if run_dir.is_done() else None


def execute(prepared: PreparedRun, seed: int, quiet: bool = False, force: bool = False) -> dict[str, Any]:
    """Train one seed (or return its finished result) under the run's lock; writes the run folder.

    Returns final.json's content, or a failure record (also written as failed.json) if training raised.
    A user error (BenchError) met while training is written as failed.json too, then raised.
    RunHeldError when another live process trains the run (unless the request says to wait).
    """
    run_dir = prepared.run_dir(seed)
    if not force and (done := finished_result(run_dir)) is not None:
        return done

    def say_waiting(holder: dict[str, Any]) -> None:
        print(f"seed {seed}: waiting for {describe_holder(holder)}, which is training this run", file=sys.stderr)

    with hold_run(run_dir, wait=prepared.request.wait, on_wait=say_waiting):
        if not force and (done := finished_result(run_dir)) is not None:  # finished while we waited
            return done
        if force:
            for name in (records.FINAL_FILE, records.FAILED_FILE, records.CHECKPOINT_FILE, records.METRICS_FILE,
                         records.CONFIG_FILE):
                (run_dir.path / name).unlink(missing_ok=True)
        run_dir.failed.unlink(missing_ok=True)
        records.remove_temporaries(run_dir.path)  # left by a writer that was killed; we hold the lock
        try:
            return _train_seed(prepared, seed, run_dir, quiet)
        except BenchError as error:
            try:
                records.atomic_write_json(run_dir.failed, failure_record(error))
            except BenchError:
                pass  # the file system refuses writes; the error raised says why
            raise


def _train_seed(prepared: PreparedRun, seed: int, run_dir: RunDir, quiet: bool) -> dict[str, Any]:
    request = prepared.request
    dataset = load_dataset(request.dataset, request.data_root, request.dataset_options)
    method_cls = get_method(request.method)
    backbone = get_backbone(prepared.hparams["backbone"])
    info = dataset.info()
    structure = GroupStructure.from_info(info)
    uses_train_groups = method_cls.uses_train_group_labels(prepared.hparams)
    uses_masks = method_cls.uses_spurious_masks(prepared.hparams)
    if run_dir.config.exists():  # a resumed run keeps the decision it started with, and its groups
        try:
            recorded = run_dir.read_config()
        except DataError as error:
            raise DataError(f"{error}; rerun with --force to restart the run") from None
        check_resumed_groups(run_dir, recorded, info)
        base_run = recorded.get("base_run")
    else:
        found = find_base_run(prepared, seed)
        base_run = str(found.path.relative_to(request.out)) if found is not None else None
    config = {
        **prepared.identity,
        "seed": seed,
        "hparams_draw": request.draw,
        "config_hash": records.config_hash(prepared.identity),
        "dataset_info": info,
        "primary": method_cls.primary,
        "uses_train_group_labels": uses_train_groups,
        "uses_spurious_masks": uses_masks,
        "base_run": base_run,
        "backbone_input": backbone.input.record(),
        "backbone_weights": prepared.backbone_weights,
        "paper": method_cls.paper,
        "method_caveat": method_cls.caveat,
        "device": str(prepared.device),
        # CPU results are bit-identical for a seed only at the same thread count (it sets the order of
        # float sums), so it is recorded with the versions.
        "torch_threads": torch.get_num_threads(),
        "deterministic": request.deterministic,
        "precision": request.precision,
        "compile": request.compile,
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
        model = backbone.build(dataset.n_classes, dataset.image_shape[0], hparams["pretrained"], weights)
        return model.to(memory_format=memory_format(prepared.device))

    precision = Precision(request.precision, prepared.device)
    context = MethodContext(
        hparams=hparams,
        dataset_info=info,
        device=prepared.device,
        make_model=make_model,
        seed=seed,
        artifacts=ArtifactStore(run_dir.path),
        base_run=_base_run(run_dir, request.out, base_run),
        precision=precision,
        compile=request.compile,
    )
    progress = Progress(quiet=quiet, label=f"{request.method} {request.dataset} seed{seed}")
    data = None
    try:
        method = method_cls(context)
        data = DeviceData(dataset, prepared.device, uses_train_groups, request.workers,
                          normalisation=backbone.input.normalisation, masks_allowed=uses_masks, precision=precision)
        final = train(method, data, run_dir, seed, structure, progress)
    except (NonFiniteLossError, RuntimeError, ValueError, OSError) as error:
        failure = failure_record(error)
        records.atomic_write_json(run_dir.failed, failure)
        return failure
    finally:
        if data is not None:
            data.close()
    final.update({"method": request.method, "dataset": request.dataset, "seed": seed,
                  "config_hash": config["config_hash"], "run_dir": str(run_dir.path)})
    records.atomic_write_json(run_dir.final, final)
    return final
