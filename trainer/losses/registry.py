"""Loss name -> class, and the factory the training loop calls: one table for every loss.

The model-parallel losses are registered here like the others; they need the job's `env` (rank
and world size: which class shard this process holds) and the run's `seed`, which the
single-process losses ignore. In one process a model-parallel loss holds every class and its
collectives are identities, so any registered loss can be built anywhere.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from imlt.trainer.config import LossConfig, LossName, class_count_scale
from imlt.trainer.losses.am_softmax_loss import AMSoftmaxLoss
from imlt.trainer.losses.arcface_loss import ArcFaceLoss
from imlt.trainer.losses.cosface_loss import CosFaceLoss
from imlt.trainer.losses.large_margin_softmax_loss import LargeMarginSoftmaxLoss
from imlt.trainer.losses.model_parallel_am_softmax import ModelParallelAMSoftmax
from imlt.trainer.losses.model_parallel_softmax import ModelParallelSoftmax
from imlt.trainer.losses.sphereface_loss import SphereFaceLoss
from imlt.trainer.process_group import DistEnv


class LossClass(Protocol):
    @classmethod
    def from_config(cls, margin: float, scale: float, weight: float, num_classes: int, embedding_dim: int, **kw: object) -> nn.Module: ...


LOSSES: dict[LossName, type[LossClass]] = {
    LossName.AMSOFTMAX: AMSoftmaxLoss,
    LossName.ARCFACE: ArcFaceLoss,
    LossName.COSFACE: CosFaceLoss,
    LossName.LARGE_MARGIN_SOFTMAX: LargeMarginSoftmaxLoss,
    LossName.SPHEREFACE: SphereFaceLoss,
    LossName.MODEL_PARALLEL_AMSOFTMAX: ModelParallelAMSoftmax,
    LossName.MODEL_PARALLEL_SOFTMAX: ModelParallelSoftmax,
}


def build_loss(cfg: LossConfig, num_classes: int, embedding_dim: int, *, env: DistEnv | None = None, seed: int = 0) -> nn.Module:
    """The loss a config names, with its margin and scale (defaults filled by LossConfig).

    `env` and `seed` matter to the model-parallel losses only: each rank initialises its own
    class rows from a generator seeded by (seed, rank).
    """
    return LOSSES[cfg.name].from_config(
        float(cfg.margin), loss_scale(cfg, num_classes), cfg.weight, num_classes, embedding_dim, env=env or DistEnv(), seed=seed
    )


def loss_scale(cfg: LossConfig, num_classes: int) -> float:
    """The logit scale a run trains with: loss.scale, or the class-count scale with loss.auto_scale."""
    return class_count_scale(num_classes) if cfg.auto_scale else float(cfg.scale)  # type: ignore[arg-type]
