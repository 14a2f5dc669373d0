"""AM-Softmax (Wang et al. 2018): s * (cos(theta_y) - m) on the target class, plain s * cos elsewhere.

Hand-written on purpose: no maintained library ships a loss under this name with the reference
component's semantics (centres stored as a [num_classes, dim] matrix, defaults m 0.4 / s 30).
The formula equals PML's CosFaceLoss; PML keeps its centres as [dim, num_classes] with its own
defaults, and the model-parallel variant needs the row-per-class layout to shard centres by class.
tests/test_losses.py compares it with a naive loop and with PML's CosFaceLoss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imlt.trainer.losses.base import MetricLoss


class AMSoftmaxLoss(MetricLoss):
    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.4, scale: float = 30.0, weight: float = 1.0) -> None:
        super().__init__(num_classes, embedding_dim, weight)
        self.margin = margin
        self.scale = scale
        self.centers = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_normal_(self.centers)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = F.normalize(embeddings, dim=1) @ F.normalize(self.centers, dim=1).t()
        margin = F.one_hot(labels, self.num_classes).to(cosine.dtype) * self.margin
        return self.scale * (cosine - margin)

    def metric_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings, labels), labels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, scale={self.scale}"
