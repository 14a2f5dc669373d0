"""Metric losses: one module per loss, a registry, and `build_loss`."""

from trainer.losses.am_softmax_loss import AMSoftmaxLoss
from trainer.losses.arcface_loss import ArcFaceLoss
from trainer.losses.base import LossOutput, MetricLoss
from trainer.losses.cosface_loss import CosFaceLoss
from trainer.losses.large_margin_softmax_loss import LargeMarginSoftmaxLoss
from trainer.losses.pml_margin_loss import PMLMarginLoss
from trainer.losses.registry import LOSSES, build_loss
from trainer.losses.sphereface_loss import SphereFaceLoss

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
