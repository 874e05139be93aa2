"""rrr (Right for the Right Reasons): its penalty against the closed form of a linear model, its
parameter gradient against central differences, ERM when nothing is masked, the repair of a linear
toy whose shortcut is a masked pixel, and the masks only reaching a method that declares them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.core.backbones import SYMMETRIC_NORMALISATION, Classifier
from bench.core.dataset import InMemoryImages, SpuriousDataset, make_split
from bench.core.device_data import DeviceData
from bench.core.errors import ConfigError
from bench.core.precision import Precision
from bench.runner import RunRequest, prepare
from methods.base import Batch, MethodContext, resolve_hparams
from methods.erm import ERM
from methods.rrr import RRR, irrelevant_gradient_penalty


def linear_rrr(weight: float, d: int = 6, k: int = 3, dtype: torch.dtype = torch.float64, optimizer: str = "sgd"):
    hparams = resolve_hparams(RRR, "toy", {"optimizer": optimizer, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
                              {"penalty_weight": weight})
    torch.manual_seed(0)
    context = MethodContext(hparams, {"n_classes": k, "n_groups": 2 * k}, torch.device("cpu"),
                            lambda: Classifier(nn.Flatten(), d, k).to(dtype), seed=0)
    return RRR(context)


def test_penalty_matches_the_closed_form_of_a_linear_model() -> None:
    # logits z = W x + b: d/dx sum_k log p_k = sum_k W_k - K * sum_j p_j W_j.
    method = linear_rrr(1.0)
    model = method.model
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=generator, dtype=torch.float64).requires_grad_(True)
    mask = (torch.rand(5, 6, generator=generator) > 0.5).double()
    logits = model(x)
    penalty = irrelevant_gradient_penalty(logits, x, mask, Precision())
    weight = model.classifier.weight.detach()
    p = F.softmax(logits.detach(), dim=1)
    closed = weight.sum(0)[None, :] - 3 * p @ weight
    expected = (mask * closed).pow(2).sum(dim=1).mean()
    torch.testing.assert_close(penalty, expected)


def test_parameter_gradient_matches_central_differences() -> None:
    method = linear_rrr(3.0)
    model = method.model
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    mask = (torch.rand(4, 6, generator=generator) > 0.4).double()

    def loss() -> torch.Tensor:
        leaf = x.clone().requires_grad_(True)
        logits = model(leaf)
        return F.cross_entropy(logits, y) + 3.0 * irrelevant_gradient_penalty(logits, leaf, mask, Precision())

    analytic = torch.autograd.grad(loss(), [model.classifier.weight])[0]
    numeric = torch.zeros_like(analytic)
    weight = model.classifier.weight.data  # edited in place; the loss still builds its graph
    for index in np.ndindex(*analytic.shape):
        original = weight[index].item()
        weight[index] = original + 1e-6
        up = loss().item()
        weight[index] = original - 1e-6
        down = loss().item()
        weight[index] = original
        numeric[index] = (up - down) / 2e-6
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_nothing_masked_is_exactly_erm() -> None:
    generator = torch.Generator().manual_seed(3)
    batches = [Batch(x=torch.randn(8, 6, generator=generator), y=torch.randint(0, 3, (8,), generator=generator),
                     index=torch.arange(8), mask=torch.zeros(8, 6)) for _ in range(3)]
    method = linear_rrr(1000.0, dtype=torch.float32, optimizer="adam")
    hparams = resolve_hparams(ERM, "toy", {"optimizer": "adam", "lr": 0.1, "weight_decay": 0.0})
    torch.manual_seed(0)
    erm = ERM(MethodContext(hparams, {"n_classes": 3, "n_groups": 6}, torch.device("cpu"),
                            lambda: Classifier(nn.Flatten(), 6, 3), seed=0))
    for batch in batches:
        assert method.update(batch)["penalty"] == 0.0
        erm.update(batch)
    for a, b in zip(method.model.parameters(), erm.model.parameters()):
        assert torch.equal(a, b)


def _shortcut_split(name: str, n: int, aligned: float, rng: np.random.Generator):
    """1x1x2 images: pixel 0 is the core feature (noisy), pixel 1 the shortcut (clean), agreeing with the
    class in a fraction ``aligned`` of the examples; the shortcut's pixel is masked."""
    y = rng.integers(0, 2, n)
    a = np.where(rng.random(n) < aligned, y, 1 - y)
    core = 128 + 50 * (2 * y - 1) + rng.normal(0, 35, n)
    shortcut = 128 + 60 * (2 * a - 1) + rng.normal(0, 5, n)
    pixels = np.clip(np.stack([core, shortcut], axis=1), 0, 255).astype(np.uint8)
    images = torch.from_numpy(np.repeat(pixels[:, None, None, :], 3, axis=1))  # [n, 3, 1, 2]
    mask = torch.tensor([[0, 1]], dtype=torch.uint8).expand(n, 1, 2).clone()
    return make_split(name, torch.from_numpy(y), torch.from_numpy(a), InMemoryImages(images), [2], spurious_mask=mask)


def test_the_oracle_ignores_a_masked_shortcut_that_erm_follows() -> None:
    rng = np.random.default_rng(0)
    splits = {"train": _shortcut_split("train", 2000, 1.0, rng), "val": _shortcut_split("val", 400, 0.5, rng),
              "test": _shortcut_split("test", 2000, 0.0, rng)}
    dataset = SpuriousDataset("shortcut-toy", ["c0", "c1"], ["a"], [["a0", "a1"]], splits, "group_mean")
    accuracies = {}
    for cls, weight in ((ERM, None), (RRR, 100.0)):
        overrides = {"penalty_weight": weight} if weight is not None else {}
        hparams = resolve_hparams(cls, dataset.name, {"optimizer": "adam", "lr": 0.05, "weight_decay": 0.0},
                                  overrides)
        torch.manual_seed(0)
        method = cls(MethodContext(hparams, dataset.info(), torch.device("cpu"),
                                   lambda: Classifier(nn.Flatten(), 6, 2), seed=0))
        data = DeviceData(dataset, torch.device("cpu"), False, normalisation=SYMMETRIC_NORMALISATION,
                          masks_allowed=cls.uses_spurious_masks(hparams))
        for _ in range(300):
            index = torch.randint(0, 2000, (64,))
            method.update(Batch(x=data.images("train", index, train=True), y=data.labels("train")[index],
                                index=index,
                                mask=data.spurious_masks("train", index) if data.masks_allowed else None))
        predictions = data.predict(method.model, "test").argmax(dim=1)
        accuracies[cls.name] = float((predictions == data.labels("test")).float().mean())
    # Test examples all contradict the shortcut: ERM, which follows it, is wrong on most of them.
    assert accuracies["erm"] < 0.3 and accuracies["rrr"] > 0.85, accuracies


def test_rrr_needs_a_dataset_with_masks_and_erm_never_sees_them() -> None:
    with pytest.raises(ConfigError, match="spurious-region masks"):
        prepare(RunRequest(method="rrr", dataset="celeba-synth", epochs=1))
    assert RRR.uses_spurious_masks({}) and not ERM.uses_spurious_masks({})
    rng = np.random.default_rng(0)
    splits = {name: _shortcut_split(name, 8, 0.5, rng) for name in ("train", "val", "test")}
    data = DeviceData(SpuriousDataset("t", ["c0", "c1"], ["a"], [["a0", "a1"]], splits, "group_mean"),
                      torch.device("cpu"), False, normalisation=SYMMETRIC_NORMALISATION)
    with pytest.raises(RuntimeError, match="does not use spurious-region masks"):
        data.spurious_masks("train", torch.arange(2))
