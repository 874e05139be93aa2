"""RRR: "Right for the Right Reasons", an input-gradient penalty on a region annotated as irrelevant.

Ross, Hughes, Doshi-Velez, "Right for the Right Reasons: Training Differentiable Models by
Constraining their Explanations", IJCAI 2017; reference code dtak/rrr
(``rrr/multilayer_perceptron.py``: the objective, ``input_gradients``).

A diagnostic method here, not a competitor: it is the *oracle* of docs/ule.md's discriminating
experiment. It is told exactly where the spurious cues are (the synthetic twins' per-pixel mask of
the spurious region: the background and co-occurring objects), so it answers whether an
input-gradient penalty, placed perfectly, can make a model ignore the shortcut on a twin at all. If
even this oracle cannot, the twins cannot judge an input-gradient method such as ULE.

Per batch, with ``A`` the mask (1 on the spurious region, the same for every channel)::

    L = CE(f(x), y) + penalty_weight * mean_over_batch( sum_pixels (A * d/dx sum_k log p_k(x))^2 )

The penalised scalar is the reference's default: the sum over classes of the log-probabilities
(``input_gradients(..., scale='log')`` with ``y='sum'``). The reference sums its cross-entropy and its
penalty over the batch; both are divided by the batch size here (the harness's mean cross-entropy), so
``penalty_weight`` has the reference's ``l2_grads`` meaning. The reference's weight decay on the
parameters is the harness's ``weight_decay``. Its image experiments use ``l2_grads = 1000`` on inputs in
[0, 1]; the twins' inputs are normalised to [-1, 1] (half the gradient scale, a quarter of the squared
penalty), and the default here was chosen on validation worst-group accuracy (docs/ule.md).

Uses the spurious masks (``uses_spurious_masks``), never training group labels. One model, one
forward pass and a double backward (the penalty's parameter gradient) per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.precision import Precision
from methods import register_method
from methods.base import Batch, Hparam, Method, MethodContext, log_uniform


def irrelevant_gradient_penalty(logits: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, precision: Precision
                                ) -> torch.Tensor:
    """``mean_b sum_pixels (mask * d/dx sum_k log softmax(logits)_k)^2`` with its graph kept (create_graph),
    so that the penalty trains the model. ``x`` must require gradients; ``mask`` is ``[B, 1, H, W]``; the
    input gradient is taken through ``precision`` (scaled under fp16)."""
    scalar = F.log_softmax(logits, dim=1).sum()
    gradient = precision.input_gradient(scalar, x, create_graph=True)
    return (mask * gradient).pow(2).flatten(1).sum(dim=1).mean()


@register_method
class RRR(Method):
    name = "rrr"
    paper = (
        "Ross, Hughes, Doshi-Velez, Right for the Right Reasons: Training Differentiable Models by Constraining "
        "their Explanations, IJCAI 2017 (dtak/rrr; an oracle: it uses the twins' spurious-region masks)"
    )
    own_hparams: ClassVar[dict[str, Hparam]] = {
        "penalty_weight": Hparam(
            1000.0, "lambda (the reference's l2_grads): weight of the squared input gradient on the spurious region",
            float, low=0.0, search=log_uniform(1, 5),
        ),
    }
    defaults_per_dataset: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def uses_spurious_masks(cls, hparams: Mapping[str, Any]) -> bool:
        return True

    @classmethod
    def double_backward(cls, hparams: Mapping[str, Any]) -> str | None:
        return "rrr trains on a penalty of the model's input gradient, a double backward"

    def __init__(self, context: MethodContext) -> None:
        super().__init__(context)
        self.model = self.new_model()
        self.optimizer = self.new_optimizer(self.model.parameters())

    def update(self, batch: Batch) -> dict[str, float]:
        assert batch.mask is not None, "rrr needs the spurious-region masks"
        x = batch.x.detach().requires_grad_(True)
        logits = self.precision.forward(self.model, x)
        ce = F.cross_entropy(logits, batch.y)
        penalty = irrelevant_gradient_penalty(logits, x, batch.mask, self.precision)
        loss = ce + self.hp["penalty_weight"] * penalty
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss, inputs=[p for p in self.model.parameters() if p.requires_grad])
        self.precision.step(self.optimizer)
        return {"ce": ce.item(), "penalty": penalty.item()}

    def predictors(self) -> dict[str, nn.Module]:
        return {"model": self.model}
