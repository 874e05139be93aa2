"""bench.core.precision: fp32 is the identity, bf16/fp16 autocast the forward pass and hand back float32,
fp16 scales its gradients (parameter gradients through GradScaler, input gradients through a scale of
its own that survives underflow and overflow), and its scales are checkpoint state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.core.errors import ConfigError
from bench.core.precision import INPUT_SCALE_INIT, Precision, check_available
from methods.base import erm_step


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)


def test_fp32_is_exactly_the_plain_step() -> None:
    x, y = batch()
    plain, through = small_model(), small_model()
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    optimizer = torch.optim.SGD(through.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        loss = F.cross_entropy(plain(x), y)
        plain_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        plain_optimizer.step()
        _, logged = erm_step(through, optimizer, x, y, Precision("fp32"))
        assert logged == loss.item()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), through.parameters()))
    assert Precision("fp32").state_dict() == {}


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_low_precision_forward_runs_under_autocast_and_returns_float32(name: str) -> None:
    x, _ = batch()
    model = small_model()
    logits = Precision(name).forward(model, x)
    assert logits.dtype == torch.float32
    exact = model(x)
    assert not torch.equal(logits, exact)  # the linear layer ran in the low-precision type
    torch.testing.assert_close(logits, exact, rtol=0.05, atol=0.02)


def test_fp16_steps_unscale_and_skip_an_overflowing_step() -> None:
    x, y = batch()
    reference, model = small_model(), small_model()
    precision = Precision("fp16")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    erm_step(model, optimizer, x, y, precision)
    erm_step(reference, torch.optim.SGD(reference.parameters(), lr=0.1), x, y, Precision("fp32"))
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # unscaled: not 65536 times the step
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad(set_to_none=True)
    precision.backward(precision.forward(model, x).sum() * 1e6)  # overflows fp16 at any scale >= 1
    precision.step(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert precision.scaler.get_scale() == 2.0**15  # GradScaler starts at 2**16 and halves


def test_fp16_input_gradient_is_scaled_past_underflow() -> None:
    # d(1e-6 * sum(w.x)) / dx = 1e-6 * w, at most 1e-8: below fp16's smallest subnormal (6e-8), so an unscaled fp16
    # backward through the linear layer gives 0; the scaled one gives the float32 gradient.
    torch.manual_seed(0)
    linear = nn.Linear(16, 1, bias=False)
    with torch.no_grad():
        linear.weight.mul_(0.01 / linear.weight.abs().max())
    x = torch.randn(4, 16, requires_grad=True)
    precision = Precision("fp16")
    scalar = precision.forward(linear, x).sum() * 1e-6
    (unscaled,) = torch.autograd.grad(scalar, x, retain_graph=True)
    assert torch.count_nonzero(unscaled) == 0
    gradient = precision.input_gradient(scalar, x)
    expected = (1e-6 * linear.weight.detach()).expand(4, 16)
    torch.testing.assert_close(gradient, expected, rtol=2e-3, atol=0)


def test_fp16_input_gradient_retries_an_overflow_at_a_lower_scale_and_state_round_trips() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 1, bias=False)
    x = torch.randn(4, 16, requires_grad=True)
    precision = Precision("fp16")
    scalar = precision.forward(linear, x).sum() * 3000.0  # gradient ~1e3: overflows at 2**16, not at 2**5
    gradient = precision.input_gradient(scalar, x, create_graph=True)
    torch.testing.assert_close(gradient, (3000.0 * linear.weight.detach()).expand(4, 16), rtol=2e-3, atol=0)
    assert gradient.requires_grad  # create_graph: a penalty on it still trains the layer
    state = precision.state_dict()
    assert state["input_scale"] < INPUT_SCALE_INIT and state["input_clean_steps"] == 1
    restored = Precision("fp16")
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    with pytest.raises(ValueError, match="no fp16 gradient-scaler state"):
        Precision("fp16").load_state_dict({})


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_input_and_parameter_gradients_equal_the_separate_ones(name: str) -> None:
    x, y = batch()
    model = small_model()
    precision = Precision(name)
    leaf = x.clone().requires_grad_(True)
    loss = F.cross_entropy(precision.forward(model, leaf), y)
    parameters = list(model.parameters())
    gradient = precision.input_and_parameter_gradients(loss, leaf, parameters)
    scale = precision.scaler.get_scale() if name == "fp16" else 1.0
    grads = [p.grad / scale for p in parameters]
    exact_leaf = x.clone().requires_grad_(True)
    exact = torch.autograd.grad(F.cross_entropy(model(exact_leaf), y), [exact_leaf, *parameters])
    # fp32: the same numbers; fp16: within 1e-2 in norm (measured: at most 7e-4, a few roundings of 2**-11).
    tolerance = 0.0 if name == "fp32" else 1e-2
    for got, expected in zip([gradient, *grads], exact):
        assert (got - expected).norm() <= tolerance * expected.norm()


def test_names_and_availability() -> None:
    with pytest.raises(ConfigError, match="--precision 'fp64': choose one of fp32, bf16, fp16"):
        Precision("fp64")
    with pytest.raises(ConfigError, match="choose one of"):
        check_available("half", torch.device("cpu"))
    for name in ("fp32", "bf16", "fp16"):
        check_available(name, torch.device("cpu"))
