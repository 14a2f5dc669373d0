"""Base for the margin losses that pytorch-metric-learning implements: a subclass names the class."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from imlt.trainer.losses.base import MetricLoss


class PMLMarginLoss(MetricLoss):
    """Wraps a PML large-margin loss; its `W` (class centres, [dim, num_classes]) is our parameter."""

    pml_class: ClassVar[type[Any]]

    def __init__(self, num_classes: int, embedding_dim: int, margin: float, scale: float, weight: float = 1.0) -> None:
        super().__init__(num_classes, embedding_dim, weight)
        self.margin = margin
        self.scale = scale
        self.pml = self.pml_class(num_classes=num_classes, embedding_size=embedding_dim, margin=margin, scale=scale)

    def metric_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # PML casts W to the embeddings' dtype in place; the base class hands us fp32 always.
        return self.pml(embeddings, labels.long())

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scaled class logits without the margin (what PML's get_logits gives)."""
        return self.pml.get_logits(embeddings.float())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, scale={self.scale}"
