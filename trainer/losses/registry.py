"""Loss name -> class, and the factory the training loop calls."""

from __future__ import annotations

from imlt.trainer.config import MODEL_PARALLEL_LOSSES, ConfigError, LossConfig, LossName
from imlt.trainer.losses.am_softmax_loss import AMSoftmaxLoss
from imlt.trainer.losses.arcface_loss import ArcFaceLoss
from imlt.trainer.losses.base import MetricLoss
from imlt.trainer.losses.cosface_loss import CosFaceLoss
from imlt.trainer.losses.large_margin_softmax_loss import LargeMarginSoftmaxLoss
from imlt.trainer.losses.sphereface_loss import SphereFaceLoss

LOSSES: dict[LossName, type[MetricLoss]] = {
    LossName.AMSOFTMAX: AMSoftmaxLoss,
    LossName.ARCFACE: ArcFaceLoss,
    LossName.COSFACE: CosFaceLoss,
    LossName.LARGE_MARGIN_SOFTMAX: LargeMarginSoftmaxLoss,
    LossName.SPHEREFACE: SphereFaceLoss,
}


def build_loss(cfg: LossConfig, num_classes: int, embedding_dim: int) -> MetricLoss:
    """The data-parallel (single-process view) loss for a config; margin/scale defaults are filled by LossConfig."""
    if cfg.name in MODEL_PARALLEL_LOSSES:
        raise ConfigError(
            f"loss.name={cfg.name.value} shards the class centres across workers and needs "
            "compute.model_type=model-parallel with its distributed implementation (trainer.distributed); "
            f"build_loss serves the single-process losses: {', '.join(n.value for n in LOSSES)}"
        )
    cls = LOSSES.get(cfg.name)
    if cls is None:
        raise ConfigError(f"loss.name={cfg.name.value} has no implementation; known: {', '.join(n.value for n in LOSSES)}")
    return cls(num_classes, embedding_dim, margin=float(cfg.margin), scale=float(cfg.scale), weight=cfg.weight)
