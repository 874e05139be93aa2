"""The method interface, the hyperparameter declarations and their resolution.

A method is one file holding only its own math: a subclass of :class:`Method` registered with
``@register_method``. The shared trainer (bench.trainer) owns the data loading, the evaluation,
the records and the checkpoints; it talks to a method through this small interface, and a method
talks to the harness only through its :class:`MethodContext` and the :class:`DeviceData` it is
handed (no files, no records, no other runs):

* ``stages()``: the method's training stages, each ``gradient`` (batches -> ``update``) or ``fit``
  (one call to ``fit``, e.g. DFR's last-layer refit). JTT has two gradient stages; ERM one. A pure
  function of the hparams and the context.
* ``begin_stage(stage, data, resuming)``: set up models/optimisers for a stage (JTT computes its
  error set here, from the stage-1 model, through ``data``).
* ``begin_epoch(stage, epoch)``: called at the start of every epoch, including the first one after a
  resume (ULE's warm-up position, JTT's training-pass bookkeeping).
* ``epoch_indices(...)``: the order of training examples for one epoch (GroupDRO samples groups
  uniformly, JTT upsamples its error set); pure: the same arguments give the same order.
* ``update(batch)``: one optimisation step on a batch, returns the losses to log. Its forward and
  backward passes and its optimiser steps go through ``self.precision`` (see :class:`MethodContext`).
* ``predictors()``: the models to evaluate, by name; ``primary`` names the method's result (ULE's
  teacher), the others are recorded beside it (ULE's student).
* ``state_dict()``/``load_state_dict()``: everything needed to resume; by default every module,
  optimiser and scheduler attribute plus ``extra_state()``.

Hyperparameters are declared once (:class:`Hparam`): type, valid range, the random-search
distribution used by sweeps, and a sentence on what it changes. Values resolve in this order, each
layer overriding the previous ones: every hparam's declared default (the shared training ones of
:data:`TRAINING_HPARAMS` and the method's own) < the dataset's training protocol
(``DatasetSource.training_defaults``, only the keys the method has) < the method's per-dataset
defaults (``defaults_per_dataset``) < the user's ``--hparams``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.core.artifacts import ArtifactStore
from bench.core.backbones import Classifier, backbone_problem, compile_model
from bench.core.device_data import DeviceData
from bench.core.errors import ConfigError
from bench.core.precision import Precision

# --------------------------------------------------------------------------------------------
# Hyperparameters


@dataclass(frozen=True)
class Hparam:
    """One hyperparameter: default, type, valid range, random-search distribution and meaning."""

    default: Any
    doc: str
    kind: type = float
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    search: Callable[[np.random.Generator], Any] | None = None  # None: not tuned by sweeps
    # Values a user may plausibly try that belong elsewhere, each with the pointer shown in the error.
    refused: dict[Any, str] | None = None
    # For values no fixed list can hold (any timm model): returns why a parsed value is invalid, or None.
    check: Callable[[Any], str | None] | None = None

    def parse(self, name: str, value: Any) -> Any:
        """Convert a ``--hparams`` string (or a Python value) and check it; ConfigError if invalid."""
        try:
            if self.kind is bool:
                if isinstance(value, str):
                    lowered = value.strip().lower()
                    if lowered not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    parsed: Any = lowered in ("true", "1", "yes")
                else:
                    parsed = bool(value)
            elif self.kind is int:
                as_float = float(value)
                if not as_float.is_integer():
                    raise ValueError(value)
                parsed = int(as_float)
            elif self.kind is float:
                parsed = float(value)
                if not math.isfinite(parsed):
                    raise ValueError(value)
            else:
                parsed = str(value)
        except (TypeError, ValueError):
            raise ConfigError(f"hparam {name}={value!r}: expected {self.kind.__name__}") from None
        if self.refused and parsed in self.refused:
            raise ConfigError(f"hparam {name}={parsed!r}: {self.refused[parsed]}")
        if self.choices is not None and parsed not in self.choices:
            raise ConfigError(f"hparam {name}={parsed!r}: choose one of {', '.join(map(str, self.choices))}")
        if self.check is not None and (problem := self.check(parsed)):
            raise ConfigError(f"hparam {name}={parsed!r}: {problem}")
        if self.low is not None and parsed < self.low:
            raise ConfigError(f"hparam {name}={parsed!r}: must be >= {self.low}")
        if self.high is not None and parsed > self.high:
            raise ConfigError(f"hparam {name}={parsed!r}: must be <= {self.high}")
        return parsed


def log_uniform(low_exp: float, high_exp: float) -> Callable[[np.random.Generator], float]:
    """10 ** U(low_exp, high_exp)."""
    return lambda rng: float(10 ** rng.uniform(low_exp, high_exp))


def uniform(low: float, high: float) -> Callable[[np.random.Generator], float]:
    return lambda rng: float(rng.uniform(low, high))


def one_of(*values: Any) -> Callable[[np.random.Generator], Any]:
    return lambda rng: values[int(rng.integers(len(values)))]


# Shared by every method: the training protocol. Datasets set their own values (training_defaults).
TRAINING_HPARAMS: dict[str, Hparam] = {
    "backbone": Hparam("small-cnn", "network architecture: a built-in backbone or timm/<model> (bench list)", str,
                       check=backbone_problem),
    "pretrained": Hparam(False, "start from the backbone's ImageNet weights (bench list says where they come from)",
                         bool),
    "optimizer": Hparam("sgd", "optimiser of every model the method trains", str, choices=("sgd", "adam")),
    "lr": Hparam(1e-3, "learning rate", float, low=0.0, search=log_uniform(-4, -2)),
    "weight_decay": Hparam(1e-4, "L2 weight decay (torch convention)", float, low=0.0, search=log_uniform(-6, -2)),
    "momentum": Hparam(0.9, "SGD momentum (ignored by Adam)", float, low=0.0, high=1.0),
    "batch_size": Hparam(128, "training batch size", int, low=1, search=one_of(32, 64, 128)),
    "epochs": Hparam(10, "training epochs (of the main stage)", int, low=1),
}


def _hparam_rng(draw: int, name: str) -> np.random.Generator:
    # Seeded by the draw index and the name alone: adding an hparam does not change the others,
    # and every seed of a sweep gets the same draw (unlike DomainBed's per-trial draws).
    return np.random.default_rng([draw, zlib.crc32(name.encode())])


# --------------------------------------------------------------------------------------------
# The interface


@dataclass(frozen=True)
class Stage:
    """A training stage. ``selectable``: its evaluations may be picked by model selection."""

    name: str
    epochs: int
    kind: str = "gradient"  # "gradient": batches -> update(); "fit": one call to fit()
    selectable: bool = True


@dataclass
class Batch:
    """One training batch. ``group`` is None unless the method declares it uses training groups,
    ``mask`` (``[B, 1, H, W]``, 1 on the spurious region) unless it declares it uses spurious masks."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor  # positions in the training split (per-example state: LfF, JTT)
    group: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class BaseRun:
    """A finished run whose final model a method starts from instead of training it again.

    Found by the runner (``bench.runner.find_base_run``: a finished run of the method's
    ``base_method`` with this run's dataset and training hparams), recorded in ``config.json`` and
    handed over here. ``source`` says which run it is (for the record); ``load_state`` returns that
    run's method state (its ``state_dict()`` after the last epoch).
    """

    source: str
    load_state: Callable[[], dict[str, Any]]


