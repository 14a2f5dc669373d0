"""The shared part of the model-parallel losses: gather the global batch, score this rank's shard.

Subclasses only say how the local logits are made (`logits`). Interface as the single-process
losses (MetricLoss): `forward(embeddings, labels) -> LossOutput` with this rank's batch; `total`
is the global-batch loss, the same on every rank (trainer.losses.sharded_classifier explains
why, and what that means for the backbone's gradient under DDP).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from imlt.trainer.collectives import all_gather_rows, all_gather_with_grad
from imlt.trainer.config import LOSS_DEFAULTS, LossName
from imlt.trainer.losses.base import LossOutput, check_batch
from imlt.trainer.losses.sharded_classifier import ShardedClassifier, distributed_cross_entropy
from imlt.trainer.process_group import DistEnv


class ModelParallelLoss(nn.Module):
    """Class centres sharded by class across the job's ranks (a ShardedClassifier per rank).

    `weight` < 1 mixes in (1 - weight) x the cross-entropy of a plain linear head, sharded the
    same way (a second ShardedClassifier, `head`), as MetricLoss does for one process.
    """

    normalize: bool = False
    loss_name: ClassVar[LossName]  # margin and scale left out of the constructor default to LOSS_DEFAULTS[loss_name]

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        env: DistEnv | None = None,
        *,
        margin: float | None = None,
        scale: float | None = None,
        weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"loss weight must be in [0, 1], got {weight}")
        default_margin, default_scale = LOSS_DEFAULTS[self.loss_name]
        self.margin = default_margin if margin is None else margin
        self.scale = default_scale if scale is None else scale
        self.classifier = ShardedClassifier(num_classes, embedding_dim, env, normalize=self.normalize, seed=seed)
        self.weight = weight
        self.head = ShardedClassifier(num_classes, embedding_dim, env, seed=seed + 1) if weight < 1.0 else None

    @classmethod
    def from_config(cls, margin: float, scale: float, weight: float, num_classes: int, embedding_dim: int, **kw: Any) -> ModelParallelLoss:
        """What the loss registry calls; `kw` holds the job's `env` and the run's `seed`."""
        return cls(num_classes, embedding_dim, kw.get("env"), margin=margin, scale=scale, weight=weight, seed=kw.get("seed", 0))

    def logits(self, all_embeddings: torch.Tensor, target_index: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        # Margins on cosines near 1 lose their precision in half precision: fp32 (or fp64) whatever the autocast.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            if embeddings.dtype in (torch.float16, torch.bfloat16):
                embeddings = embeddings.float()
            all_embeddings = all_gather_with_grad(embeddings)
            all_labels = all_gather_rows(labels)
            check_batch(all_embeddings, all_labels, self.classifier.num_classes, self.classifier.embedding_dim)
            target_index, owned = self.classifier.local_targets(all_labels)
            metric = distributed_cross_entropy(self.logits(all_embeddings, target_index, owned), target_index, owned)
            if self.head is None:
                return LossOutput(total=metric, metric=metric.detach(), classification=torch.zeros((), device=metric.device))
            ce = distributed_cross_entropy(self.head(all_embeddings), target_index, owned)
            total = self.weight * metric + (1.0 - self.weight) * ce
            return LossOutput(total=total, metric=metric.detach(), classification=ce.detach())
