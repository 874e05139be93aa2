"""LfF: the GCE loss, the per-example loss EMA with class-wise max normalisation, the weights, one
training step, the frozen-backbone option and the checkpoint round trip of the EMA state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.core.backbones import SYMMETRIC_NORMALISATION, build_backbone
from bench.core.dataset import InMemoryImages, SpuriousDataset, make_split
from bench.core.device_data import DeviceData
from bench.core.metrics import GroupStructure
from bench.core.records import RunDir
from bench.trainer import Progress, seed_everything, train
from methods import get_method
from methods.base import Batch, MethodContext, resolve_hparams, sample_hparams
from methods.lff import LfF, PerExampleLossEMA, generalized_cross_entropy, relative_difficulty

# ---------------------------------------------------------------------------------------------
# GCE


def test_gce_value_and_gradient_at_p_half_q_07():
    # Two classes with equal logits: p_y = 0.5.
    logits = torch.zeros(1, 2, requires_grad=True)
    target = torch.tensor([0])
    loss = generalized_cross_entropy(logits, target, q=0.7)
    # Reference form CE * p_y^q * q: ln 2 * 0.5^0.7 * 0.7 = 0.693147 * 0.615572 * 0.7.
    assert loss.item() == pytest.approx(math.log(2) * 0.5**0.7 * 0.7, rel=1e-6)
    assert loss.item() == pytest.approx(0.298677, abs=1e-6)
    loss.sum().backward()
    # d CE / d logits = p - onehot = (-0.5, 0.5), scaled by q * p_y^q = 0.430900.
    np.testing.assert_allclose(logits.grad.numpy(), [[-0.215450, 0.215450]], atol=1e-6)

    # The textbook (1 - p_y^q) / q: value 0.549183, gradient p_y^q * (p - onehot) = q^-1 times the above.
    textbook_logits = torch.zeros(1, 2, requires_grad=True)
    p_y = F.softmax(textbook_logits, dim=1)[0, 0]
    textbook = (1 - p_y**0.7) / 0.7
    assert textbook.item() == pytest.approx(0.549183, abs=1e-6)
    textbook.backward()
    np.testing.assert_allclose(textbook_logits.grad.numpy(), logits.grad.numpy() / 0.7, rtol=1e-6)


def test_gce_gradient_is_q_p_to_the_q_times_the_ce_gradient():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 2, 1, 0])
    generalized_cross_entropy(logits, targets, q=0.3).sum().backward()
    probabilities = F.softmax(logits.detach(), dim=1)
    p_y = probabilities[torch.arange(6), targets]
    ce_gradient = probabilities - F.one_hot(targets, 3)
    np.testing.assert_allclose(logits.grad.numpy(), (0.3 * p_y[:, None] ** 0.3 * ce_gradient).numpy(), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The per-example EMA, the class-wise maximum and the weights


def test_ema_update_class_max_and_normalisation_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 1])
    ema = PerExampleLossEMA(labels, n_classes=2, alpha=0.7)
    ema.update(torch.tensor([1.0, 2.0]), torch.tensor([0, 2]))  # first values are the losses
    np.testing.assert_allclose(ema.values.numpy(), [1.0, 0, 2.0, 0, 0])
    ema.update(torch.tensor([3.0, 0.5]), torch.tensor([0, 3]))
    # Example 0: 0.7 * 1 + (1 - 0.7) * 3 = 1.6; example 3 is new: 0.5.
    np.testing.assert_allclose(ema.values.numpy(), [1.6, 0, 2.0, 0.5, 0], rtol=1e-6)
    np.testing.assert_allclose(ema.updated.numpy(), [1, 0, 1, 1, 0])
    np.testing.assert_allclose(ema.class_max().numpy(), [1.6, 2.0], rtol=1e-6)
    # Divided by the max over ALL training examples of the class (example 2 is not in this batch).
    np.testing.assert_allclose(ema.normalized(torch.tensor([0, 3])).numpy(), [1.0, 0.25], rtol=1e-6)

    # Recomputed at every step (official), not a running max that never decreases (Whac-A-Mole):
    ema.update(torch.tensor([0.0]), torch.tensor([2]))  # 0.7 * 2.0 = 1.4
    np.testing.assert_allclose(ema.class_max().numpy(), [1.6, 1.4], rtol=1e-6)
    np.testing.assert_allclose(ema.normalized(torch.tensor([3])).numpy(), [0.5 / 1.4], rtol=1e-6)


def test_ema_of_a_class_with_zero_losses_gives_zero_not_nan():
    ema = PerExampleLossEMA(torch.tensor([0, 1]), n_classes=2, alpha=0.7)
    ema.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    assert ema.normalized(torch.tensor([0, 1])).tolist() == [0.0, 1.0]


def test_relative_difficulty_weights():
    weights = relative_difficulty(torch.tensor([1.0, 0.25, 0.0]), torch.tensor([0.5, 0.75, 0.0]))
    np.testing.assert_allclose(weights.numpy(), [1 / (1.5 + 1e-8), 0.25 / (1.0 + 1e-8), 0.0], rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# The method


def tiny_dataset(n_per_group: int = 6, size: int = 8, seed: int = 0) -> SpuriousDataset:
    """Colour (the spurious attribute) and brightness of a centre square (the class)."""
    rng = np.random.default_rng(seed)
    splits = {}
    for name in ("train", "val", "test"):
        group = np.repeat(np.arange(4), n_per_group)
        y, a = group // 2, group % 2
        pixels = rng.integers(0, 60, size=(len(y), 3, size, size))
        pixels[np.arange(len(y)), 2 * a] += 120
        pixels[:, :, 2:6, 2:6] = np.where(y == 1, 230, 20)[:, None, None, None]
        images = InMemoryImages(torch.from_numpy(pixels.astype(np.uint8)))
        splits[name] = make_split(name, torch.from_numpy(y), torch.from_numpy(a), images, [2])
    return SpuriousDataset(
        name="lff-toy", class_names=["dark", "bright"], attr_names=["colour"],
        attr_value_names=[["red", "blue"]], splits=splits, average_kind="group_mean",
    )


def make_lff(dataset: SpuriousDataset, overrides: dict | None = None, seed: int = 0) -> tuple[LfF, DeviceData]:
    defaults = {"backbone": "small-cnn", "optimizer": "adam", "lr": 1e-3, "batch_size": 8, "epochs": 2}
    hparams = resolve_hparams(LfF, dataset.name, defaults, overrides or {})
    seed_everything(seed)
    context = MethodContext(
        hparams=hparams, dataset_info=dataset.info(), device=torch.device("cpu"),
        make_model=lambda: build_backbone("small-cnn", dataset.n_classes), seed=seed,
    )
    return LfF(context), DeviceData(dataset, torch.device("cpu"), LfF.uses_train_group_labels(hparams),
                                    normalisation=SYMMETRIC_NORMALISATION)


def batch_of(data: DeviceData, index: list[int]) -> Batch:
    chunk = torch.tensor(index)
    return Batch(x=data.images("train", chunk, train=True), y=data.labels("train")[chunk], index=chunk)


def test_lff_declarations():
    assert get_method("lff") is LfF
    assert LfF.primary == "debiased" and LfF.uses_train_group_labels({}) is False
    method, _ = make_lff(tiny_dataset())
    assert set(method.predictors()) == {"debiased", "biased"}
    assert method.hp["q"] == 0.7 and method.hp["ema_alpha"] == 0.7 and method.hp["freeze_backbone"] is False
    for draw in range(1, 20):
        assert 0.05 <= sample_hparams(LfF, "lff-toy", {}, draw)["q"] <= 0.95


def test_one_step_weights_the_debiased_loss_and_updates_the_ema_of_the_batch():
    dataset = tiny_dataset()
    method, data = make_lff(dataset)
    method.begin_stage(method.stages()[0], data, resuming=False)
    batch = batch_of(data, [20, 3, 9, 14])
    with torch.no_grad():
        ce_biased = F.cross_entropy(method.biased(batch.x), batch.y, reduction="none")
        ce_debiased = F.cross_entropy(method.debiased(batch.x), batch.y, reduction="none")
        gce = generalized_cross_entropy(method.biased(batch.x), batch.y, 0.7).mean()
    losses = method.update(batch)

    # First visit: each EMA is the loss itself, normalised by the class max over the examples seen so far.
    labels = data.labels("train")
    expected_weights = []
    for i, example in enumerate(batch.index.tolist()):
        same_class = labels[batch.index] == labels[example]
        normalised_biased = ce_biased[i] / ce_biased[same_class].max()
        normalised_debiased = ce_debiased[i] / ce_debiased[same_class].max()
        expected_weights.append(normalised_biased / (normalised_biased + normalised_debiased + 1e-8))
    expected_weights = torch.stack(expected_weights)
    assert losses["loss_debiased"] == pytest.approx((ce_debiased * expected_weights).mean().item(), rel=1e-5)
    assert losses["loss_biased"] == pytest.approx(gce.item(), rel=1e-5)
    assert losses["mean_weight"] == pytest.approx(expected_weights.mean().item(), rel=1e-5)
    updated = torch.zeros(len(labels))
    updated[batch.index] = 1
    assert torch.equal(method.ema_biased.updated, updated)
    torch.testing.assert_close(method.ema_biased.values[batch.index], ce_biased)
    torch.testing.assert_close(method.ema_debiased.values[batch.index], ce_debiased)


def test_both_models_train_on_the_same_batch():
    method, data = make_lff(tiny_dataset())
    method.begin_stage(method.stages()[0], data, resuming=False)
    before = {name: [p.detach().clone() for p in model.parameters()] for name, model in method.predictors().items()}
    method.update(batch_of(data, [0, 7, 13, 21]))
    for name, model in method.predictors().items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], model.parameters())), name


def test_freeze_backbone_trains_only_the_last_layers():
    method, data = make_lff(tiny_dataset(), {"freeze_backbone": True})
    method.begin_stage(method.stages()[0], data, resuming=False)
    for model, optimizer in ((method.biased, method.optimizer_biased), (method.debiased, method.optimizer_debiased)):
        optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert optimised == {id(p) for p in model.classifier.parameters()}
    featurizer_before = [p.detach().clone() for p in method.debiased.featurizer.parameters()]
    classifier_before = method.debiased.classifier.weight.detach().clone()
    method.update(batch_of(data, [0, 7, 13, 21]))
    assert all(torch.equal(a, b) for a, b in zip(featurizer_before, method.debiased.featurizer.parameters()))
    assert not torch.equal(classifier_before, method.debiased.classifier.weight)


class _Interrupt(Exception):
    pass


def test_ema_state_survives_a_checkpoint_and_a_resumed_run_matches_an_uninterrupted_one(tmp_path):
    dataset = tiny_dataset()
    structure = GroupStructure.from_info(dataset.info())
    quiet = Progress(quiet=True)

    method, data = make_lff(dataset, {"epochs": 2})
    train(method, data, RunDir(tmp_path / "straight"), 0, structure, quiet)

    # Stop after the first epoch (its checkpoint is written), then resume with a fresh method object.
    interrupted, data = make_lff(dataset, {"epochs": 2})

    def stop() -> None:
        raise _Interrupt

    with pytest.raises(_Interrupt):
        train(interrupted, data, RunDir(tmp_path / "resumed"), 0, structure, quiet, on_epoch_end=stop)
    checkpoint = torch.load(RunDir(tmp_path / "resumed").checkpoint, weights_only=False)
    saved = checkpoint["method"]["extra"]
    torch.testing.assert_close(saved["ema_biased"]["values"], interrupted.ema_biased.values)
    assert saved["ema_debiased"]["updated"].sum().item() == data.n("train")  # every example seen once
    assert saved["ema_biased"]["values"].abs().sum() > 0

    resumed, data = make_lff(dataset, {"epochs": 2})
    train(resumed, data, RunDir(tmp_path / "resumed"), 0, structure, quiet)
    torch.testing.assert_close(resumed.ema_biased.values, method.ema_biased.values)
    torch.testing.assert_close(resumed.ema_debiased.values, method.ema_debiased.values)
    straight = RunDir(tmp_path / "straight").read_metrics()
    again = RunDir(tmp_path / "resumed").read_metrics()
    assert [r["eval"] for r in again] == [r["eval"] for r in straight]
    for resumed_record, straight_record in zip(again, straight, strict=True):
        assert resumed_record["train"] == pytest.approx(straight_record["train"])


def test_loading_ema_state_for_another_training_set_size_fails():
    method, data = make_lff(tiny_dataset())
    method.begin_stage(method.stages()[0], data, resuming=False)
    state = method.state_dict()
    other, other_data = make_lff(tiny_dataset(n_per_group=5))
    other.begin_stage(other.stages()[0], other_data, resuming=True)
    with pytest.raises(ValueError, match="EMA state"):
        other.load_state_dict(state)
