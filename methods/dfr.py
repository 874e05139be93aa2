"""DFR: Deep Feature Reweighting -- retrain only the last layer, on group-balanced data.

Kirichenko, Izmailov, Wilson, "Last Layer Re-Training is Sufficient for Robustness to Spurious
Correlations", ICLR 2023. Reference code: PolinaKirichenko/deep_feature_reweighting
(``dfr_evaluate_spurious.py``, the paper's code) and izmailovpavel/spurious_feature_learning
(``dfr_evaluate_spurious.py``, the follow-up with small changes).

One run, two stages, through the shared trainer:

1. ``erm`` (gradient, not selectable): the base model, plain cross-entropy ERM for ``epochs`` epochs
   (``methods.base.erm_step``); its final weights are used (no early stopping, as the paper). The step,
   the initialisation and the batch order are those of an ``erm`` run with the same seed and training
   hparams, so DFR declares ``base_method = "erm"``: when such a run has already finished under the same
   ``--out`` (same dataset, dataset options, backbone, weights and training hparams), the runner hands it
   over as ``context.base_run``, its final weights are loaded and this stage runs 0 epochs. The runner
   records its decision in ``config.json`` (``base_run``; a resumed run keeps it) and the fit log says
   ``base_model``: ``reused <run>`` or ``trained``.
   Data augmentation: the paper's code trains its base models with ``--augment_data`` (its README
   commands for Waterbirds and CelebA), so on those two datasets DFR sets the dataset option
   ``augment=true`` (``data_options_per_dataset``; ``--data-option augment=false`` turns it off). Its
   augmentation there is group_DRO's Waterbirds transform for both datasets; for CelebA the harness
   applies CelebA's own (random resized crop of ratio 1-4/3 and flip), a deviation in the crop only.
2. ``refit`` (fit, selectable): penultimate features (``model.featurizer``, eval mode, eval transform)
   are extracted once and kept in the run's artifact store (``dfr_features``, keyed by a digest of the
   featurizer's weights: val features, plus the training features' mean/std when the scaler is fit on
   them, plus all training features for ``dfr-train`` -- 1.3 GB for CelebA with ResNet-50). Then L1
   logistic regression (scikit-learn, liblinear) is tuned and refitted as below, and the averaged,
   standardisation-folded linear model is installed as ``model.classifier``.
   The shared evaluator then scores the refitted model like any other, so the test metrics of the
   ``refit`` record are DFR's result.

Variants (where the references disagree, the choice is named):

* ``dfr`` = DFR^Val_Tr ("DFR_val", hparam ``variant=val``), the paper's main method. Tuning
  (``dfr_on_validation_tune``, one repeat): shuffle val, split it in halves; fit on a group-balanced
  subset of the second half (standardised with a scaler fit on that subset) for each C of the grid
  [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01]; score worst-group accuracy on the whole first half; keep the
  best C (ties: the first in grid order, i.e. the weakest regularisation). Final fit
  (``dfr_on_validation_eval``): ``n_refits`` = 20 fits with that C, each on a fresh group-balanced subset
  of the WHOLE val set; ``coef_``/``intercept_`` are averaged. Class weights are fixed to 1 (the
  reference does the same when it balances val and adds no training data, its default).
  The final fit's scaler is where the references disagree: ``scaler_fit=train`` (default) fits it on
  all training-set features, as the paper's code (``scaler.fit(all_embeddings["train"])``);
  ``scaler_fit=val`` fits it on all validation features, as izmailovpavel/spurious_feature_learning.
  Only val group labels are used, exactly as every method's model selection uses them, so
  ``uses_train_group_labels`` is false for it.
* ``dfr-train`` = DFR^Tr_Tr ("DFR_train", ``variant=train``): the balanced subsets are drawn from the
  TRAINING set, which needs training group labels: ``uses_train_group_labels`` is true for this variant
  (the runner reads it from the resolved hparams before building the method; it decides whether batches
  and ``data.groups("train")`` carry groups, and it is recorded in every run's config). The same class
  is registered under this second name with ``variant`` fixed to ``train``, so that its records say
  truthfully that it used training groups and ``dfr`` can never touch them. As
  the paper's code (``dfr_train_subset_tune``/``dfr_train_subset_eval``): scaler fit on all training
  features; tuning fits one balanced training subset per C with ``max_iter=20`` and scores worst-group
  accuracy on the whole val set; the final model averages ``n_refits`` = 10 fits. The optional
  class-weight grid (``--tune_class_weights_dfr_train``, off by default there) is not implemented.

Details of this implementation:

* Group-balanced subset: every group present in the split keeps ``min_g |g|`` examples drawn at random.
  The references balance over ``range(max(g) + 1)``, which fails when a group is empty; groups with no
  example are skipped here (Waterbirds/CelebA/UrbanCars have every group in every split).
* Multi-class data (Spawrious): the references are binary; newer scikit-learn refuses liblinear with
  3+ classes, so one binary L1 liblinear model is fit per class (one-vs-rest, what scikit-learn did with
  liblinear before 1.5) and the class with the highest score wins.
* Installing the linear model: a binary fit's decision ``z = w.x + b`` becomes the two logits
  ``(-z/2, z/2)``, whose softmax is the logistic model's probability and whose argmax is its
  prediction; the scaler is folded in, ``w' = w / s``, ``b' = b - sum(w * m / s)``.
* Randomness (val split, subsets, liblinear's coordinate order) comes from a generator seeded by the
  run's seed, so a run is reproducible.

Per-dataset defaults (base-model protocol of the paper's code README / ``train_classifier.py``):
Waterbirds SGD lr 1e-3, wd 1e-3, batch 32, 100 epochs; CelebA lr 1e-3, wd 1e-4, batch 128, 50 epochs
(both ResNet-50 ImageNet-pretrained, momentum 0.9; the paper's augmentation is the dataset loader's
concern). UrbanCars is not in the DFR paper: its dataset protocol (Whac-A-Mole's ERM) is used as is
(Whac-A-Mole's own DFR is a gradient fc-retraining on a group-subsampled train set with early stopping,
not the paper's procedure, and is not followed). The synthetic twins use their dataset protocol, which
was tuned on validation for ERM; DFR's own choices (C) are tuned on validation inside every run, so no
per-twin override is needed and ``bench run --method erm`` runs on a twin are reused as base models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bench.core.device_data import DeviceData
from bench.core.errors import DataError
from methods import register_method, register_variant
from methods.base import Batch, Hparam, Method, MethodContext, Stage, erm_step

# The paper code's grid of inverse L1 strengths (deep_feature_reweighting: C_OPTIONS).
C_GRID: tuple[float, ...] = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
# liblinear's iteration cap: scikit-learn's default for DFR_val and DFR_train's final fits; the paper
# code caps DFR_train's tuning fits at 20.
MAX_ITER = 100
TRAIN_TUNE_MAX_ITER = 20

FEATURE_ARTIFACT = "dfr_features"  # the run's artifact store keeps it as dfr_features.pt


# ---------------------------------------------------------------------------------------------
# The math, as plain functions (tested on their own)


def group_balanced_subset(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions of a group-balanced random subset: each group present keeps min_g examples.

    Groups with no example are skipped (see the module docstring). The result is grouped by group
    id, as the reference's concatenation.
    """
    groups = np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    if not members:
        raise DataError("DFR: cannot balance an empty split")
    size = min(len(m) for m in members)
    return np.concatenate([rng.permutation(m)[:size] for m in members])


