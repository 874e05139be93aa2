"""JTT's mechanism: the error set of a model whose predictions we control (misclassified examples,
never the correct ones), lambda_up + 1 copies in stage 2, a fresh stage-2 model, and a resumed run
that does not redo stage 1."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import run_seed0, write_custom_dataset
from torch import nn

from bench import runner, trainer
from bench.core.backbones import SYMMETRIC_NORMALISATION, build_backbone
from bench.core.dataset import InMemoryImages, SpuriousDataset, make_split
from bench.core.device_data import DeviceData
from bench.core.metrics import GroupStructure
from bench.core.records import RunDir
from bench.trainer import Progress
from methods.base import Batch, MethodContext, resolve_hparams, sample_hparams
from methods.jtt import JTT, error_set_from_predictions, upsampled_indices


def test_error_set_holds_the_misclassified_examples() -> None:
    predictions = torch.tensor([0, 1, 1, 0, 1])
    labels = torch.tensor([0, 0, 1, 1, 1])
    # Examples 1 and 3 are wrong; the BalancingGroups #5 regression (.eq for .ne) would give 0, 2, 4.
    assert error_set_from_predictions(predictions, labels).tolist() == [1, 3]


def test_upsampling_gives_each_error_example_lambda_plus_one_appearances() -> None:
    pool = upsampled_indices(6, torch.tensor([1, 4]), upweight=3)
    assert len(pool) == 6 + 2 * 3
    assert torch.bincount(pool, minlength=6).tolist() == [1, 4, 1, 1, 4, 1]
    assert torch.bincount(upsampled_indices(6, torch.tensor([1, 4]), upweight=0), minlength=6).tolist() == [1] * 6


def test_search_distributions_cover_the_papers_values() -> None:
    draws = [sample_hparams(JTT, "test", {}, draw) for draw in range(1, 200)]
    assert all(1 <= d["id_epochs"] <= 60 and isinstance(d["id_epochs"], int) for d in draws)
    assert all(1 <= d["upweight"] <= 317 and isinstance(d["upweight"], int) for d in draws)
    assert min(d["id_epochs"] for d in draws) == 1 and max(d["upweight"] for d in draws) > 100
    assert resolve_hparams(JTT, "waterbirds", {})["id_epochs"] == 60
    assert resolve_hparams(JTT, "celeba", {})["upweight"] == 50


# ----------------------------------------------------------------------------------------------
# A model whose predictions we control: it reads the example's index from its first pixel


N_TRAIN = 9  # with batch size 4 the trainer skips the trailing batch of one in training


def indexed_dataset(size: int = 1) -> SpuriousDataset:
    """Images whose pixel (0, 0, 0) is the example's index; groups 2*y + a with y, a alternating."""
    def split(name: str, n: int) -> object:
        pixels = torch.zeros(n, 3, size, size, dtype=torch.uint8)
        pixels[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
        index = torch.arange(n)
        return make_split(name, index % 2, (index // 2) % 2, InMemoryImages(pixels), [2])

    splits = {"train": split("train", N_TRAIN), "val": split("val", 8), "test": split("test", 8)}
    return SpuriousDataset("indexed", ["a", "b"], ["attr"], [["u", "v"]], splits, "plain")  # type: ignore[arg-type]


class LookupModel(nn.Module):
    """Predicts ``table[index]`` for the example whose index is encoded in its first pixel."""

    def __init__(self, table: list[int]) -> None:
        super().__init__()
        self.table = torch.tensor(table)
        self.unused = nn.Parameter(torch.zeros(2))  # something for the optimiser; lr 0 keeps the table fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = torch.round((x[:, 0, 0, 0] * 0.5 + 0.5) * 255).long()  # undo DeviceData's (p/255 - 0.5)/0.5
        logits = nn.functional.one_hot(self.table[index % len(self.table)], 2).float() * 5.0
        return logits + self.unused


def make_jtt(make_model: object, dataset: SpuriousDataset, **overrides: object) -> JTT:
    hparams = resolve_hparams(JTT, "test", {}, {"batch_size": 4, "optimizer": "sgd", **overrides})
    context = MethodContext(hparams=hparams, dataset_info=dataset.info(), device=torch.device("cpu"),
                            make_model=make_model, seed=0)  # type: ignore[arg-type]
    return JTT(context)


@pytest.mark.parametrize("error_set_pass", ["eval", "train"])
def test_error_set_and_upsampling_for_a_model_with_known_predictions(tmp_path: Path, error_set_pass: str) -> None:
    dataset = indexed_dataset()
    labels = dataset.splits["train"].y  # 0, 1, 0, 1, ...
    table = labels.tolist()
    wrong = [1, 4, 8]  # example 8 is the one the trainer skips in a training pass of batches of 4
    for i in wrong:
        table[i] = 1 - table[i]
    method = make_jtt(lambda: LookupModel(table), dataset, lr=0.0, id_epochs=2, epochs=1, upweight=3,
                      error_set_pass=error_set_pass)
    assert [(s.name, s.epochs, s.selectable) for s in method.stages()] == [
        ("identify", 2 if error_set_pass == "eval" else 3, False), ("final", 1, True)]
    data = DeviceData(dataset, torch.device("cpu"), train_groups_allowed=False, normalisation=SYMMETRIC_NORMALISATION)
    trainer.train(method, data, RunDir(tmp_path / "run"), 0, GroupStructure.from_info(dataset.info()),
                  Progress(quiet=True))

    assert method.error_set is not None and method.error_set.tolist() == wrong
    order = method.epoch_indices(method.stages()[1], 0, N_TRAIN, torch.Generator().manual_seed(0))
    assert torch.bincount(order, minlength=N_TRAIN).tolist() == [4 if i in wrong else 1 for i in range(N_TRAIN)]
    assert order.tolist() != sorted(order.tolist())  # shuffled

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final_logs = [r["method"] for r in records if r["stage"] == "final"]
    groups = dataset.splits["train"].group
    assert final_logs[0]["error_set_size"] == 3 and final_logs[0]["upsampled_train_size"] == N_TRAIN + 3 * 3
    assert final_logs[0]["error_set_group_counts_bookkeeping_not_used_by_method"] == torch.bincount(
        groups[wrong], minlength=4).tolist()
    assert all(not r["selectable"] for r in records if r["stage"] == "identify")


def test_stage_two_starts_from_a_fresh_model_and_optimiser() -> None:
    dataset = indexed_dataset(size=8)
    created: list[tuple[nn.Module, dict]] = []

    def make_model() -> nn.Module:
        model = build_backbone("small-cnn", 2, 3, False, None)
        created.append((model, copy.deepcopy(model.state_dict())))
        return model

    method = make_jtt(make_model, dataset, lr=0.5, id_epochs=1, epochs=1)
    identify, final = method.stages()
    data = DeviceData(dataset, torch.device("cpu"), train_groups_allowed=False, normalisation=SYMMETRIC_NORMALISATION)
    method.begin_stage(identify, data, resuming=False)
    x = data.images("train", torch.arange(N_TRAIN), train=True)
    for _ in range(3):
        method.update(Batch(x=x, y=data.labels("train"), index=torch.arange(N_TRAIN)))
    trained_stage_one = copy.deepcopy(method.model.state_dict())
    assert any(not torch.equal(trained_stage_one[k], v) for k, v in created[0][1].items())

    method.begin_stage(final, data, resuming=False)
    assert len(created) == 2 and method.model is created[1][0]
    fresh = method.model.state_dict()
    for key, initial in created[1][1].items():
        assert torch.equal(fresh[key], initial)  # untouched since its creation
    assert all(not torch.equal(fresh[k], trained_stage_one[k]) for k in fresh if k.endswith("weight"))
    assert all(not torch.equal(fresh[k], created[0][1][k]) for k in fresh if k.endswith("weight"))  # a new draw
    assert method.optimizer.param_groups[0]["params"] == list(method.model.parameters())
    assert not method.optimizer.state  # no momentum carried over from stage 1


# ----------------------------------------------------------------------------------------------
# End to end through the runner: a resumed run does not redo stage 1


def run_jtt(data_root: Path, out: Path, interrupt_after: int | None, error_set_pass: str,
            monkeypatch: pytest.MonkeyPatch) -> tuple[Path, int, int]:
    """Returns the run folder, the epochs trained in this call, and how often the error set was computed."""
    identifications: list[int] = []
    real_identify = JTT._identify_errors

    def counting_identify(self: JTT, data: DeviceData) -> torch.Tensor:
        identifications.append(1)
        return real_identify(self, data)

    monkeypatch.setattr(JTT, "_identify_errors", counting_identify)
    request = runner.RunRequest(
        method="jtt", dataset="custom", data_root=str(data_root), out=str(out), epochs=2, backbone="small-cnn",
        hparam_overrides=["pretrained=false", "batch_size=8", "lr=0.05", "id_epochs=2", "upweight=3",
                 f"error_set_pass={error_set_pass}"], device="cpu")
    run_dir, trained = run_seed0(request, monkeypatch, interrupt_after)
    return run_dir, trained, len(identifications)


@pytest.mark.parametrize(("error_set_pass", "interrupt_after"), [("eval", 3), ("train", 3)])
def test_resumed_run_does_not_redo_stage_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error_set_pass: str, interrupt_after: int
) -> None:
    # eval: 2 identify epochs + 2 final; stopped after final epoch 1. train: 3 identify epochs + 2 final;
    # stopped right at the stage boundary, so the error set must come from the checkpointed training pass.
    identify_epochs = 2 if error_set_pass == "eval" else 3
    data_root = write_custom_dataset(tmp_path / "data", n_per_group=6)
    straight, trained, identified = run_jtt(data_root, tmp_path / "straight", None, error_set_pass, monkeypatch)
    assert (trained, identified) == (identify_epochs + 2, 1)
    _, trained, _ = run_jtt(data_root, tmp_path / "resumed", interrupt_after, error_set_pass, monkeypatch)
    assert trained == interrupt_after
    resumed, trained, identified = run_jtt(data_root, tmp_path / "resumed", None, error_set_pass, monkeypatch)
    assert trained == identify_epochs + 2 - interrupt_after
    assert identified == (1 if interrupt_after == identify_epochs else 0)

    def records(path: Path) -> list[dict]:
        return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]

    straight_records, resumed_records = records(straight), records(resumed)
    assert [(r["stage"], r["epoch"]) for r in resumed_records] == (
        [("identify", e) for e in range(1, identify_epochs + 1)] + [("final", 1), ("final", 2)])
    for a, b in zip(straight_records, resumed_records):
        assert (a["eval"], a["train"], a["method"]) == (b["eval"], b["train"], b["method"])
    config = json.loads((resumed / "config.json").read_text())
    assert config["uses_train_group_labels"] is False
    final = json.loads((resumed / "final.json").read_text())
    assert final["selection"]["val-worst-group"]["model"]["stage"] == "final"
