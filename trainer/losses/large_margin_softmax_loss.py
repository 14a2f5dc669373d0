"""Large-Margin Softmax (Liu et al. 2016): cos(m * theta_y), m an integer; logits keep the norms."""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses

from imlt.trainer.losses.pml_margin_loss import PMLMarginLoss


class LargeMarginSoftmaxLoss(PMLMarginLoss):
    pml_class = pml_losses.LargeMarginSoftmaxLoss
