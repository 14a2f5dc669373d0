"""Metric losses: one module per loss, a registry of all of them, and `build_loss`."""

from imlt.trainer.losses.am_softmax_loss import AMSoftmaxLoss
from imlt.trainer.losses.arcface_loss import ArcFaceLoss
from imlt.trainer.losses.base import LossOutput, MetricLoss
from imlt.trainer.losses.cosface_loss import CosFaceLoss
from imlt.trainer.losses.large_margin_softmax_loss import LargeMarginSoftmaxLoss
from imlt.trainer.losses.model_parallel_am_softmax import ModelParallelAMSoftmax
from imlt.trainer.losses.model_parallel_loss import ModelParallelLoss
from imlt.trainer.losses.model_parallel_softmax import ModelParallelSoftmax
from imlt.trainer.losses.pml_margin_loss import PMLMarginLoss
from imlt.trainer.losses.registry import LOSSES, build_loss, loss_scale
from imlt.trainer.losses.sharded_classifier import ShardedClassifier, distributed_cross_entropy, shard_range
from imlt.trainer.losses.sphereface_loss import SphereFaceLoss

__all__ = [
    "AMSoftmaxLoss",
    "ArcFaceLoss",
    "CosFaceLoss",
    "LOSSES",
    "LargeMarginSoftmaxLoss",
    "LossOutput",
    "MetricLoss",
    "ModelParallelAMSoftmax",
    "ModelParallelLoss",
    "ModelParallelSoftmax",
    "PMLMarginLoss",
    "ShardedClassifier",
    "SphereFaceLoss",
    "build_loss",
    "loss_scale",
    "distributed_cross_entropy",
    "shard_range",
]
