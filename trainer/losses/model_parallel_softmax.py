"""Softmax cross-entropy over a class-sharded linear classifier (the reference's ModelParallelSoftmax)."""

from __future__ import annotations

from typing import Any

import torch

from imlt.trainer.config import LossName
from imlt.trainer.losses.model_parallel_loss import ModelParallelLoss
from imlt.trainer.process_group import DistEnv


class ModelParallelSoftmax(ModelParallelLoss):
    """logits = s * e . w_c over sharded centres.

    Plain FC + softmax as in the reference (no normalisation, no bias: a bias adds nothing a
    metric embedding uses, and leaving it out keeps the shard a single matrix).
    """

    loss_name = LossName.MODEL_PARALLEL_SOFTMAX

    def __init__(self, num_classes: int, embedding_dim: int, env: DistEnv | None = None, **kw: Any) -> None:
        if kw.get("margin"):
            raise ValueError(f"loss.margin={kw['margin']}: ModelParallelSoftmax has no margin (use ModelParallelAMSoftmax)")
        super().__init__(num_classes, embedding_dim, env, **kw)

    def logits(self, all_embeddings: torch.Tensor, target_index: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        return self.scale * self.classifier(all_embeddings)
