"""The shared part of every metric loss: fp32 computation, the optional softmax head, the mix.

Subclasses implement only `metric_loss(embeddings, labels)`; the mix with a plain linear
classifier (`loss.weight`), shape checks and the autocast guard live here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LossOutput:
    """`total` is what to backpropagate; the other two are detached scalars for logging."""

    total: torch.Tensor
    metric: torch.Tensor
    classification: torch.Tensor


class MetricLoss(nn.Module):
    """total = weight * metric loss + (1 - weight) * cross-entropy of a linear head on the embeddings.

    The head exists only when weight < 1, so a pure metric run has no unused parameters (which
    DistributedDataParallel would complain about). Class centres are parameters of this module:
    give `loss.parameters()` to the optimiser and the loss state dict to the checkpoint.
    """

    def __init__(self, num_classes: int, embedding_dim: int, weight: float = 1.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classification-based metric loss needs at least 2 classes, got {num_classes}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"loss weight must be in [0, 1], got {weight}")
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.weight = weight
        self.classifier = nn.Linear(embedding_dim, num_classes) if weight < 1.0 else None

    @classmethod
    def from_config(cls, margin: float, scale: float, weight: float, num_classes: int, embedding_dim: int, **kw: Any) -> MetricLoss:
        """What the loss registry calls; a single-process loss ignores the job's `env` and `seed` in `kw`."""
        return cls(num_classes, embedding_dim, margin=margin, scale=scale, weight=weight)  # type: ignore[call-arg]

    def metric_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        check_batch(embeddings, labels, self.num_classes, self.embedding_dim)
        # Margins on cosines near 1 lose all precision in fp16: compute in fp32 whatever the caller's autocast.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = embeddings.float()
            metric = self.metric_loss(x, labels)
            if self.classifier is None:
                total = metric
                ce = torch.zeros((), device=x.device)
            else:
                ce = F.cross_entropy(self.classifier(x), labels)
                total = self.weight * metric + (1.0 - self.weight) * ce
        return LossOutput(total=total, metric=metric.detach(), classification=ce.detach())

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, weight={self.weight}"


def check_batch(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, embedding_dim: int) -> None:
    """Shapes, dtype and label range of a batch, checked once for every loss (single-process or sharded)."""
    if embeddings.ndim != 2 or embeddings.shape[1] != embedding_dim:
        raise ValueError(f"embeddings must be (N, {embedding_dim}), got {tuple(embeddings.shape)}")
    if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must be (N,) with N={embeddings.shape[0]}, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be integer class ids, got {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {labels.min().item()}..{labels.max().item()}")
