"""ArcFace (Deng et al. 2019): cos(theta_y + m) on the target; PML takes m in degrees."""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses

from imlt.trainer.losses.pml_margin_loss import PMLMarginLoss


class ArcFaceLoss(PMLMarginLoss):
    pml_class = pml_losses.ArcFaceLoss
