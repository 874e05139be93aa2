"""ULE: UnLearning from Experience, a student-teacher method that needs no group labels.

Mitchell, Martínez del Rincón, McLaughlin, "UnLearning from Experience to Avoid Spurious
Correlations", arXiv 2409.02792 (2024); Pattern Analysis and Applications 28(4) (2025).
The math lives in :class:`ULE` and the module-level helpers below; docs/ule.md holds the
design notes, the step-cost measurements and the ablation behind the per-dataset defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods import register_method
from methods.base import Batch, Hparam, Method, MethodContext, Stage, log_uniform, one_of

# Added to the normaliser so that an all-zero input gradient (a dead network) gives 0, not NaN.
# dULE (skpritch/dULE-Clinical-Trial-Success-Prediction) uses the same 1e-8.
NORM_EPS = 1e-8

GRAD_TARGETS = ("logit_centred", "logit_true", "loss", "logit_pred", "prob_true")
GRAD_NORMS = ("student_maxabs", "maxabs", "l2", "none")
DISTANCES = ("mse", "cosine", "orthogonal")
READINGS = ("saliency", "finite_step")
STEP_DIRECTIONS = ("sign", "l2")


# --------------------------------------------------------------------------------------------
# The penalty, as functions of the two input gradients (shared by the method and the tests)


def gradient_scalar(
    logits: torch.Tensor, y: torch.Tensor, target: str, predicted: torch.Tensor | None = None
) -> torch.Tensor:
    """The batch sum of the per-example scalar whose input gradient is the saliency map.

    ``logit_true``: the logit of the true class; ``logit_pred``: the logit of ``predicted`` (the
    student's predicted class, so that both models' maps explain the same output); ``loss``: the
    per-example cross-entropy; ``logit_centred``: the true-class logit minus the mean logit, which,
    unlike a raw logit, the softmax cannot ignore (a term added to every logit changes the raw
    logit's gradient but neither the predictions nor the cross-entropy: docs/ule.md, "Ablation");
    ``prob_true``: the softmax probability of the true class, whose gradient is small on confidently
    right examples, so that a penalty on it concentrates on the student's mistakes.

    Summing over the batch gives each example's own gradient in one backward pass (exactly so for a
    backbone without batch norm; with batch norm in training mode the batch statistics add small
    cross-example terms).
    """
    if target == "logit_true":
        return logits.gather(1, y[:, None]).sum()
    if target == "logit_pred":
        if predicted is None:
            raise ValueError("grad_target logit_pred needs the predicted classes")
        return logits.gather(1, predicted[:, None]).sum()
    if target == "loss":
        return F.cross_entropy(logits, y, reduction="sum")
    if target == "logit_centred":
        return (logits.gather(1, y[:, None])[:, 0] - logits.mean(dim=1)).sum()
    if target == "prob_true":
        return F.softmax(logits, dim=1).gather(1, y[:, None]).sum()
    raise ValueError(f"unknown grad_target {target!r}; choose one of {GRAD_TARGETS}")


def normalise_gradient(gradient: torch.Tensor, how: str) -> torch.Tensor:
    """Per-example normalisation of input gradients ``[B, ...]``, flattened to ``[B, D]``.

    ``maxabs``: divide by the largest absolute entry of the example (values in [-1, 1], as in
    dULE); ``l2``: divide by the example's L2 norm; ``none``: raw gradients. (``student_maxabs``
    divides both maps by the student's scale: see :func:`saliency_penalty`.)
    """
    flat = gradient.flatten(1)
    if how == "maxabs":
        return flat / (flat.abs().amax(dim=1, keepdim=True) + NORM_EPS)
    if how == "l2":
        return flat / (flat.norm(dim=1, keepdim=True) + NORM_EPS)
    if how == "none":
        return flat
    raise ValueError(f"unknown grad_norm {how!r}; choose one of {GRAD_NORMS}")


def saliency_penalty(
    teacher_gradient: torch.Tensor, student_gradient: torch.Tensor, grad_norm: str, distance: str
) -> torch.Tensor:
    """The unlearning penalty between the teacher's and the (detached) student's input gradients.

    ``mse``: mean over the batch and the pixels of ``(N(g_T) - (-N(g_S)))**2``, the paper's
    reading of docs/ule.md: the teacher's map is pulled towards the negated student's map.
    ``cosine``: ``1 - cos(g_T, -g_S) = 1 + cos(g_T, g_S)`` in [0, 2], the same target without
    the magnitudes. ``orthogonal``: ``cos(g_T, g_S)**2``, which is zero when the maps are
    orthogonal, i.e. it asks the teacher to ignore what the student looks at instead of
    reversing it (the cosine-variant of dULE, squared instead of to the fourth power).
    Cosine distances are scale-free, so ``grad_norm`` only matters for ``mse``.

    ``student_maxabs`` divides BOTH maps by the student's per-example max-abs (a constant: the
    student's gradient is detached). Every other normalisation of the teacher's map by its own scale
    makes the penalty invariant to that scale, so its parameter gradient grows as 1 / scale: a teacher
    whose output is still flat (at initialisation its input gradients are ~1e-4) is then driven by the
    penalty alone and can meet it by shaping the direction of an ever-smaller gradient, without ever
    learning the class (docs/ule.md, "The collapsed teacher"). With the student's scale, a flat teacher
    pays the full penalty and the penalty's gradient does not depend on the teacher's scale.
    """
    if grad_norm == "student_maxabs":
        student = student_gradient.flatten(1)
        scale = student.abs().amax(dim=1, keepdim=True) + NORM_EPS
        teacher, student = teacher_gradient.flatten(1) / scale, student / scale
    else:
        teacher = normalise_gradient(teacher_gradient, grad_norm)
        student = normalise_gradient(student_gradient, grad_norm)
    if distance == "mse":
        return (teacher + student).pow(2).mean()
    cosine = F.cosine_similarity(teacher, student, dim=1, eps=NORM_EPS)
    if distance == "cosine":
        return (1.0 + cosine).mean()
    if distance == "orthogonal":
        return cosine.pow(2).mean()
    raise ValueError(f"unknown distance {distance!r}; choose one of {DISTANCES}")


# The ERM protocol shared by the real datasets (see ULE.defaults_per_dataset).
_RESNET50_SGD: dict[str, Any] = {
    "backbone": "resnet50", "pretrained": True, "optimizer": "sgd", "momentum": 0.9, "batch_size": 128,
}
_SPAWRIOUS = tuple(f"spawrious-{kind}-{level}" for kind in ("o2o", "m2m") for level in ("easy", "medium", "hard"))


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def finite_step(x: torch.Tensor, loss_gradient: torch.Tensor, size: float, direction: str) -> torch.Tensor:
    """``x`` moved along the student's per-example loss gradient: ``x + size * sign(g)`` (``sign``), or
    ``x + size * sqrt(D) * g / ||g||`` (``l2``: the same L2 length as the sign step, in the gradient's
    direction). Not clipped to the pixel range (the harness's inputs are normalised; the method does not
    know the range)."""
    if direction == "sign":
        return x + size * loss_gradient.sign()
    if direction == "l2":
        flat = loss_gradient.flatten(1)
        length = size * flat.shape[1] ** 0.5
        return x + (length * flat / (flat.norm(dim=1, keepdim=True) + NORM_EPS)).view_as(x)
    raise ValueError(f"unknown step_direction {direction!r}; choose one of {STEP_DIRECTIONS}")


# --------------------------------------------------------------------------------------------
# The method


@register_method
class ULE(Method):
    """ULE (Mitchell, Martínez del Rincón, McLaughlin; arXiv 2409.02792, 2024; Pattern Analysis
    and Applications 28(4), 2025). No public code by the authors exists: this is a reconstruction
    from the paper's abstract and the loss described by a third-party adaptation (dULE), see
    docs/ule.md.

    Two classifiers of the same backbone see the same batches, each with its own optimiser. The
    student is plain ERM (cross-entropy, no constraint) and learns the shortcut. The teacher is
    trained with cross-entropy plus a penalty on its input gradient, pushed away from the
    student's input gradient, which is detached: nothing of the teacher reaches the student.
    The teacher is the method's result (``primary``); the student is recorded beside it.

    Implemented default, per batch (docs/ule.md, "What is implemented")::

        L_S = CE(S(x), y)
        c_M(x) = M(x)_y - mean_k M(x)_k         # centred true-class logit of model M
        g_S = stopgrad(d c_S(x) / dx)           # per example
        g_T = d c_T(x) / dx                     # with create_graph: the penalty trains T
        L_T = CE(T(x), y) + penalty_weight * MSE(g_T / m_S, -g_S / m_S)
        m_S = max |g_S| over the example + 1e-8  # the student's scale, for both maps

    Known from the paper (abstract): the two models, the same batches, the unconstrained student,
    the teacher using the gradient of the student's output with respect to the input, no group
    labels. Our choices (inferred; the paper's own are unknown): the centred
    true-class logit as "output" (the raw logit, ``logit_true``, was our first default; it lets
    the teacher meet the penalty through a shift of all its logits that the softmax ignores,
    without changing a prediction, as measured in docs/ule.md; for two classes the centred logit
    is half the margin, the single logit of dULE's binary model), MSE to the negated map with both
    maps divided by the student's per-example max-abs (dULE divides each map by its own max-abs, our
    first default, ``grad_norm=maxabs``: it let teachers collapse to chance, see
    :func:`saliency_penalty` and docs/ule.md), a detached
    student gradient, penalty_weight = 1, the student stepping before the teacher on the same
    batch (the order does not matter: the student's gradient is taken before its step), and
    the optional warm-up. The per-dataset defaults in ``defaults_per_dataset`` say where they come from.

    Knobs: ``penalty_weight`` (lambda), ``grad_target`` (logit_centred | logit_true | loss | logit_pred |
    prob_true), ``grad_norm`` (student_maxabs | maxabs | l2 | none), ``distance`` (mse | cosine |
    orthogonal), ``warmup_epochs`` (epochs with the penalty off), ``penalty_epochs`` and
    ``freeze_student_after`` (schedules), ``reading`` (saliency | finite_step) with ``step_size`` and
    ``step_direction``.

    Cost: one forward pass per model per step. The student needs two vector-Jacobian products
    of the same forward graph (one-hot(y) - 1/K for g_S, dCE/dlogits for its parameters), so it runs
    two backward passes over one retained graph; the first goes to the input only (no weight
    gradients are computed). With ``grad_target=loss`` both come from one backward. The teacher
    takes g_T with create_graph, then one backward of L_T through both graphs.
    """

    name = "ule"
    paper = (
        "Mitchell, Martínez del Rincón, McLaughlin, UnLearning from Experience to Avoid Spurious Correlations, "
        "arXiv 2409.02792 (2024); Pattern Analysis and Applications 28(4) (2025)"
    )
    primary = "teacher"
    caveat = (
        "a reconstruction from the paper's abstract (no public code exists); in every setting measured here "
        "(synthetic twins, small CNN from scratch; exported twins, pretrained efficientnet-lite0) its teacher "
        "does not beat ERM (docs/ule.md)"
    )

    own_hparams: ClassVar[dict[str, Hparam]] = {
        "penalty_weight": Hparam(
            1.0,
            "lambda, weight of the input-gradient penalty in the teacher's loss; 0: the teacher is plain ERM",
            float,
            low=0.0,
            search=log_uniform(-1, 1.5),
        ),
        "grad_target": Hparam(
            "logit_centred",
            "the scalar whose input gradient is each model's saliency map: the true-class logit minus the mean "
            "logit (blind to a shift of all logits, which the softmax ignores), the raw true-class logit, the "
            "example's cross-entropy, or the logit of the student's predicted class",
            str,
            choices=GRAD_TARGETS,
        ),
        "grad_norm": Hparam(
            "student_maxabs",
            "per-example normalisation of the input gradients before the distance (only changes mse): divide "
            "both by the student's largest absolute entry (the teacher's scale is not divided out, so a flat "
            "teacher cannot meet the penalty), each by its own largest absolute entry (dULE; teachers collapse "
            "to chance), each by its L2 norm, or not at all",
            str,
            choices=GRAD_NORMS,
        ),
        "distance": Hparam(
            "mse",
            "mse: pull the teacher's map to the negated student's map; cosine: 1 + cos(g_T, g_S), the same "
            "target without magnitudes; orthogonal: cos(g_T, g_S)^2, make the maps orthogonal (ignore, not reverse)",
            str,
            choices=DISTANCES,
        ),
        "warmup_epochs": Hparam(
            0,
            "epochs at the start with the penalty off (the teacher trains as ERM while the student learns the "
            "shortcut); the input gradients are not computed then",
            int,
            low=0,
            search=one_of(0, 1, 2),
        ),
        "penalty_epochs": Hparam(
            0,
            "the penalty is on only before this epoch (counted from 0, warm-up included); 0: to the end",
            int,
            low=0,
        ),
        "freeze_student_after": Hparam(
            0,
            "the student stops training after this many epochs (an early, shortcut-only student, as JTT's "
            "early-stopped model); it keeps giving its maps; 0: it trains to the end",
            int,
            low=0,
        ),
        "reading": Hparam(
            "saliency",
            "saliency: the teacher's input gradient is pushed away from the student's (the penalty above); "
            "finite_step: the teacher is also trained, with the true label, on the inputs moved one step along "
            "the student's loss gradient (the student's mistakes made explicit; no double backward)",
            str,
            choices=READINGS,
        ),
        "step_size": Hparam(
            0.1,
            "finite_step: the step's size per input element, in normalised input units (the twins' inputs span "
            "[-1, 1])",
            float,
            low=0.0,
        ),
        "step_direction": Hparam(
            "sign", "finite_step: sign of the gradient, or the gradient scaled to the same L2 length", str,
            choices=STEP_DIRECTIONS,
        ),
    }

    # Real datasets: the benchmark's ERM protocol of each dataset (the same
    # values as the datasets' own training_defaults, repeated here so that ULE's protocol is stated in
    # one place): ResNet-50 ImageNet-pretrained, SGD momentum 0.9. ULE's own settings for them are
    # unknown (the paper's tables were not read), so its knobs keep the class defaults above.
    defaults_per_dataset: ClassVar[dict[str, dict[str, Any]]] = {
        # Sagawa et al. 2020, standard regularisation (the group_DRO README command's lr, wd, epochs): 1e-3, 1e-4, 300.
        "waterbirds": {**_RESNET50_SGD, "lr": 1e-3, "weight_decay": 1e-4, "epochs": 300},
        # Sagawa et al. 2020, standard regularisation (the group_DRO README command's lr, wd, epochs): 1e-4, 1e-4, 50.
        "celeba": {**_RESNET50_SGD, "lr": 1e-4, "weight_decay": 1e-4, "epochs": 50},
        # facebookresearch/Whac-A-Mole urbancars_trainers/launcher.py: lr 1e-3, wd 1e-4, 300 epochs.
        "urbancars": {**_RESNET50_SGD, "lr": 1e-3, "weight_decay": 1e-4, "epochs": 300},
        # aengusl/spawrious example.py (lr 1e-3, batch 128, 3 epochs) with ResNet-50 and SGD, as
        # datasets/spawrious.py sets for ERM.
        **{name: {**_RESNET50_SGD, "lr": 1e-3, "weight_decay": 1e-4, "epochs": 3} for name in _SPAWRIOUS},
    }

    @classmethod
    def double_backward(cls, hparams: Mapping[str, Any]) -> str | None:
        if hparams["reading"] == "saliency":
            return ("ULE's saliency reading trains the teacher on a penalty of its input gradient, a double backward "
                    "(--hparams reading=finite_step has none)")
        return None

    def __init__(self, context: MethodContext) -> None:
        super().__init__(context)
        # The student is built first so that, for the same seed, its initialisation is ERM's.
        self.student = self.new_model()
        self.teacher = self.new_model()
        self.student_optimizer = self.new_optimizer(self.student.parameters())
        self.teacher_optimizer = self.new_optimizer(self.teacher.parameters())
        self.epoch = 0  # index of the current epoch of the stage, set by begin_epoch()
        self.steps = 0  # optimisation steps done, over the whole run

    # -- protocol -------------------------------------------------------------------------------
    def begin_epoch(self, stage: Stage, epoch: int) -> None:
        # Called at the start of every epoch, including the first epoch after a resume, so the
        # warm-up position always follows the trainer's epoch counter.
        self.epoch = epoch

    @property
    def penalty_active(self) -> bool:
        last = int(self.hp["penalty_epochs"])
        return self.epoch >= int(self.hp["warmup_epochs"]) and (last == 0 or self.epoch < last)

    @property
    def student_frozen(self) -> bool:
        after = int(self.hp["freeze_student_after"])
        return after > 0 and self.epoch >= after

    def update(self, batch: Batch) -> dict[str, float]:
        active = self.penalty_active
        finite = self.hp["reading"] == "finite_step"
        x = batch.x.detach().requires_grad_(True) if active else batch.x
        student_gradient, student_loss, student_predicted = self._student_step(x, batch.y, active, finite)
        log = {"student_ce": student_loss}
        if active and finite:
            assert student_gradient is not None
            moved = finite_step(batch.x, student_gradient, float(self.hp["step_size"]), self.hp["step_direction"])
            log.update(self._teacher_finite_step(batch.x, moved, batch.y))
        else:
            log.update(self._teacher_step(x, batch.y, student_gradient, student_predicted))
        self.steps += 1
        return log

    def _student_step(
        self, x: torch.Tensor, y: torch.Tensor, active: bool, finite: bool = False
    ) -> tuple[torch.Tensor | None, float, torch.Tensor | None]:
        """Plain ERM step of the student (none once it is frozen); returns its detached input gradient,
        taken before the step: that of ``grad_target``, or of each example's loss for ``finite_step``."""
        target = "loss" if finite else self.hp["grad_target"]
        frozen = self.student_frozen
        self.student.train(not frozen)
        logits = self.precision.forward(self.student, x)
        loss = F.cross_entropy(logits, y)
        parameters = [] if frozen else _trainable(self.student)
        self.student_optimizer.zero_grad(set_to_none=True)
        gradient = predicted = None
        if not active:
            if parameters:
                self.precision.backward(loss, inputs=parameters)
        elif target == "loss":
            # dCE_mean/dx is each example's loss gradient / B: one backward gives both gradients (two under fp16).
            gradient = self.precision.input_and_parameter_gradients(loss, x, parameters) * x.shape[0]
        else:
            predicted = logits.detach().argmax(dim=1)
            scalar = gradient_scalar(logits, y, target, predicted)
            # To the input only: the engine then skips every weight-gradient computation.
            gradient = self.precision.input_gradient(scalar, x, retain_graph=bool(parameters))
            if parameters:
                self.precision.backward(loss, inputs=parameters)
        if parameters:
            self.precision.step(self.student_optimizer)
        # autograd.grad without create_graph returns tensors outside any graph: g_S is detached.
        return gradient, loss.item(), predicted

    def _teacher_step(
        self, x: torch.Tensor, y: torch.Tensor, student_gradient: torch.Tensor | None,
        student_predicted: torch.Tensor | None,
    ) -> dict[str, float]:
        logits = self.precision.forward(self.teacher, x)
        loss = F.cross_entropy(logits, y)
        log = {"teacher_ce": loss.item()}
        if student_gradient is not None:
            scalar = gradient_scalar(logits, y, self.hp["grad_target"], student_predicted)
            teacher_gradient = self.precision.input_gradient(scalar, x, create_graph=True)
            penalty = saliency_penalty(teacher_gradient, student_gradient, self.hp["grad_norm"], self.hp["distance"])
            loss = loss + self.hp["penalty_weight"] * penalty
            log["penalty"] = penalty.item()
            with torch.no_grad():  # diagnostic: +1 copies the student's map, -1 reverses it, 0 ignores it
                log["saliency_cos"] = F.cosine_similarity(
                    teacher_gradient.flatten(1), student_gradient.flatten(1), dim=1
                ).mean().item()
        self._teacher_optimise(loss)
        return log

    def _teacher_finite_step(self, x: torch.Tensor, moved: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """``CE(T(x), y) + penalty_weight * CE(T(x'), y)``, one forward of the two batches together."""
        logits = self.precision.forward(self.teacher, torch.cat([x, moved]))
        clean, shifted = logits.split(len(x))
        loss = F.cross_entropy(clean, y)
        moved_loss = F.cross_entropy(shifted, y)
        self._teacher_optimise(loss + self.hp["penalty_weight"] * moved_loss)
        return {"teacher_ce": loss.item(), "penalty": moved_loss.item()}

    def _teacher_optimise(self, loss: torch.Tensor) -> None:
        self.teacher_optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss, inputs=_trainable(self.teacher))
        self.precision.step(self.teacher_optimizer)

    def predictors(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "student": self.student}

    def epoch_log(self) -> dict[str, Any]:
        return {"penalty_active": self.penalty_active, "student_frozen": self.student_frozen, "steps": self.steps}

    def extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "steps": self.steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.steps = int(state.get("steps", 0))
