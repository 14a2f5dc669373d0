"""Additive-margin softmax over class-sharded, normalised centres (the reference's ModelParallelAMSoftmax)."""

from __future__ import annotations

from typing import Any

import torch

from imlt.trainer.losses.model_parallel_loss import ModelParallelLoss
from imlt.trainer.process_group import DistEnv


class ModelParallelAMSoftmax(ModelParallelLoss):
    """s * (cos - m [c == y]) over this rank's shard; AMSoftmaxLoss's formula, sharded."""

    normalize = True

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        env: DistEnv | None = None,
        *,
        margin: float = 0.4,
        scale: float = 30.0,
        weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(num_classes, embedding_dim, env, weight=weight, seed=seed)
        self.margin, self.scale = margin, scale

    @classmethod
    def from_config(cls, margin: float, scale: float, weight: float, num_classes: int, embedding_dim: int, **kw: Any) -> ModelParallelAMSoftmax:
        return cls(num_classes, embedding_dim, kw.get("env"), margin=margin, scale=scale, weight=weight, seed=kw.get("seed", 0))

    def logits(self, all_embeddings: torch.Tensor, target_index: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        cos = self.classifier(all_embeddings)
        if cos.shape[1] == 0:
            return cos * self.scale
        onehot = torch.zeros_like(cos)
        onehot[owned, target_index[owned]] = 1.0
        return self.scale * (cos - self.margin * onehot)