@dataclass
class MethodContext:
    """What a method is given: resolved hparams, the dataset's description, a model factory, the run's
    artifact store and base run (see :class:`BaseRun`), its precision and whether its models are compiled.

    ``precision`` (:class:`bench.core.precision.Precision`) is how the networks compute: a method runs its
    forward passes through ``precision.forward``, its backward passes through ``precision.backward`` (or
    ``precision.input_gradient`` for gradients with respect to the inputs) and its optimiser steps
    through ``precision.step``; for fp32 these are exactly ``model(x)``, ``loss.backward()`` and
    ``optimizer.step()``. ``compile``: :meth:`Method.new_model` compiles every model it builds.
    """

    hparams: dict[str, Any]
    dataset_info: dict[str, Any]
    device: torch.device
    make_model: Callable[[], Classifier]
    seed: int
    artifacts: ArtifactStore = field(default_factory=ArtifactStore)
    base_run: BaseRun | None = None
    precision: Precision = field(default_factory=Precision)
    compile: bool = False


def erm_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             precision: Precision) -> tuple[torch.Tensor, float]:
    """One plain cross-entropy step (ERM's): returns the logits (computed before the step) and the loss.

    Every method whose step is ERM's calls this, so that for the same seed and batches its model is
    bit-identical to an ``erm`` run's (DFR reuses finished ERM runs on that ground).
    """
    logits = precision.forward(model, x)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    precision.backward(loss)
    precision.step(optimizer)
    return logits, loss.item()


