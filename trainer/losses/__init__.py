"""Metric losses: one module per loss, a registry, and `build_loss`."""

from imlt.trainer.losses.am_softmax_loss import AMSoftmaxLoss
from imlt.trainer.losses.arcface_loss import ArcFaceLoss
from imlt.trainer.losses.base import LossOutput, MetricLoss
from imlt.trainer.losses.cosface_loss import CosFaceLoss
from imlt.trainer.losses.large_margin_softmax_loss import LargeMarginSoftmaxLoss
from imlt.trainer.losses.pml_margin_loss import PMLMarginLoss
from imlt.trainer.losses.registry import LOSSES, build_loss
from imlt.trainer.losses.sphereface_loss import SphereFaceLoss

__all__ = [
    "AMSoftmaxLoss",
    "ArcFaceLoss",
    "CosFaceLoss",
    "LOSSES",
    "LargeMarginSoftmaxLoss",
    "LossOutput",
    "MetricLoss",
    "PMLMarginLoss",
    "SphereFaceLoss",
    "build_loss",
]