def worst_group_accuracy_of(predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Minimum accuracy over the groups present (what DFR's tuning maximises)."""
    correct = np.asarray(predictions) == np.asarray(labels)
    return float(min(correct[groups == g].mean() for g in np.unique(groups)))


def _uses_l1_ratio() -> bool:
    # scikit-learn 1.8 deprecated ``penalty`` (removed in 1.10) in favour of ``l1_ratio``; before that,
    # ``l1_ratio`` is ignored unless penalty="elasticnet", so each version needs its own spelling.
    from sklearn.linear_model import LogisticRegression

    return inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated"


def l1_logistic_regression(c: float, max_iter: int = MAX_ITER, random_state: int | None = None) -> Any:
    """``LogisticRegression(penalty="l1", C=c, solver="liblinear")`` in this scikit-learn's spelling."""
    from sklearn.linear_model import LogisticRegression

    penalty: dict[str, Any] = {"l1_ratio": 1.0} if _uses_l1_ratio() else {"penalty": "l1"}
    return LogisticRegression(C=c, solver="liblinear", max_iter=max_iter, random_state=random_state, **penalty)


def fit_class_scores(
    x: np.ndarray, y: np.ndarray, n_classes: int, c: float, max_iter: int, random_state: int
) -> tuple[np.ndarray, np.ndarray]:
    """L1 logistic regression on ``(x, y)`` as a linear map to ``n_classes`` scores: ``(W [K, d], b [K])``.

    Binary: the decision ``z`` becomes scores ``(-z/2, z/2)``; 3+ classes: one-vs-rest, one row per class.
    Every class must occur in ``y``.
    """
    from sklearn.exceptions import ConvergenceWarning

    present = np.unique(y)
    if len(present) != n_classes:
        missing = sorted(set(range(n_classes)) - set(present.tolist()))
        raise DataError(f"DFR: the data it refits on has no example of class(es) {missing}")
    with warnings.catch_warnings():
        # The reference fits hit the iteration cap too (DFR_train's tuning caps it at 20 on purpose).
        warnings.simplefilter("ignore", ConvergenceWarning)
        if n_classes == 2:
            model = l1_logistic_regression(c, max_iter, random_state).fit(x, y)
            w, b = model.coef_[0].astype(np.float64), float(model.intercept_[0])
            return np.stack([-w / 2, w / 2]), np.array([-b / 2, b / 2])
        weights, biases = [], []
        for k in range(n_classes):
            model = l1_logistic_regression(c, max_iter, random_state).fit(x, (y == k).astype(np.int64))
            weights.append(model.coef_[0].astype(np.float64))
            biases.append(float(model.intercept_[0]))
        return np.stack(weights), np.array(biases)


def fold_standardization(
    weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The linear map on raw features equal to ``weight @ ((x - mean) / scale) + bias``.

    ``w' = w / s``, ``b' = b - sum(w * m / s)``.
    """
    folded = weight / scale[None, :]
    return folded, bias - folded @ mean


@dataclasses.dataclass
class Standardizer:
    """Mean and scale of scikit-learn's StandardScaler (zero-variance features keep scale 1)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(x)
        return cls(scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.scale


def predict_classes(weight: np.ndarray, bias: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Argmax of the linear scores (ties to the lower class, as scikit-learn's ``decision > 0``)."""
    return np.argmax(x @ weight.T + bias, axis=1)


def tune_c(
    fit_x: np.ndarray,
    fit_y: np.ndarray,
    score_x: np.ndarray,
    score_y: np.ndarray,
    score_groups: np.ndarray,
    n_classes: int,
    max_iter: int,
    rng: np.random.Generator,
    grid: tuple[float, ...] = C_GRID,
) -> tuple[float, dict[float, float]]:
    """Fit one model per C on (already standardised) ``fit_x``; pick the best worst-group accuracy on
    the scoring data. Returns the chosen C (first best in grid order) and every C's score."""
    scores: dict[float, float] = {}
    for c in grid:
        weight, bias = fit_class_scores(fit_x, fit_y, n_classes, c, max_iter, int(rng.integers(2**31 - 1)))
        scores[c] = worst_group_accuracy_of(predict_classes(weight, bias, score_x), score_y, score_groups)
    best = max(grid, key=lambda c: (scores[c], -grid.index(c)))
    return best, scores


def averaged_refit(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    scaler: Standardizer,
    n_classes: int,
    c: float,
    n_refits: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Average of ``n_refits`` fits, each on a fresh group-balanced subset of ``x`` (standardised by
    ``scaler``). Returns (W, b) on standardised features and the group sizes of one subset."""
    weights, biases = [], []
    subset_sizes: list[int] = []
    for _ in range(n_refits):
        subset = group_balanced_subset(groups, rng)
        subset_sizes = np.bincount(groups[subset]).tolist()
        weight, bias = fit_class_scores(
            scaler.transform(x[subset]), y[subset], n_classes, c, MAX_ITER, int(rng.integers(2**31 - 1))
        )
        weights.append(weight)
        biases.append(bias)
    return np.mean(weights, axis=0), np.mean(biases, axis=0), subset_sizes


def model_digest(module: nn.Module) -> str:
    """SHA-1 of a module's state (names and bytes): identifies the featurizer a feature cache belongs to."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The method


@register_method
class DFR(Method):
    name = "dfr"
    paper = (
        "Kirichenko, Izmailov, Wilson, Last Layer Re-Training is Sufficient for Robustness to Spurious "
        "Correlations, ICLR 2023 (DFR_val)"
    )
    own_hparams: ClassVar[dict[str, Hparam]] = {
        "variant": Hparam(
            "val",
            "DFR variant: val = DFR_val (balanced subsets of the validation set); DFR_train is the method dfr-train",
            str,
            choices=("val",),
            refused={"train": "DFR_train is its own method (it uses training group labels): use --method dfr-train"},
        ),
        "n_refits": Hparam(20, "logistic regressions averaged in the final fit (paper code: 20)", int, low=1),
        "scaler_fit": Hparam(
            "train",
            "split whose features fit the final fit's StandardScaler: train (paper code) or val "
            "(izmailovpavel/spurious_feature_learning)",
            str,
            choices=("train", "val"),
        ),
    }
    defaults_per_dataset: ClassVar[dict[str, dict[str, Any]]] = {
        # PolinaKirichenko/deep_feature_reweighting README / train_classifier.py (base-model protocol).
        "waterbirds": {"backbone": "resnet50", "pretrained": True, "optimizer": "sgd", "momentum": 0.9,
                       "lr": 1e-3, "weight_decay": 1e-3, "batch_size": 32, "epochs": 100},
        "celeba": {"backbone": "resnet50", "pretrained": True, "optimizer": "sgd", "momentum": 0.9,
                   "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 128, "epochs": 50},
        # Not in the DFR paper: the dataset's protocol (Whac-A-Mole's ERM) trains the base model.
        "urbancars": {},
    }
    # The same README commands train the base models with --augment_data.
    data_options_per_dataset: ClassVar[dict[str, dict[str, Any]]] = {
        "waterbirds": {"augment": "true"},
        "celeba": {"augment": "true"},
    }
    base_method = "erm"

    @classmethod
    def uses_train_group_labels(cls, hparams: Mapping[str, Any]) -> bool:
        return hparams["variant"] == "train"

    def __init__(self, context: MethodContext) -> None:
        super().__init__(context)
        self.model = self.new_model()
        self.optimizer = self.new_optimizer(self.model.parameters())

    # -- protocol -------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        erm_epochs = 0 if self.context.base_run is not None else int(self.hp["epochs"])
        return [Stage("erm", erm_epochs, selectable=False), Stage("refit", 1, kind="fit")]

    def begin_stage(self, stage: Stage, data: DeviceData, resuming: bool) -> None:
        if stage.name == "refit" and not resuming and self.context.base_run is not None:
            self.model.load_state_dict(self.context.base_run.load_state()["model"])

    def update(self, batch: Batch) -> dict[str, float]:
        _, loss = erm_step(self.model, self.optimizer, batch.x, batch.y, self.precision)
        return {"loss": loss}

    def predictors(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    # -- the refit ------------------------------------------------------------------------------
    def _features(self, data: DeviceData) -> tuple[dict[str, Any], str]:
        """Val features, and train features or only their scaler statistics, from the artifact store if valid."""
        need_train_features = self.hp["variant"] == "train"
        need_train_scaler = self.hp["scaler_fit"] == "train"
        digest = model_digest(self.model.featurizer)
        cached = self.context.artifacts.load(FEATURE_ARTIFACT)
        if cached is not None:
            has_all = "val" in cached and (not need_train_features or "train" in cached) and (
                not need_train_scaler or "train_mean" in cached
            )
            if cached.get("digest") == digest and has_all:
                return cached, "cached"
        features: dict[str, Any] = {"digest": digest}
        features["val"] = data.predict(self.model, "val", features=True).float().cpu()
        if need_train_features or need_train_scaler:
            train = data.predict(self.model, "train", features=True).float().cpu()
            scaler = Standardizer.fit(train.numpy())
            features["train_mean"] = torch.from_numpy(scaler.mean)
            features["train_scale"] = torch.from_numpy(scaler.scale)
            if need_train_features:
                features["train"] = train
        self.context.artifacts.save(FEATURE_ARTIFACT, features)
        return features, "extracted"

    def fit(self, stage: Stage, data: DeviceData) -> dict[str, Any]:
        features, feature_source = self._features(data)
        rng = np.random.default_rng([self.context.seed, 0xDF])
        val_x = features["val"].numpy()
        val_y = data.labels("val").cpu().numpy()
        val_g = data.groups("val").cpu().numpy()
        if self.hp["scaler_fit"] == "train":
            final_scaler = Standardizer(features["train_mean"].numpy(), features["train_scale"].numpy())
        else:
            final_scaler = Standardizer.fit(val_x)

        if self.hp["variant"] == "val":
            order = rng.permutation(len(val_x))
            half = len(val_x) // 2
            fit_part, score_part = order[half:], order[:half]
            tune_subset = fit_part[group_balanced_subset(val_g[fit_part], rng)]
            tune_scaler = Standardizer.fit(val_x[tune_subset])
            best_c, scores = tune_c(
                tune_scaler.transform(val_x[tune_subset]), val_y[tune_subset],
                tune_scaler.transform(val_x[score_part]), val_y[score_part], val_g[score_part],
                self.n_classes, MAX_ITER, rng,
            )
            refit_x, refit_y, refit_g = val_x, val_y, val_g
            tune_sizes = np.bincount(val_g[tune_subset]).tolist()
        else:
            train_x = features["train"].numpy()
            train_y = data.labels("train").cpu().numpy()
            train_g = data.groups("train").cpu().numpy()
            tune_subset = group_balanced_subset(train_g, rng)
            best_c, scores = tune_c(
                final_scaler.transform(train_x[tune_subset]), train_y[tune_subset],
                final_scaler.transform(val_x), val_y, val_g,
                self.n_classes, TRAIN_TUNE_MAX_ITER, rng,
            )
            refit_x, refit_y, refit_g = train_x, train_y, train_g
            tune_sizes = np.bincount(train_g[tune_subset]).tolist()

        weight, bias, refit_sizes = averaged_refit(
            refit_x, refit_y, refit_g, final_scaler, self.n_classes, best_c, int(self.hp["n_refits"]), rng
        )
        folded_weight, folded_bias = fold_standardization(weight, bias, final_scaler.mean, final_scaler.scale)
        with torch.no_grad():
            classifier = self.model.classifier
            classifier.weight.copy_(torch.as_tensor(folded_weight, dtype=classifier.weight.dtype))
            classifier.bias.copy_(torch.as_tensor(folded_bias, dtype=classifier.bias.dtype))
        return {
            "base_model": f"reused {self.context.base_run.source}" if self.context.base_run is not None else "trained",
            "variant": self.hp["variant"],
            "features": feature_source,
            "scaler_fit": self.hp["scaler_fit"],
            "C": best_c,
            "tuning_worst_group_accuracy": {str(c): score for c, score in scores.items()},
            "tuning_subset_group_counts": tune_sizes,
            "refit_subset_group_counts": refit_sizes,
            "n_refits": int(self.hp["n_refits"]),
            "nonzero_weights": int(np.count_nonzero(np.abs(weight).sum(axis=0))),
        }


register_variant(
    DFR,
    "dfr-train",
    paper=(
        "Kirichenko, Izmailov, Wilson, Last Layer Re-Training is Sufficient for Robustness to Spurious "
        "Correlations, ICLR 2023 (DFR_train)"
    ),
    own_hparams={
        "variant": Hparam(
            "train",
            "DFR variant: train = DFR_train (balanced subsets of the training set); DFR_val is the method dfr",
            str,
            choices=("train",),
            refused={"val": "DFR_val is the method dfr: use --method dfr"},
        ),
        "n_refits": Hparam(10, "logistic regressions averaged in the final fit (paper code: 10)", int, low=1),
        "scaler_fit": Hparam(
            "train",
            "split whose features fit the StandardScaler: train (both reference repos, for DFR_train)",
            str,
            choices=("train",),
        ),
    },
)
