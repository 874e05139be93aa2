"""DFR: group-balanced subsets, the C grid, the scaler folding, the repair of a spurious linear toy,
the DFR_train variant and the reuse of a finished ERM run."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from helpers import write_custom_dataset
from torch import nn

from bench.core.backbones import SYMMETRIC_NORMALISATION, Classifier
from bench.core.dataset import InMemoryImages, SpuriousDataset, make_split
from bench.core.device_data import DeviceData
from bench.core.errors import ConfigError
from bench.core.metrics import worst_group_accuracy
from bench.runner import RunRequest, execute, prepare
from bench.trainer import evaluate
from methods import get_method
from methods.base import BaseRun, MethodContext, Stage, resolve_hparams, sample_hparams
from methods.dfr import (
    C_GRID,
    DFR,
    FEATURE_ARTIFACT,
    Standardizer,
    fit_class_scores,
    fold_standardization,
    group_balanced_subset,
    l1_logistic_regression,
    predict_classes,
    tune_c,
    worst_group_accuracy_of,
)

REFIT = Stage("refit", 1, kind="fit")
DFR_TRAIN = get_method("dfr-train")  # the same class, registered again with variant=train


# ---------------------------------------------------------------------------------------------
# A dataset whose "images" are 3 pixels = 3 features, so DFR's featurizer can be the identity


def _pixels(features: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.clip(np.round(features), 0, 255).astype(np.uint8)[:, :, None, None])


def spurious_toy_split(name: str, counts: tuple[int, int, int, int], rng: np.random.Generator):
    """Groups g = 2y + a with the given counts. Pixel 0: the core feature (y, noisy), pixel 1: the
    spurious one (a, nearly noiseless), pixel 2: noise."""
    group = np.repeat(np.arange(4), counts)
    y, a = group // 2, group % 2
    core = 128 + 40 * (2 * y - 1) + rng.normal(0, 40, len(y))
    spurious = 128 + 60 * (2 * a - 1) + rng.normal(0, 10, len(y))
    noise = 128 + rng.normal(0, 40, len(y))
    pixels = _pixels(np.stack([core, spurious, noise], axis=1))
    return make_split(name, torch.from_numpy(y), torch.from_numpy(a), InMemoryImages(pixels), [2])


def spurious_toy(train=(950, 50, 50, 950), val=(100, 100, 100, 100), test=(500, 500, 500, 500), seed=0):
    """Train: the spurious pixel equals y in 95% of the examples; val and test are group-balanced."""
    rng = np.random.default_rng(seed)
    splits = {n: spurious_toy_split(n, c, rng) for n, c in (("train", train), ("val", val), ("test", test))}
    return SpuriousDataset(
        name="dfr-toy", class_names=["c0", "c1"], attr_names=["a"], attr_value_names=[["a0", "a1"]],
        splits=splits, average_kind="group_mean",
    )


def make_method(cls, dataset: SpuriousDataset, overrides: dict | None = None, seed: int = 0):
    hparams = resolve_hparams(cls, dataset.name, {}, overrides or {})
    context = MethodContext(
        hparams=hparams,
        dataset_info=dataset.info(),
        device=torch.device("cpu"),
        make_model=lambda: Classifier(nn.Flatten(), 3, dataset.n_classes),
        seed=seed,
    )
    method = cls(context)
    data = DeviceData(dataset, torch.device("cpu"), cls.uses_train_group_labels(hparams),
                      normalisation=SYMMETRIC_NORMALISATION)
    return method, data


def worst_group_on_test(method, data) -> float:
    counts = evaluate(method, data)["model"]["test"]
    return worst_group_accuracy(counts["correct"], counts["total"])


# ---------------------------------------------------------------------------------------------
# Group-balanced subsets


def test_group_balanced_subset_keeps_min_g_of_every_group():
    groups = np.array([0] * 5 + [1] * 2 + [2] * 7 + [3] * 3)
    rng = np.random.default_rng(0)
    np.random.default_rng(1).shuffle(groups)
    draws = []
    for _ in range(5):
        subset = group_balanced_subset(groups, rng)
        assert len(np.unique(subset)) == len(subset) == 8
        assert np.bincount(groups[subset], minlength=4).tolist() == [2, 2, 2, 2]
        draws.append(tuple(sorted(subset.tolist())))
    assert len(set(draws)) > 1  # fresh random subsets, not the first min_g of each group


def test_group_balanced_subset_skips_empty_groups():
    groups = np.array([0, 0, 0, 2, 2, 2, 2, 3, 3])
    subset = group_balanced_subset(groups, np.random.default_rng(0))
    assert np.bincount(groups[subset], minlength=4).tolist() == [2, 0, 2, 2]


def test_refit_subsets_come_from_val_for_dfr_and_from_train_for_dfr_train():
    # Different minimum group sizes per split: val's is 30, train's is 40.
    dataset = spurious_toy(train=(400, 40, 60, 400), val=(30, 50, 60, 70), test=(20, 20, 20, 20))
    method, data = make_method(DFR, dataset, {"n_refits": 2})
    log = method.fit(REFIT, data)
    assert log["refit_subset_group_counts"] == [30, 30, 30, 30]
    assert log["variant"] == "val" and log["n_refits"] == 2
    # Tuning fits on a balanced subset of half of val.
    tuning = log["tuning_subset_group_counts"]
    assert len(set(tuning)) == 1 and 0 < tuning[0] <= 30

    method, data = make_method(DFR_TRAIN, dataset, {"n_refits": 2})
    log = method.fit(REFIT, data)
    assert log["refit_subset_group_counts"] == [40, 40, 40, 40]
    assert log["tuning_subset_group_counts"] == [40, 40, 40, 40]
    assert log["variant"] == "train"


def test_dfr_never_reads_training_groups_and_dfr_train_declares_it():
    assert DFR.uses_train_group_labels(resolve_hparams(DFR, "dfr-toy", {})) is False
    assert DFR_TRAIN.uses_train_group_labels(resolve_hparams(DFR_TRAIN, "dfr-toy", {})) is True
    assert get_method("dfr") is DFR and issubclass(DFR_TRAIN, DFR) and DFR_TRAIN.name == "dfr-train"
    assert "DFR_train" in DFR_TRAIN.paper and "DFR_val" in DFR.paper
    # DeviceData refuses training groups to DFR; its fit must succeed anyway.
    method, data = make_method(DFR, spurious_toy(), {"n_refits": 1})
    with pytest.raises(RuntimeError):
        data.groups("train")
    method.fit(REFIT, data)
    # DFR_train's balanced training subsets need the training groups: not offered under the name dfr.
    with pytest.raises(ConfigError, match="variant='train': .*--method dfr-train"):
        resolve_hparams(DFR, "dfr-toy", {}, {"variant": "train"})
    with pytest.raises(ConfigError, match="variant='val': .*--method dfr$"):
        resolve_hparams(DFR_TRAIN, "dfr-toy", {}, {"variant": "val"})
    with pytest.raises(ConfigError, match="choose one of val"):
        resolve_hparams(DFR, "dfr-toy", {}, {"variant": "both"})
    with pytest.raises(ConfigError, match="scaler_fit"):
        resolve_hparams(DFR_TRAIN, "dfr-toy", {}, {"scaler_fit": "val"})
    assert resolve_hparams(DFR_TRAIN, "dfr-toy", {})["n_refits"] == 10
    assert resolve_hparams(DFR, "dfr-toy", {})["n_refits"] == 20


# ---------------------------------------------------------------------------------------------
# The C grid and L1


def test_c_grid_is_the_papers_and_tuning_scores_every_c_picking_the_first_best():
    assert C_GRID == (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    groups = 2 * y + rng.integers(0, 2, 300)
    x = np.column_stack([(2 * y - 1) * 0.5 + rng.normal(0, 1, 300), rng.normal(0, 1, (300, 10))])
    best, scores = tune_c(x[:150], y[:150], x[150:], y[150:], groups[150:], 2, 100, rng)
    assert list(scores) == list(C_GRID)
    top = max(scores.values())
    assert best == next(c for c in C_GRID if scores[c] == top)
    # Each score is the worst-group accuracy of that C's fit.
    weight, bias = fit_class_scores(x[:150], y[:150], 2, 0.01, 100, 0)
    assert np.count_nonzero(weight) == 0  # C = 0.01 zeroes every weight here: L1, not L2
    assert scores[0.01] == worst_group_accuracy_of(predict_classes(weight, bias, x[150:]), y[150:], groups[150:])


def test_l1_gives_sparser_weights_as_c_decreases():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    x = np.column_stack([(2 * y - 1) + rng.normal(0, 1, 400), rng.normal(0, 1, (400, 30))])
    nonzero = [np.count_nonzero(fit_class_scores(x, y, 2, c, 100, 0)[0][1]) for c in (1.0, 0.1, 0.03)]
    assert nonzero[0] > nonzero[1] >= nonzero[2] >= 1
    assert nonzero[0] > 20  # weak regularisation keeps most noise features


# ---------------------------------------------------------------------------------------------
# Installing the linear model


def test_fold_standardization_by_hand():
    weight, bias = np.array([[1.0, 2.0]]), np.array([0.5])
    mean, scale = np.array([1.0, -1.0]), np.array([2.0, 4.0])
    folded_weight, folded_bias = fold_standardization(weight, bias, mean, scale)
    np.testing.assert_allclose(folded_weight, [[0.5, 0.5]])
    np.testing.assert_allclose(folded_bias, [0.5])  # 0.5 - (1 * 1/2 + 2 * -1/4)
    # At x = (3, 3): standardised (1, 1) -> 1 + 2 + 0.5 = 3.5; folded 1.5 + 1.5 + 0.5.
    assert (folded_weight @ np.array([3.0, 3.0]) + folded_bias)[0] == pytest.approx(3.5)


def test_folded_layer_gives_the_logits_of_scaler_plus_logistic_regression():
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, [1.0, 5.0, 0.2, 10.0], size=(200, 4))
    y = (x[:, 0] + 0.1 * x[:, 1] + rng.normal(0, 1, 200) > 3.5).astype(int)
    sk_scaler = StandardScaler().fit(x)
    reference = l1_logistic_regression(0.3, random_state=7).fit(sk_scaler.transform(x), y)

    scaler = Standardizer.fit(x)
    weight, bias = fit_class_scores(scaler.transform(x), y, 2, 0.3, 100, 7)
    folded_weight, folded_bias = fold_standardization(weight, bias, scaler.mean, scaler.scale)
    layer = nn.Linear(4, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(folded_weight))
        layer.bias.copy_(torch.from_numpy(folded_bias))
    logits = layer(torch.from_numpy(x)).detach().numpy()
    expected = reference.decision_function(sk_scaler.transform(x))
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(logits[:, 1], expected / 2, rtol=1e-9, atol=1e-9)  # softmax = the LR probability
    assert (logits.argmax(1) == reference.predict(sk_scaler.transform(x))).all()


def test_multiclass_is_one_vs_rest_liblinear():
    from sklearn.multiclass import OneVsRestClassifier

    rng = np.random.default_rng(0)
    y = np.arange(240) % 3
    x = rng.normal(0, 1, (240, 5)) + np.eye(3, 5)[y] * 2
    weight, bias = fit_class_scores(x, y, 3, 0.7, 100, 3)
    reference = OneVsRestClassifier(l1_logistic_regression(0.7, random_state=3)).fit(x, y)
    np.testing.assert_allclose(x @ weight.T + bias, reference.decision_function(x), rtol=1e-9, atol=1e-9)
    with pytest.raises(Exception, match="no example of class"):
        fit_class_scores(x[y < 2], y[y < 2], 3, 0.7, 100, 3)


# ---------------------------------------------------------------------------------------------
# DFR repairs a model that relies on a spurious feature


def test_dfr_repairs_a_linear_toy_where_the_spurious_feature_dominates():
    from sklearn.linear_model import LogisticRegression

    dataset = spurious_toy()
    method, data = make_method(DFR, dataset)
    train_x = data.predict(method.model, "train", features=True).numpy()
    test_x = data.predict(method.model, "test", features=True).numpy()
    test_y, test_g = dataset.splits["test"].y.numpy(), dataset.splits["test"].group.numpy()

    # ERM on the training features follows the spurious pixel: the minority groups fail.
    erm = LogisticRegression(C=100.0).fit(train_x, dataset.splits["train"].y.numpy())
    erm_worst = worst_group_accuracy_of(erm.predict(test_x), test_y, test_g)
    assert erm_worst < 0.4

    log = method.fit(REFIT, data)
    dfr_worst = worst_group_on_test(method, data)
    assert dfr_worst > 0.75 and dfr_worst > erm_worst + 0.35
    assert log["C"] in C_GRID and log["base_model"] == "trained"
    # The refitted layer leans on the core pixel (0), not the spurious one (1).
    weight = method.model.classifier.weight.detach()
    assert abs(weight[1, 0] - weight[0, 0]) > 2 * abs(weight[1, 1] - weight[0, 1])


def test_scaler_fit_train_and_val_both_repair_the_toy():
    dataset = spurious_toy(seed=3)
    for scaler_fit in ("train", "val"):
        method, data = make_method(DFR, dataset, {"scaler_fit": scaler_fit, "n_refits": 5})
        assert method.fit(REFIT, data)["scaler_fit"] == scaler_fit
        assert worst_group_on_test(method, data) > 0.75


# ---------------------------------------------------------------------------------------------
# Through the runner: reuse of a finished ERM run, the feature cache, the trained fallback


def _request(method: str, root, out, hparams: list[str] | None = None) -> RunRequest:
    return RunRequest(
        method=method, dataset="custom", data_root=str(root), out=str(out), device="cpu", backbone="small-cnn",
        hparam_overrides=["pretrained=false", "epochs=1", "batch_size=8", "lr=0.01", *(hparams or [])],
    )


def _fit_log(run_dir) -> dict:
    refit = [r for r in run_dir.read_metrics() if r["stage"] == "refit"]
    assert len(refit) == 1
    return refit[0]["method"]


def test_dfr_reuses_a_finished_erm_run_and_its_features_cache(tmp_path):
    root = write_custom_dataset(tmp_path / "data", n_per_group=4, size=8)
    out = tmp_path / "results"
    erm = prepare(_request("erm", root, out))
    assert execute(erm, seed=0, quiet=True)["status"] == "done"
    erm_dir = erm.run_dir(0)

    dfr = prepare(_request("dfr", root, out, ["n_refits=2"]))
    final = execute(dfr, seed=0, quiet=True)
    assert final["status"] == "done"
    run_dir = dfr.run_dir(0)
    log = _fit_log(run_dir)
    reused = str(erm_dir.path.relative_to(out))
    assert log["base_model"] == f"reused {reused}"
    assert log["features"] == "extracted" and (run_dir.path / f"{FEATURE_ARTIFACT}.pt").exists()
    assert json.loads(run_dir.config.read_text())["base_run"] == reused
    assert not [r for r in run_dir.read_metrics() if r["stage"] == "erm"]  # no ERM epoch was trained
    assert final["selection"]["val-worst-group"]["model"]["stage"] == "refit"
    # The base model is the ERM run's final model: the featurizer is unchanged by the refit.
    erm_state = torch.load(erm_dir.checkpoint, weights_only=False)["method"]["model"]
    dfr_state = torch.load(run_dir.checkpoint, weights_only=False)["method"]["model"]
    for key, value in erm_state.items():
        if key.startswith("featurizer."):
            assert torch.equal(value, dfr_state[key]), key
    assert not torch.equal(erm_state["classifier.weight"], dfr_state["classifier.weight"])

    # Rerun after losing everything but the cache: the features are not extracted again.
    for name in ("final.json", "checkpoint.pt", "metrics.jsonl"):
        (run_dir.path / name).unlink()
    assert execute(dfr, seed=0, quiet=True)["status"] == "done"
    assert _fit_log(run_dir)["features"] == "cached"


def test_dfr_trains_the_same_base_model_as_erm_when_no_run_exists(tmp_path):
    root = write_custom_dataset(tmp_path / "data", n_per_group=4, size=8)
    erm = prepare(_request("erm", root, tmp_path / "erm-results"))
    execute(erm, seed=1, quiet=True)
    # A different --out: no ERM run to reuse, so DFR trains its base model itself.
    dfr = prepare(_request("dfr", root, tmp_path / "dfr-results", ["n_refits=2"]))
    assert execute(dfr, seed=1, quiet=True)["status"] == "done"
    run_dir = dfr.run_dir(1)
    assert _fit_log(run_dir)["base_model"] == "trained"
    erm_records = [r for r in run_dir.read_metrics() if r["stage"] == "erm"]
    assert len(erm_records) == 1 and erm_records[0]["selectable"] is False
    # Same initialisation, batches and steps as the erm run of the same seed and training hparams.
    erm_state = torch.load(erm.run_dir(1).checkpoint, weights_only=False)["method"]["model"]
    dfr_state = torch.load(run_dir.checkpoint, weights_only=False)["method"]["model"]
    for key, value in erm_state.items():
        if key.startswith("featurizer."):
            assert torch.equal(value, dfr_state[key]), key
    assert erm_records[0]["eval"]["model"] == erm.run_dir(1).read_metrics()[0]["eval"]["model"]


def test_dfr_does_not_reuse_an_erm_run_with_other_training_hparams(tmp_path):
    root = write_custom_dataset(tmp_path / "data", n_per_group=4, size=8)
    out = tmp_path / "results"
    execute(prepare(_request("erm", root, out)), seed=0, quiet=True)
    dfr = prepare(_request("dfr", root, out, ["n_refits=1", "weight_decay=0.01"]))
    assert execute(dfr, seed=0, quiet=True)["status"] == "done"
    assert _fit_log(dfr.run_dir(0))["base_model"] == "trained"


def test_dfr_has_no_random_search_of_its_own():
    # C is tuned inside every run; sweeps only vary the shared training hparams of the base model.
    assert all(spec.search is None for spec in DFR.own_hparams.values())
    draw = sample_hparams(DFR, "dfr-toy", {}, draw=3)
    assert draw["variant"] == "val" and draw["n_refits"] == 20


def test_stages_are_pure_and_take_the_base_run_from_the_context():
    # The runner finds the finished ERM run (bench.runner.find_base_run) and hands it over; the method's
    # stages() reads no file and draws no random number, so DFR's own training sees an erm run's draws.
    dataset = spurious_toy()
    hparams = resolve_hparams(DFR, "dfr-toy", {}, {"epochs": 3})

    def method_with(base_run):
        context = MethodContext(hparams=hparams, dataset_info=dataset.info(), device=torch.device("cpu"),
                                make_model=lambda: Classifier(nn.Flatten(), 3, 2), seed=0, base_run=base_run)
        return DFR(context)

    trained = method_with(None)
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    expected = (torch.rand(1).item(), float(np.random.rand()), random.random())
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    assert [s.epochs for s in trained.stages()] == [3, 1] == [s.epochs for s in trained.stages()]
    assert (torch.rand(1).item(), float(np.random.rand()), random.random()) == expected

    source = Classifier(nn.Flatten(), 3, 2)
    reused = method_with(BaseRun("somewhere/erm/seed0", lambda: {"model": source.state_dict()}))
    assert [s.epochs for s in reused.stages()] == [0, 1]
    data = DeviceData(dataset, torch.device("cpu"), False, normalisation=SYMMETRIC_NORMALISATION)
    reused.begin_stage(REFIT, data, resuming=False)
    for key, value in source.state_dict().items():
        assert torch.equal(reused.model.state_dict()[key], value)