class Method:
    """Base class of every method; see the module docstring for the protocol."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    # The method's own hyperparameters (the shared training ones are TRAINING_HPARAMS).
    own_hparams: ClassVar[dict[str, Hparam]] = {}
    # Per dataset name: values of hparams (own or training) that override the dataset's protocol.
    defaults_per_dataset: ClassVar[dict[str, dict[str, Any]]] = {}
    # Per dataset name: dataset options (``--data-option``) the method's protocol sets; the user's win.
    data_options_per_dataset: ClassVar[dict[str, dict[str, Any]]] = {}
    primary: ClassVar[str] = "model"
    # Shown wherever the method's results are printed (bench list, bench run's table, the report): what a
    # reader must know before comparing its numbers (ULE: a reconstruction, and what it showed here).
    caveat: ClassVar[str] = ""
    # A method whose first stage trains exactly what a finished run of this method trained (DFR:
    # "erm") gets that run as ``context.base_run`` when there is one.
    base_method: ClassVar[str | None] = None

    @classmethod
    def uses_train_group_labels(cls, hparams: Mapping[str, Any]) -> bool:
        """Whether training batches carry group labels (and ``data.groups("train")`` answers)."""
        return False

    @classmethod
    def uses_spurious_masks(cls, hparams: Mapping[str, Any]) -> bool:
        """Whether training batches carry the spurious-region masks (only the twins have them)."""
        return False

    @classmethod
    def double_backward(cls, hparams: Mapping[str, Any]) -> str | None:
        """Why a step differentiates through a gradient (a double backward, which torch.compile cannot
        compile, so that ``--compile`` is refused), in a clause for the error; None when it does not."""
        return None

    def __init__(self, context: MethodContext) -> None:
        self.context = context
        self.hp = context.hparams
        self.device = context.device
        self.precision = context.precision
        self.n_classes: int = context.dataset_info["n_classes"]
        self.n_groups: int = context.dataset_info["n_groups"]

    # -- helpers for subclasses ---------------------------------------------------------------
    def new_model(self) -> Classifier:
        """A freshly initialised backbone on the method's device (compiled with ``--compile``)."""
        model = self.context.make_model().to(self.device)
        if self.context.compile:
            compile_model(model)
        return model

    def new_optimizer(self, parameters: Any) -> torch.optim.Optimizer:
        """The optimiser named by the hparams, for these parameters."""
        if self.hp["optimizer"] == "adam":
            return torch.optim.Adam(parameters, lr=self.hp["lr"], weight_decay=self.hp["weight_decay"])
        return torch.optim.SGD(
            parameters, lr=self.hp["lr"], momentum=self.hp["momentum"], weight_decay=self.hp["weight_decay"]
        )

    # -- protocol -------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [Stage("train", self.hp["epochs"])]

    def begin_stage(self, stage: Stage, data: DeviceData, resuming: bool) -> None:
        """Prepare a stage. With ``resuming``, only build what load_state_dict will fill in."""

    def begin_epoch(self, stage: Stage, epoch: int) -> None:
        """Called before each epoch's ``epoch_indices`` (``epoch`` counts from 0 within the stage)."""

    def epoch_indices(self, stage: Stage, epoch: int, n_train: int, generator: torch.Generator) -> torch.Tensor:
        """Order of the training examples for one epoch (default: a uniform shuffle)."""
        return torch.randperm(n_train, generator=generator)

    def update(self, batch: Batch) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__} has a gradient stage but no update()")

    def fit(self, stage: Stage, data: DeviceData) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} has a fit stage but no fit()")

    def predictors(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def epoch_log(self) -> dict[str, Any]:
        """Method state worth recording once per epoch (e.g. GroupDRO's group weights)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """State that is not a module/optimiser attribute (tensors, counters), for checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        # The precision's state (fp16's gradient scales) is saved with the models it scales.
        state: dict[str, Any] = {"extra": self.extra_state(), "precision": self.precision.state_dict()}
        for key, value in vars(self).items():
            if isinstance(value, (nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
                state[key] = value.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in vars(self).items():
            if isinstance(value, (nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
                if key not in state:
                    raise ValueError(f"checkpoint has no state for {key!r}")
                value.load_state_dict(state[key])
        self.precision.load_state_dict(state.get("precision", {}))
        self.load_extra_state(state.get("extra", {}))


# --------------------------------------------------------------------------------------------
# Resolution


def hparam_specs(method_cls: type[Method]) -> dict[str, Hparam]:
    """All hyperparameters of a method: the shared training ones and its own."""
    return {**TRAINING_HPARAMS, **method_cls.own_hparams}


def resolve_hparams(
    method_cls: type[Method],
    dataset_name: str,
    protocol: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Values for (method, dataset): declared defaults < the dataset's training ``protocol`` < the
    method's per-dataset defaults < the user's ``overrides``; validates everything."""
    specs = hparam_specs(method_cls)
    resolved = {name: spec.default for name, spec in specs.items()}
    layers = [protocol, method_cls.defaults_per_dataset.get(dataset_name, {}), overrides or {}]
    for layer_index, layer in enumerate(layers):
        for name, value in layer.items():
            if name not in specs:
                if layer_index == 0:  # a dataset's protocol may set keys some methods do not have
                    continue
                raise ConfigError(
                    f"unknown hparam {name!r} for method {method_cls.name}; known: {', '.join(sorted(specs))}"
                )
            resolved[name] = specs[name].parse(name, value)
    return resolved


def sample_hparams(
    method_cls: type[Method], dataset_name: str, protocol: Mapping[str, Any], draw: int
) -> dict[str, Any]:
    """Hyperparameter draw ``draw`` for a sweep: draw 0 is the defaults, others sample each tuned hparam."""
    resolved = resolve_hparams(method_cls, dataset_name, protocol)
    if draw == 0:
        return resolved
    for name, spec in hparam_specs(method_cls).items():
        if spec.search is not None:
            resolved[name] = spec.parse(name, spec.search(_hparam_rng(draw, name)))
    return resolved


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["lr=0.01", "epochs=3"]`` -> ``{"lr": "0.01", "epochs": "3"}``; ConfigError on a malformed item
    or a key given twice (which value wins would otherwise be a silent accident of order)."""
    overrides: dict[str, str] = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ConfigError(f"--hparams {part!r}: expected key=value, e.g. --hparams lr=0.001")
            key, value = (text.strip() for text in part.split("=", 1))
            if key in overrides:
                raise ConfigError(f"--hparams {key} is given twice ({overrides[key]} and {value}); give it once")
            overrides[key] = value
    return overrides
