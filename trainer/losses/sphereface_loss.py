"""SphereFace (Liu et al. 2017): the angular margin of L-Softmax with normalised class centres."""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses

from imlt.trainer.losses.pml_margin_loss import PMLMarginLoss


class SphereFaceLoss(PMLMarginLoss):
    pml_class = pml_losses.SphereFaceLoss
