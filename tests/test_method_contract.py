"""Every registered method through one contract (tests/method_contract.py), as timm runs every model
through one: build, step, state round trip, resume, training groups only when declared, valid
per-dataset defaults. A deliberately broken method must fail it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch.nn.functional as F
from method_contract import (
    check_builds_and_steps,
    check_precision_agrees_with_fp32,
    check_resume_equals_uninterrupted,
    check_state_round_trip,
    check_training_groups_only_when_declared,
)

from bench.core.errors import DataError
from datasets import dataset_names
from methods import get_method, method_names
from methods.base import resolve_hparams
from methods.erm import ERM

METHODS = method_names()


def test_the_registry_holds_the_six_methods_dfr_train_and_the_rrr_oracle() -> None:
    assert set(METHODS) == {"erm", "jtt", "dfr", "dfr-train", "groupdro", "lff", "ule", "rrr"}


@pytest.mark.parametrize("name", METHODS)
def test_builds_and_steps(name: str) -> None:
    check_builds_and_steps(get_method(name))


@pytest.mark.parametrize("name", METHODS)
def test_state_round_trip(name: str) -> None:
    check_state_round_trip(get_method(name))


@pytest.mark.parametrize("name", METHODS)
def test_resume_equals_uninterrupted(name: str, tmp_path: Path) -> None:
    check_resume_equals_uninterrupted(get_method(name), tmp_path)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", METHODS)
def test_one_step_in_mixed_precision_agrees_with_fp32(name: str, precision: str) -> None:
    check_precision_agrees_with_fp32(get_method(name), precision)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", METHODS)
def test_resume_equals_uninterrupted_in_mixed_precision(name: str, precision: str, tmp_path: Path) -> None:
    check_resume_equals_uninterrupted(get_method(name), tmp_path, precision=precision)


@pytest.mark.parametrize("name", METHODS)
def test_training_groups_only_when_declared(name: str, tmp_path: Path) -> None:
    check_training_groups_only_when_declared(get_method(name), tmp_path)


@pytest.mark.parametrize("name", METHODS)
def test_per_dataset_defaults_name_real_datasets_and_valid_values(name: str) -> None:
    cls = get_method(name)
    known = set(dataset_names())
    assert set(cls.defaults_per_dataset) <= known, set(cls.defaults_per_dataset) - known
    assert set(cls.data_options_per_dataset) <= known, set(cls.data_options_per_dataset) - known
    for dataset in cls.defaults_per_dataset:
        resolve_hparams(cls, dataset, {})  # every value parses


@pytest.mark.parametrize("name", METHODS)
def test_paper_and_primary_are_declared(name: str) -> None:
    cls = get_method(name)
    assert cls.paper and cls.name == name and isinstance(cls.primary, str)


class ForgetsItsOptimizer(ERM):
    """ERM whose checkpoint leaves out its optimiser (Adam's moments): a resumed run would differ."""

    name = "erm-broken"

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "extra": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])


class ReadsTrainingGroups(ERM):
    """ERM that sneaks a look at the training groups' counts to reweight its loss, declaring nothing."""

    name = "erm-peeks"

    def update(self, batch):  # type: ignore[no-untyped-def]
        counts = self.context.dataset_info["group_counts"]["train"]
        for group in self.model.parameters():
            group.data.mul_(1.0 + 1e-3 * counts[0] / sum(counts))
            break
        return super().update(batch)


class StepsScaledGradients(ERM):
    """ERM whose optimiser step bypasses the precision (fp16: it steps on the scaled gradients)."""

    name = "erm-unscaled"

    def update(self, batch):  # type: ignore[no-untyped-def]
        loss = F.cross_entropy(self.precision.forward(self.model, batch.x), batch.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.optimizer.step()
        return {"loss": loss.item()}


class IgnoresAutocast(ERM):
    """ERM whose forward pass is always float32."""

    name = "erm-fp32-only"

    def update(self, batch):  # type: ignore[no-untyped-def]
        loss = F.cross_entropy(self.model(batch.x), batch.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.precision.step(self.optimizer)
        return {"loss": loss.item()}


class ForgetsItsScales(ERM):
    """ERM whose resume does not restore the fp16 gradient scales."""

    name = "erm-no-scales"

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class SavesNoScales(ERM):
    """ERM whose checkpoint leaves out the fp16 gradient scales."""

    name = "erm-saves-no-scales"

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in super().state_dict().items() if key != "precision"}


def test_methods_that_bypass_the_precision_fail_the_contract(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="erm-unscaled: the model's fp16 step is off by"):
        check_precision_agrees_with_fp32(StepsScaledGradients, "fp16")
    with pytest.raises(AssertionError, match=r"erm-fp32-only: the model's bf16 step is float32's \(no autocast\?\)"):
        check_precision_agrees_with_fp32(IgnoresAutocast, "bf16")
    with pytest.raises(AssertionError, match="erm-no-scales: the resumed run ends with other gradient scales"):
        check_resume_equals_uninterrupted(ForgetsItsScales, tmp_path / "forgets", precision="fp16")
    # The trainer's resume check turns the precision's refusal into the one-line error of a damaged checkpoint.
    with pytest.raises(DataError, match="unreadable checkpoint .*the checkpoint has no fp16 gradient-scaler state"):
        check_resume_equals_uninterrupted(SavesNoScales, tmp_path / "saves-none", precision="fp16")


def test_a_method_that_forgets_its_optimizer_fails_the_contract(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="erm-broken"):
        check_state_round_trip(ForgetsItsOptimizer)
    with pytest.raises(AssertionError, match="erm-broken"):
        check_resume_equals_uninterrupted(ForgetsItsOptimizer, tmp_path)


def test_a_method_that_uses_training_group_counts_undeclared_fails_the_contract(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="erm-peeks: its training depends on the training group labels"):
        check_training_groups_only_when_declared(ReadsTrainingGroups, tmp_path)
