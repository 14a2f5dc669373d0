"""Softmax cross-entropy over a class-sharded linear classifier (the reference's ModelParallelSoftmax)."""

from __future__ import annotations

from typing import Any

import torch

from imlt.trainer.config import LossName
from imlt.trainer.losses.model_parallel_loss import ModelParallelLoss


class ModelParallelSoftmax(ModelParallelLoss):
    """logits = s * e . w_c over sharded centres.

    Plain FC + softmax as in the reference (no normalisation, no bias: a bias adds nothing a
    metric embedding uses, and leaving it out keeps the shard a single matrix).
    """

    loss_name = LossName.MODEL_PARALLEL_SOFTMAX

    @classmethod
    def from_config(cls, margin: float, scale: float, weight: float, num_classes: int, embedding_dim: int, **kw: Any) -> ModelParallelSoftmax:
        if margin:
            raise ValueError(f"loss.margin={margin}: ModelParallelSoftmax has no margin (use ModelParallelAMSoftmax)")
        return super().from_config(margin, scale, weight, num_classes, embedding_dim, **kw)  # type: ignore[return-value]

    def logits(self, all_embeddings: torch.Tensor, target_index: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        return self.scale * self.classifier(all_embeddings)
