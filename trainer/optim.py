"""The optimiser over model and loss, and the learning rate as a pure function of the step.

A global step counts optimiser steps; because the learning rate depends on nothing else, resume
needs only the step count (and the scheduler's state, which LambdaLR keeps for its bookkeeping).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from imlt.trainer.config import OptimConfig, OptimizerName, Scheduler

# Multiplier milestones of the "step" schedule, as fractions of the post-warmup steps.
STEP_MILESTONES = (0.5, 0.75)
STEP_GAMMA = 0.1


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: Scheduler) -> float:
    """Multiplier of the peak LR for optimiser step `step` (0-based).

    Hand-written because it is a few lines and must be a pure function of the step (so resume
    needs only the step count); torch's LambdaLR does the optimiser bookkeeping around it.
    Linear warmup from 1/warmup to 1, then cosine to 0, steps of x0.1 at 50% and 75%, or flat.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    done = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    if schedule == Scheduler.COSINE:
        return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
    if schedule == Scheduler.STEP:
        return STEP_GAMMA ** sum(done >= m for m in STEP_MILESTONES)
    return 1.0


def build_optimizer(cfg: OptimConfig, model: nn.Module, loss_fn: nn.Module) -> torch.optim.Optimizer:
    """Model and loss (class centres) together; no weight decay on biases and norm scales."""
    from timm.optim import param_groups_weight_decay

    both = nn.ModuleDict({"model": model, "loss": loss_fn})
    groups = param_groups_weight_decay(both, weight_decay=cfg.weight_decay)
    if cfg.optimizer == OptimizerName.SGD:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, *, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up over optim.warmup_epochs, then optim.scheduler, over the run's epochs x steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(
            lr_factor,
            total_steps=epochs * steps_per_epoch,
            warmup_steps=cfg.warmup_epochs * steps_per_epoch,
            schedule=cfg.scheduler,
        ),
    )
