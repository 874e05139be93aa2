"""The contract every registered method must keep, as check functions (tests/test_method_contract.py runs
them over the registry; a method's own test file then tests its math only).

Each check takes a method class and raises AssertionError, naming what broke, when the class breaks the
contract.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.core.backbones import SYMMETRIC_NORMALISATION, Classifier, build_backbone
from bench.core.dataset import InMemoryImages, SpuriousDataset, make_split
from bench.core.device_data import DeviceData
from bench.core.metrics import GroupStructure
from bench.core.precision import Precision
from bench.core.records import RunDir
from bench.trainer import Progress, seed_everything, train
from methods.base import Batch, Method, MethodContext, resolve_hparams

# Small enough for every method to train two epochs in about a second on a CPU.
PROTOCOL = {"backbone": "small-cnn", "pretrained": False, "optimizer": "adam", "lr": 3e-3, "batch_size": 16,
            "epochs": 2}
# Per method: what keeps its own stages short on the toy (JTT's identification, DFR's refits).
OVERRIDES: dict[str, dict[str, Any]] = {
    "jtt": {"id_epochs": 1, "upweight": 2},
    "dfr": {"n_refits": 2},
    "dfr-train": {"n_refits": 2},
}


class Interrupted(Exception):
    pass


def toy_dataset(seed: int = 0, scramble_train_groups: bool = False) -> SpuriousDataset:
    """Two classes, one binary attribute (four groups), 3x8x8 images: brightness is the class, the
    red channel the attribute (aligned with the class in 80% of training)."""
    rng = np.random.default_rng(seed)

    def split(name: str, counts: tuple[int, int, int, int]) -> Any:
        group = np.repeat(np.arange(4), counts)
        y, a = group // 2, group % 2
        pixels = rng.integers(0, 60, size=(len(y), 3, 8, 8))
        pixels[:, :, 2:6, 2:6] += (150 * y)[:, None, None, None]
        pixels[:, 0] += (80 * a)[:, None, None]
        if name == "train" and scramble_train_groups:
            # What a method that reads no training group must never notice (its own generator, so that
            # the other splits' pixels stay the same).
            a = np.random.default_rng(99).permutation(a)
        mask = torch.ones((len(y), 8, 8), dtype=torch.uint8)
        mask[:, 2:6, 2:6] = 0  # the core object is the centre square
        return make_split(name, torch.from_numpy(y), torch.from_numpy(a),
                          InMemoryImages(torch.from_numpy(pixels.clip(0, 255).astype(np.uint8))), [2],
                          spurious_mask=mask)

    splits = {"train": split("train", (40, 10, 10, 40)), "val": split("val", (8, 8, 8, 8)),
              "test": split("test", (8, 8, 8, 8))}
    return SpuriousDataset(name="contract-toy", class_names=["dark", "bright"], attr_names=["red"],
                           attr_value_names=[["no", "yes"]], splits=splits, average_kind="group_mean")


def hparams_for(cls: type[Method], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return resolve_hparams(cls, "contract-toy", PROTOCOL, {**OVERRIDES.get(cls.name, {}), **(overrides or {})})


def smooth_cnn(n_classes: int = 2) -> Classifier:
    """A small CNN with smooth activations (tanh, average pooling) for the precision checks.

    With ReLU and max-pooling (the small-cnn backbone), an input gradient is discontinuous in the input:
    a rounding that flips one max-pool choice or one ReLU moves the gradient to another pixel. ULE's
    saliency penalty is then ill-conditioned at initialisation (its parameter gradient changes by about
    14% in float32 when only the input is rounded to bf16), so a comparison of precisions on it would
    measure that, not whether a method computes correctly in mixed precision.
    """
    featurizer = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 16, 3, padding=1), nn.Tanh(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(featurizer, 16, n_classes)


def build(cls: type[Method], dataset: SpuriousDataset, seed: int = 0, precision: str = "fp32",
          overrides: dict[str, Any] | None = None, smooth: bool = False) -> tuple[Method, DeviceData]:
    """The method on the toy, with the small-cnn backbone (``smooth``: :func:`smooth_cnn`)."""
    hparams = hparams_for(cls, overrides)
    seed_everything(seed)
    arithmetic = Precision(precision)
    make_model = smooth_cnn if smooth else lambda: build_backbone("small-cnn", dataset.n_classes)
    context = MethodContext(hparams=hparams, dataset_info=dataset.info(), device=torch.device("cpu"),
                            make_model=make_model, seed=seed, precision=arithmetic)
    method = cls(context)
    data = DeviceData(dataset, torch.device("cpu"), cls.uses_train_group_labels(hparams),
                      normalisation=SYMMETRIC_NORMALISATION, masks_allowed=cls.uses_spurious_masks(hparams),
                      precision=arithmetic)
    return method, data


def _state_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _tensors(module_states: dict[str, Any]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(module_states)
    return found


def _parameters(method: Method) -> list[torch.Tensor]:
    return [p.detach().clone() for model in method.predictors().values() for p in model.parameters()]


def _first_gradient_stage(method: Method) -> Any:
    return next(stage for stage in method.stages() if stage.kind == "gradient" and stage.epochs > 0)


def _batch(method: Method, data: DeviceData, indices: torch.Tensor) -> Batch:
    return Batch(x=data.images("train", indices, train=True), y=data.labels("train")[indices], index=indices,
                 group=data.groups("train")[indices] if data.train_groups_allowed else None,
                 mask=data.spurious_masks("train", indices) if data.masks_allowed else None)


def check_builds_and_steps(cls: type[Method]) -> None:
    """It builds, has its primary predictor once its first stage began, and one update logs finite losses."""
    method, data = build(cls, toy_dataset())
    stage = _first_gradient_stage(method)
    method.begin_stage(stage, data, resuming=False)
    assert cls.primary in method.predictors(), f"{cls.name}: primary predictor {cls.primary!r} missing"
    method.begin_epoch(stage, 0)
    losses = method.update(_batch(method, data, torch.arange(16)))
    assert losses and all(isinstance(v, float) and math.isfinite(v) for v in losses.values()), \
        f"{cls.name}: update() must return finite float losses, got {losses}"


def check_state_round_trip(cls: type[Method]) -> None:
    """state_dict() -> a fresh instance of another seed -> load_state_dict(): the same state, and the
    next step moves both to the same parameters (an optimiser left out of the state breaks this)."""
    dataset = toy_dataset()
    method, data = build(cls, dataset, seed=0)
    stage = _first_gradient_stage(method)
    method.begin_stage(stage, data, resuming=False)
    method.begin_epoch(stage, 0)
    order = torch.randperm(data.n("train"), generator=torch.Generator().manual_seed(0))
    for start in (0, 16, 32):
        method.update(_batch(method, data, order[start:start + 16]))
    saved = torch.load(io.BytesIO(_state_bytes(method.state_dict())), weights_only=False)

    restored, restored_data = build(cls, dataset, seed=1)
    restored.begin_stage(stage, restored_data, resuming=True)
    restored.load_state_dict(saved)
    restored.begin_epoch(stage, 0)
    for a, b in zip(_parameters(method), _parameters(restored), strict=True):
        assert torch.equal(a, b), f"{cls.name}: load_state_dict() does not restore every model"
    state_a, state_b = _tensors(method.state_dict()), _tensors(restored.state_dict())
    assert len(state_a) == len(state_b) and all(torch.equal(a, b) for a, b in zip(state_a, state_b)), \
        f"{cls.name}: the restored state differs from the saved one"
    batch = order[48:64]
    torch.manual_seed(7)
    method.update(_batch(method, data, batch))
    torch.manual_seed(7)
    restored.update(_batch(restored, restored_data, batch))
    for a, b in zip(_parameters(method), _parameters(restored), strict=True):
        assert torch.equal(a, b), (f"{cls.name}: after a restore the next step differs (is an optimiser or "
                                   "per-example state missing from state_dict()?)")


def _run(cls: type[Method], folder: Path, interrupt_after: int | None, scramble: bool = False,
         precision: str = "fp32") -> tuple[RunDir, Method]:
    dataset = toy_dataset(scramble_train_groups=scramble)
    run_dir = RunDir(folder)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    # Low precisions on the smooth network: small-cnn's kernels are slow in bf16/fp16 on a CPU.
    smooth = precision != "fp32"
    method, data = build(cls, dataset, precision=precision, smooth=smooth)
    epochs = [0]

    def on_epoch_end() -> None:
        epochs[0] += 1
        if interrupt_after is not None and epochs[0] == interrupt_after:
            raise Interrupted

    structure = GroupStructure.from_info(dataset.info())
    try:
        train(method, data, run_dir, 0, structure, Progress(quiet=True), on_epoch_end)
    except Interrupted:
        method, data = build(cls, dataset, precision=precision, smooth=smooth)  # a new process: all from the checkpoint
        train(method, data, run_dir, 0, structure, Progress(quiet=True))
    return run_dir, method


def _evaluations(run_dir: RunDir) -> list[Any]:
    return [(r["stage"], r["epoch"], r["eval"], r["train"]) for r in run_dir.read_metrics()]


def check_resume_equals_uninterrupted(cls: type[Method], folder: Path, precision: str = "fp32") -> None:
    """Killed after its first epoch and resumed, a run records what an uninterrupted one records (in
    ``precision``: the fp16 gradient scales are part of the state)."""
    whole, _ = _run(cls, folder / "whole", None, precision=precision)
    resumed, _ = _run(cls, folder / "resumed", interrupt_after=1, precision=precision)
    assert _evaluations(resumed) == _evaluations(whole), f"{cls.name}: a resumed run differs from an uninterrupted one"
    final_whole = torch.load(whole.checkpoint, weights_only=False)["method"]
    final_resumed = torch.load(resumed.checkpoint, weights_only=False)["method"]
    assert all(torch.equal(a, b) for a, b in zip(_tensors(final_whole), _tensors(final_resumed), strict=True)), \
        f"{cls.name}: the resumed run ends in another state"
    assert final_whole.get("precision") == final_resumed.get("precision"), \
        f"{cls.name}: the resumed run ends with other gradient scales (is the precision's state saved?)"


# Tolerances of one step in bf16/fp16 against float32 on the smooth toy network, relative (in norm): about
# ten unit roundoffs (bf16 2**-8 = 3.9e-3, fp16 2**-11 = 4.9e-4), a few times what every method and every
# continuous ULE reading measured (at most 1.2e-2 in bf16, ULE's orthogonal distance, and 7.8e-4 in fp16;
# test_ule.py says why max-abs normalisation needs more). A method that steps on fp16's scaled gradients
# is off by a factor of thousands; one that skips autocast is caught by the steps being identical.
STEP_TOLERANCE = {"bf16": 3e-2, "fp16": 5e-3}
# For logged values (losses, ULE's saliency cosine), relative to max(|value|, 1); measured at most 1.4e-3
# (bf16) and 2.7e-4 (fp16).
LOSS_TOLERANCE = {"bf16": 3e-2, "fp16": 5e-3}
# Plain SGD without weight decay: the step is the gradient itself (Adam's first step is its sign, which
# flips with any rounding of a gradient entry near 0; weight decay would add the same term to both sides).
AGREEMENT_OPTIMIZER = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}
MAX_SKIPPED_STEPS = 20


def _one_step(cls: type[Method], precision: str, overrides: dict[str, Any] | None, epoch: int = 0,
              scales: dict[str, Any] | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor], Method]:
    settings = {**AGREEMENT_OPTIMIZER, **(overrides or {})}
    method, data = build(cls, toy_dataset(), precision=precision, overrides=settings, smooth=True)
    if scales is not None:
        method.precision.load_state_dict(scales)
    stage = _first_gradient_stage(method)
    method.begin_stage(stage, data, resuming=False)
    method.begin_epoch(stage, epoch)
    before = {name: _flat(model) for name, model in method.predictors().items()}
    indices = torch.randperm(data.n("train"), generator=torch.Generator().manual_seed(0))[:32]
    losses = method.update(_batch(method, data, indices))
    steps = {name: _flat(model) - before[name] for name, model in method.predictors().items()}
    return losses, steps, method


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def check_precision_agrees_with_fp32(cls: type[Method], precision: str, overrides: dict[str, Any] | None = None,
                                     epoch: int = 0, step_tolerance: float | None = None) -> None:
    """One step (in epoch ``epoch`` of the first stage) in ``precision`` logs the losses and moves every model
    as the float32 step does, within the stated tolerances, and not identically (the precision was
    applied); a model float32 does not move does not move. fp16 may skip its first steps when its
    gradients overflow at the initial scale, as GradScaler does; the step compared is the first one taken
    (the same batch from the same initialisation, at the scale it settled on). ``step_tolerance`` replaces
    :data:`STEP_TOLERANCE` for a step that is discontinuous in its inputs (see test_ule.py)."""
    reference_losses, reference_steps, _ = _one_step(cls, "fp32", overrides, epoch)
    scales = None
    for _ in range(MAX_SKIPPED_STEPS):
        scale = scales["scaler"]["scale"] if scales else Precision(precision).scaler.get_scale()
        losses, steps, method = _one_step(cls, precision, overrides, epoch, scales)
        if method.precision.scaler.get_scale() >= scale:  # no step skipped (always so without a scaler)
            break
        scales = method.precision.state_dict()  # a step overflowed and was skipped: take it at the lower scale
    else:
        raise AssertionError(f"{cls.name}: fp16 skipped {MAX_SKIPPED_STEPS} steps in a row")
    assert losses.keys() == reference_losses.keys(), f"{cls.name}: {precision} logs other values"
    for key, value in losses.items():
        expected = reference_losses[key]
        assert abs(value - expected) <= LOSS_TOLERANCE[precision] * max(abs(expected), 1.0), \
            f"{cls.name}: {key} = {value} in {precision}, {expected} in fp32"
    for name, step in steps.items():
        expected = reference_steps[name]
        if not expected.any():
            assert not step.any(), f"{cls.name}: the {name} moved in {precision}, not in fp32"
            continue
        error = float((step - expected).norm() / expected.norm())
        tolerance = step_tolerance or STEP_TOLERANCE[precision]
        assert error <= tolerance, f"{cls.name}: the {name}'s {precision} step is off by {error:.2e}"
        assert not torch.equal(step, expected), f"{cls.name}: the {name}'s {precision} step is float32's (no autocast?)"


def check_training_groups_only_when_declared(cls: type[Method], folder: Path) -> None:
    """A method that does not declare training group labels gets none, and trains identically when the
    training groups are scrambled; one that declares them gets them in every batch. Likewise, the
    spurious-region masks reach only a method that declares them."""
    hparams = hparams_for(cls)
    method, data = build(cls, toy_dataset())
    if not cls.uses_spurious_masks(hparams):
        try:
            data.spurious_masks("train", torch.arange(4))
        except RuntimeError:
            pass
        else:
            raise AssertionError(f"{cls.name}: spurious masks were handed to a method that does not declare them")
    if cls.uses_train_group_labels(hparams):
        assert torch.equal(data.groups("train"), toy_dataset().splits["train"].group.to(data.device))
        return
    try:
        data.groups("train")
    except RuntimeError:
        pass
    else:
        raise AssertionError(f"{cls.name}: training groups were handed to a method that does not declare them")
    _, plain = _run(cls, folder / "plain", None)
    _, scrambled = _run(cls, folder / "scrambled", None, scramble=True)
    same = all(torch.equal(a, b) for a, b in zip(_parameters(plain), _parameters(scrambled), strict=True))
    assert same, f"{cls.name}: its training depends on the training group labels"
