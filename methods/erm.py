"""ERM: empirical risk minimisation, plain cross-entropy on the training set.

Vapnik, "Principles of risk minimization for learning theory", NeurIPS 1991. The baseline of every
paper compared here; its per-dataset protocol (backbone, optimiser, lr, weight decay, batch size,
epochs) is the dataset's ``training_defaults``.
"""

from __future__ import annotations

from torch import nn

from methods import register_method
from methods.base import Batch, Method, MethodContext, erm_step


@register_method
class ERM(Method):
    name = "erm"
    paper = "Vapnik, Principles of risk minimization for learning theory, NeurIPS 1991"

    def __init__(self, context: MethodContext) -> None:
        super().__init__(context)
        self.model = self.new_model()
        self.optimizer = self.new_optimizer(self.model.parameters())

    def update(self, batch: Batch) -> dict[str, float]:
        _, loss = erm_step(self.model, self.optimizer, batch.x, batch.y, self.precision)
        return {"loss": loss}

    def predictors(self) -> dict[str, nn.Module]:
        return {"model": self.model}
