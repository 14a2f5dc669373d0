"""CosFace (Wang et al. 2018): cos(theta_y) - m on the target, times s."""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses

from imlt.trainer.losses.pml_margin_loss import PMLMarginLoss


class CosFaceLoss(PMLMarginLoss):
    pml_class = pml_losses.CosFaceLoss
