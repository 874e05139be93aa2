"""The arithmetic of a run's networks: float32, or mixed precision with bf16 or fp16 autocast.

One :class:`Precision` per run, handed to every method through its context and to the evaluator through
:class:`bench.core.device_data.DeviceData`. It changes only how the networks compute: a model's forward
pass runs under autocast (matrix products and convolutions in the low-precision type, what autocast
keeps in float32 stays there) and its outputs come back as float32, so that every loss, per-example
weight and group statistic a method computes from them is float32 arithmetic in all precisions.

fp16 has a narrow exponent range, so its gradients are scaled (``torch.amp.GradScaler``): a method's
:meth:`Precision.backward` scales the loss, :meth:`Precision.step` unscales the gradients, skips an
optimiser step whose gradients overflowed and adapts the scale. Gradients with respect to the *inputs*
(ULE's saliency maps, rrr's penalty) are taken through :meth:`Precision.input_gradient`, which scales
the differentiated output by its own power of two and divides the result by it, so that the fp16
backward pass neither underflows (input gradients of a fresh network are ~1e-4 and smaller inside the
network) nor, after an overflow, poisons the loss: an overflowing input gradient is recomputed at half
the scale. Both scales are part of :meth:`Precision.state_dict`, so a resumed fp16 run equals an
uninterrupted one. bf16 keeps float32's exponent range and needs no scaling; fp32 is the identity (no
autocast, no scaler), so float32 runs compute exactly what they computed before precisions existed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bench.core.errors import ConfigError
from bench.core.precision_names import DEFAULT_PRECISION, check_name

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# The input-gradient scale follows GradScaler's defaults: start at 2**16, halve on overflow, double
# after this many input gradients in a row without one.
INPUT_SCALE_INIT = 2.0**16
INPUT_SCALE_GROWTH_INTERVAL = 2000


class Precision:
    """How a run's networks compute (``fp32``, ``bf16`` or ``fp16``) on a device type (``cpu``, ``cuda``)."""

    def __init__(self, name: str = DEFAULT_PRECISION, device: torch.device | str = "cpu") -> None:
        self.name = check_name(name)
        self.device_type = torch.device(device).type
        self.dtype = _AUTOCAST_DTYPES.get(name)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=name == "fp16")
        self._input_scale = INPUT_SCALE_INIT
        self._input_clean_steps = 0

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, {self.device_type!r})"

    @property
    def scales_gradients(self) -> bool:
        """Whether gradients are scaled (fp16)."""
        return self.scaler.is_enabled()

    # -- the forward pass ---------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast region of a forward pass (nothing for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` under autocast, returned as float32 (a method's losses are float32 arithmetic)."""
        if self.dtype is None:
            return model(x)
        with self.autocast():
            return model(x).float()

    # -- gradients and steps ------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, inputs: Sequence[torch.Tensor] | None = None) -> None:
        """``loss.backward(inputs=inputs)``, on the scaled loss under fp16 (:meth:`step` unscales)."""
        self.scaler.scale(loss).backward(inputs=inputs)

    def step(self, *optimizers: torch.optim.Optimizer) -> None:
        """Step every optimiser of one training step whose gradients came through :meth:`backward` (under
        fp16: unscaled first, skipped when they overflowed), then adapt the scale once."""
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()

    def input_gradient(self, output: torch.Tensor, x: torch.Tensor, create_graph: bool = False,
                       retain_graph: bool | None = None) -> torch.Tensor:
        """``d output / d x`` (``output`` a scalar), as ``torch.autograd.grad`` gives it; with ``create_graph``
        the result stays differentiable (a penalty on it then trains the model).

        Under fp16 ``output`` is multiplied by a power of two before the backward pass and the gradient
        divided by it (both exact), so that small gradients inside the network do not underflow; a
        gradient that overflowed (not finite) is taken again at half the scale, down to a scale of 1.
        The graph is then kept (``retain_graph``) in case of such a retry.
        """
        if not self.scales_gradients:
            (gradient,) = torch.autograd.grad(output, x, create_graph=create_graph, retain_graph=retain_graph)
            return gradient
        while True:
            scale = self._input_scale
            (gradient,) = torch.autograd.grad(output * scale, x, create_graph=create_graph, retain_graph=True)
            if bool(torch.isfinite(gradient).all()) or scale <= 1.0:
                break
            self._input_scale, self._input_clean_steps = scale / 2, 0
        self._input_clean_steps += 1
        if self._input_clean_steps >= INPUT_SCALE_GROWTH_INTERVAL:
            self._input_scale, self._input_clean_steps = self._input_scale * 2, 0
        return gradient / scale

    def input_and_parameter_gradients(self, loss: torch.Tensor, x: torch.Tensor,
                                      parameters: Sequence[torch.Tensor]) -> torch.Tensor:
        """``d loss / d x``, and the parameters' ``.grad`` as :meth:`backward` sets them (ready for :meth:`step`).

        One backward pass gives both without scaling (fp32, bf16); under fp16 the two are scaled
        differently, so they take two passes over one graph.
        """
        if self.scales_gradients:
            gradient = self.input_gradient(loss, x, retain_graph=bool(parameters))
            if parameters:
                self.backward(loss, inputs=list(parameters))
            return gradient
        gradients = torch.autograd.grad(loss, [x, *parameters], allow_unused=True)
        for parameter, grad in zip(parameters, gradients[1:]):
            parameter.grad = grad
        return gradients[0]

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The scales and their counters under fp16 (nothing otherwise)."""
        if not self.scales_gradients:
            return {}
        return {"scaler": self.scaler.state_dict(), "input_scale": self._input_scale,
                "input_clean_steps": self._input_clean_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.scales_gradients:
            return
        if "scaler" not in state:
            raise ValueError("the checkpoint has no fp16 gradient-scaler state (was it written by an fp32 or "
                             "bf16 run?)")
        self.scaler.load_state_dict(state["scaler"])
        self._input_scale = float(state["input_scale"])
        self._input_clean_steps = int(state["input_clean_steps"])


def check_available(name: str, device: torch.device) -> None:
    """ConfigError when ``name`` cannot run on ``device`` (e.g. bf16 on a GPU older than Ampere)."""
    if check_name(name) == "fp32":
        return
    if not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"--precision {name}: PyTorch has no autocast on {device.type}; use --precision fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 arithmetic "
                          "(Ampere or newer has); use --precision fp16")

