"""Additive-margin softmax over class-sharded, normalised centres (the reference's ModelParallelAMSoftmax)."""

from __future__ import annotations

import torch

from imlt.trainer.config import LossName
from imlt.trainer.losses.model_parallel_loss import ModelParallelLoss


class ModelParallelAMSoftmax(ModelParallelLoss):
    """s * (cos - m [c == y]) over this rank's shard; AMSoftmaxLoss's formula, sharded."""

    loss_name = LossName.MODEL_PARALLEL_AMSOFTMAX
    normalize = True

    def logits(self, all_embeddings: torch.Tensor, target_index: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        cos = self.classifier(all_embeddings)
        if cos.shape[1] == 0:
            return cos * self.scale
        onehot = torch.zeros_like(cos)
        onehot[owned, target_index[owned]] = 1.0
        return self.scale * (cos - self.margin * onehot)
