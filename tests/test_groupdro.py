"""GroupDRO's mechanism against hand-computed values: q's update, the robust loss, the adjustment,
group-balanced sampling, and q surviving checkpoints (in memory and through an interrupted run)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import run_seed0, write_custom_dataset
from torch import nn

from bench import runner
from bench.core.backbones import SYMMETRIC_NORMALISATION
from bench.core.dataset import InMemoryImages, SpuriousDataset, make_split
from bench.core.device_data import DeviceData
from methods.base import Batch, MethodContext, Stage, resolve_hparams
from methods.groupdro import (
    GroupDRO,
    adjustment_term,
    exponentiated_gradient_step,
    group_balanced_indices,
    group_mean_losses,
    group_mean_losses_one_hot,
)

ALL_ACTIVE = torch.ones(4, dtype=torch.bool)


def test_q_update_matches_hand_computation() -> None:
    q = torch.full((4,), 0.25, dtype=torch.float64)
    # q_g ∝ (1/4) exp(0.1 L_g), L = (1, 2, 0, 3): (e^0.1, e^0.2, e^0 , e^0.3) / 4.676432 by hand.
    q = exponentiated_gradient_step(q, torch.tensor([1.0, 2.0, 0.0, 3.0]), eta=0.1, active=ALL_ACTIVE)
    assert q.tolist() == pytest.approx([0.236328, 0.261183, 0.213838, 0.288651], abs=1e-6)
    # q is kept across steps: the second step starts from the first one's q, not from uniform.
    q = exponentiated_gradient_step(q, torch.tensor([0.0, 0.0, 1.0, 0.0]), eta=0.1, active=ALL_ACTIVE)
    assert q.tolist() == pytest.approx([0.231130, 0.255438, 0.231130, 0.282303], abs=1e-6)
    assert float(q.sum()) == pytest.approx(1.0)


def test_q_update_survives_huge_losses_and_keeps_empty_groups_at_zero() -> None:
    active = torch.tensor([True, True, False, True])
    q = active.double() / 3
    q = exponentiated_gradient_step(q, torch.tensor([1e4, 1e4 - 1.0, 0.0, 0.0]), eta=1.0, active=active)
    assert torch.isfinite(q).all()
    assert q[2] == 0.0
    # exp(1e4) overflows; the shifted update gives q ∝ (1, e^-1, 0, e^-1e4) exactly.
    assert q[1] / q[0] == pytest.approx(math.exp(-1.0))


@pytest.mark.parametrize("by", [group_mean_losses, group_mean_losses_one_hot])  # the CPU and the CUDA path
def test_group_mean_losses_average_within_groups_and_zero_for_absent_groups(by) -> None:
    per_example = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0], requires_grad=True)
    losses, counts = by(per_example, torch.tensor([0, 0, 2, 2, 2]), 4)
    assert losses.tolist() == pytest.approx([2.0, 0.0, 11.0 / 3.0, 0.0])
    assert counts.tolist() == [2.0, 0.0, 3.0, 0.0]
    losses.sum().backward()  # each example's gradient is 1 / its group's count
    assert per_example.grad.tolist() == pytest.approx([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3])


def test_adjustment_is_c_over_sqrt_training_count_and_zero_for_empty_groups() -> None:
    assert adjustment_term(torch.tensor([100, 4, 0, 25]), 2.0).tolist() == pytest.approx([0.2, 1.0, 0.0, 0.4])
    assert adjustment_term(torch.tensor([100, 4, 0, 25]), 0.0).tolist() == [0.0, 0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------
# The method itself, on a model whose logits are its input (plus a trainable bias starting at 0)


class LogitsAreInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


def make_method(train_counts: list[int], **overrides: object) -> GroupDRO:
    hparams = resolve_hparams(GroupDRO, "test", {}, {"optimizer": "sgd", "momentum": 0.0, **overrides})
    info = {"n_classes": 2, "n_groups": len(train_counts), "group_counts": {"train": train_counts}}
    context = MethodContext(hparams=hparams, dataset_info=info, device=torch.device("cpu"),
                            make_model=LogitsAreInput, seed=0)  # type: ignore[arg-type]
    return GroupDRO(context)


def test_update_uses_adjusted_losses_for_q_and_the_unadjusted_robust_loss() -> None:
    method = make_method([100, 4, 0, 25], eta=0.1, generalization_adjustment=2.0, lr=1.0)
    # One example per group 0, 1, 3; logits chosen so the cross-entropies are ln 2, ln 4 and ln(1 + e^-2).
    x = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1, 1])
    losses = torch.tensor([math.log(2.0), math.log(4.0), math.log(1.0 + math.exp(-2.0))])
    logged = method.update(Batch(x=x, y=y, index=torch.arange(3), group=torch.tensor([0, 1, 3])))

    # Group 2 has no training example: it is outside q. The others start at 1/3 and move with L_g + 2/sqrt(n_g).
    adjusted = [losses[0] + 0.2, losses[1] + 1.0, losses[2] + 0.4]
    weights = [math.exp(0.1 * float(a)) for a in adjusted]
    expected_q = [weights[0] / sum(weights), weights[1] / sum(weights), 0.0, weights[2] / sum(weights)]
    assert method.q.tolist() == pytest.approx(expected_q, abs=1e-9)
    expected_robust = sum(qg * float(lg) for qg, lg in zip([expected_q[0], expected_q[1], expected_q[3]], losses))
    assert logged["robust_loss"] == pytest.approx(expected_robust, abs=1e-6)
    assert logged["mean_loss"] == pytest.approx(float(losses.mean()), abs=1e-6)
    assert method.epoch_log()["group_weights"] == pytest.approx(expected_q, abs=1e-9)

    # The SGD step (lr 1, no momentum) moved the bias by -dR/db = -sum_g q_g (softmax - onehot) of its example.
    probabilities = torch.softmax(x, dim=1)
    gradient = sum(expected_q[g] * (probabilities[i] - torch.eye(2)[y[i]]) for i, g in enumerate([0, 1, 3]))
    assert method.model.bias.detach().tolist() == pytest.approx((-gradient).tolist(), abs=1e-6)


def test_q_round_trips_through_a_checkpoint() -> None:
    method = make_method([5, 5, 5, 5], eta=0.5)
    batch = Batch(x=torch.tensor([[2.0, 0.0], [0.0, 0.0]]), y=torch.tensor([1, 0]), index=torch.arange(2),
                  group=torch.tensor([1, 3]))
    for _ in range(3):
        method.update(batch)
    assert not torch.allclose(method.q, torch.full((4,), 0.25, dtype=torch.float64))
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = make_method([5, 5, 5, 5], eta=0.5)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    assert torch.equal(restored.q, method.q)
    assert restored.q.dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# Group-balanced sampling


def tiny_dataset(train_groups: list[int]) -> SpuriousDataset:
    """Two classes x one binary attribute, 1-pixel images; group g = 2*y + a as everywhere."""
    def split(name: str, groups: list[int]) -> object:
        g = torch.tensor(groups)
        return make_split(name, g // 2, g % 2, InMemoryImages(torch.zeros(len(g), 3, 1, 1, dtype=torch.uint8)), [2])

    splits = {"train": split("train", train_groups), "val": split("val", [0, 1, 2, 3]),
              "test": split("test", [0, 1, 2, 3])}
    return SpuriousDataset("tiny", ["a", "b"], ["attr"], [["u", "v"]], splits, "plain")  # type: ignore[arg-type]


def test_group_balanced_sampling_is_the_reference_weighted_sampler() -> None:
    groups = torch.tensor([0] * 70 + [1] * 4 + [3] * 26)
    ours = group_balanced_indices(groups, torch.Generator().manual_seed(3))
    counts = torch.bincount(groups).double()
    weights = (len(groups) / counts[groups]).tolist()
    generator = torch.Generator().manual_seed(3)
    reference = torch.utils.data.WeightedRandomSampler(weights, len(groups), replacement=True, generator=generator)
    assert ours.tolist() == list(reference)


def test_group_balanced_sampling_draws_every_group_equally_often() -> None:
    train_groups = [0] * 3498 + [1] * 184 + [3] * 1057  # Waterbirds' train counts, group 2 structurally empty
    dataset = tiny_dataset(train_groups)
    method = make_method(dataset.group_counts("train"))
    stage = method.stages()[0]
    method.begin_stage(stage, DeviceData(dataset, torch.device("cpu"), train_groups_allowed=True,
                                               normalisation=SYMMETRIC_NORMALISATION), resuming=False)
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([method.epoch_indices(stage, epoch, len(train_groups), generator) for epoch in range(5)])
    assert len(drawn) == 5 * len(train_groups)  # N examples per epoch, as num_samples = N in the reference
    frequencies = torch.bincount(torch.tensor(train_groups)[drawn], minlength=4).double() / len(drawn)
    # Each of the three non-empty groups gets 1/3 (binomial std ~0.003 here); the empty group never appears.
    assert frequencies.tolist() == pytest.approx([1 / 3, 1 / 3, 0.0, 1 / 3], abs=0.015)
    # Uniform shuffling when switched off: a permutation of the training set.
    method = make_method(dataset.group_counts("train"), reweight_groups=False)
    method.begin_stage(stage, DeviceData(dataset, torch.device("cpu"), train_groups_allowed=True,
                                               normalisation=SYMMETRIC_NORMALISATION), resuming=False)
    order = method.epoch_indices(Stage("train", 1), 0, len(train_groups), torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(len(train_groups)))


# ----------------------------------------------------------------------------------------------
# End to end through the runner: q is recorded every epoch, and an interrupted run resumes exactly


def run_groupdro(
    data_root: Path, out: Path, interrupt_after: int | None, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, int]:
    """Train 3 epochs (or stop after ``interrupt_after``); returns the run folder and the epochs trained here."""
    request = runner.RunRequest(method="groupdro", dataset="custom", data_root=str(data_root), out=str(out),
                                epochs=3, backbone="small-cnn",
                                hparam_overrides=["pretrained=false", "batch_size=8", "eta=0.5", "lr=0.01"],
                                device="cpu")
    return run_seed0(request, monkeypatch, interrupt_after)


def test_groupdro_records_q_and_resumes_bit_identically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_root = write_custom_dataset(tmp_path / "data", n_per_group=6)
    straight, _ = run_groupdro(data_root, tmp_path / "straight", None, monkeypatch)
    interrupted, trained = run_groupdro(data_root, tmp_path / "resumed", 2, monkeypatch)
    assert trained == 2 and not (interrupted / "final.json").exists()
    resumed, trained = run_groupdro(data_root, tmp_path / "resumed", None, monkeypatch)
    assert trained == 1 and (resumed / "final.json").exists()

    def records(path: Path) -> list[dict]:
        return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]

    straight_records, resumed_records = records(straight), records(resumed)
    assert [r["epoch"] for r in resumed_records] == [1, 2, 3]
    for a, b in zip(straight_records, resumed_records):
        q = a["method"]["group_weights"]
        assert len(q) == 4 and sum(q) == pytest.approx(1.0)
        assert b["method"]["group_weights"] == q
        assert b["eval"] == a["eval"]
        assert b["train"] == a["train"]
    assert straight_records[-1]["method"]["group_weights"] != [0.25] * 4
