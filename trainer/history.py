"""Per-epoch training history: what history.json holds and how training_curve.png is drawn.

An epoch's numbers are accumulated by `EpochMeter`, whose state travels inside a mid-epoch
checkpoint, so an epoch split by a stop and a resume still reports its whole-epoch means.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from imlt.trainer import storage

from imlt.trainer.model_files import HISTORY

log = logging.getLogger(__name__)


class EpochStats(BaseModel):
    epoch: int = Field(..., description="1-based epoch number")
    loss: float = Field(..., description="Mean total loss over the epoch's batches")
    metric_loss: float = Field(..., description="Mean metric (margin) loss")
    classification_loss: float = Field(..., description="Mean plain-softmax loss (0 when loss.weight = 1)")
    lr: float = Field(..., description="Learning rate of the epoch's last optimiser step")
    seconds: float = Field(..., description="Wall time spent training this epoch (summed over resumes)")
    images: int
    images_per_second: float


class EpochMeter:
    """Sums over one epoch's steps; batch losses are weighted by batch size."""

    def __init__(self) -> None:
        self.batches = 0
        self.images = 0
        self.loss = 0.0
        self.metric = 0.0
        self.classification = 0.0
        self.seconds = 0.0

    def update(self, n: int, loss: float, metric: float, classification: float, seconds: float) -> None:
        self.batches += 1
        self.images += n
        self.loss += loss * n
        self.metric += metric * n
        self.classification += classification * n
        self.seconds += seconds

    @property
    def mean_loss(self) -> float:
        return self.loss / self.images if self.images else float("nan")

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def stats(self, epoch: int, lr: float) -> EpochStats:
        n = max(self.images, 1)
        return EpochStats(
            epoch=epoch,
            loss=self.loss / n,
            metric_loss=self.metric / n,
            classification_loss=self.classification / n,
            lr=lr,
            seconds=self.seconds,
            images=self.images,
            images_per_second=self.images_per_second,
        )

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in vars(self):
            setattr(self, key, state[key])


class ProgressLog:
    """Progress lines for logs that are not a terminal (KFP and Airflow task logs, redirected output).

    Every `every_steps` optimiser steps, or after `every_seconds` without a line: step, loss, images/s
    of the epoch so far, and the time left at that pace. A terminal gets a progress bar instead.
    """

    def __init__(self, total_steps: int, every_steps: int, every_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total_steps, self.every_steps, self.every_seconds = total_steps, every_steps, every_seconds
        self.clock = clock
        self.last = clock()

    def step(self, global_step: int, loss: float, meter: EpochMeter) -> None:
        now = self.clock()
        if global_step % self.every_steps and now - self.last < self.every_seconds:
            return
        self.last = now
        per_step = meter.seconds / meter.batches if meter.batches else 0.0
        eta = int((self.total_steps - global_step) * per_step)
        log.info("step %d/%d: loss %.4f, %.0f images/s, ETA %d:%02d:%02d", global_step, self.total_steps, loss,
                 meter.images_per_second, eta // 3600, eta // 60 % 60, eta % 60)


def write_history(output_dir: str, history: list[EpochStats]) -> str:
    url = storage.join(output_dir, HISTORY)
    storage.write_text(url, json.dumps([h.model_dump() for h in history], indent=2) + "\n")
    return url


def plot_training_curve(history: list[EpochStats], url: str) -> None:
    """Loss (total, metric, classification) and learning rate per epoch, as a PNG at `url`."""
    # Figure + Agg canvas directly (not pyplot): no global figure state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_lr = fig.subplots(1, 2)
    epochs = [h.epoch for h in history]
    ax_loss.plot(epochs, [h.loss for h in history], marker="o", label="total")
    ax_loss.plot(epochs, [h.metric_loss for h in history], marker=".", linestyle="--", label="metric")
    if any(h.classification_loss for h in history):
        ax_loss.plot(epochs, [h.classification_loss for h in history], marker=".", linestyle=":", label="classification")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    ax_loss.legend()
    ax_lr.plot(epochs, [h.lr for h in history], marker="o", color="tab:green")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("learning rate (last step of epoch)")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        if 0 < len(epochs) <= 20:
            ax.set_xticks(epochs)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(url, buf.getvalue())
