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
    val_recall_at_1: float | None = Field(None, description="Recall@1 on the val split after this epoch, when validated")
    val_map_at_r: float | None = Field(None, description="MAP@R on the val split after this epoch, when validated")
    val_seconds: float | None = Field(None, description="Wall time the validation after this epoch took (not in `seconds`)")


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
    # exclude_none: a run without validation writes the same history.json as before val existed
    storage.write_text(url, json.dumps([h.model_dump(exclude_none=True) for h in history], indent=2) + "\n")
    return url


def best_epoch(history: list[EpochStats]) -> tuple[int, str] | None:
    """The epoch to mark, and why: best val Recall@1 when validated, else the lowest loss."""
    validated = [h for h in history if h.val_recall_at_1 is not None]
    if validated:
        best = max(validated, key=lambda h: (h.val_recall_at_1, -h.epoch))  # ties: the earliest
        return best.epoch, f"best val Recall@1 ({best.val_recall_at_1:.4f})"
    if history:
        best = min(history, key=lambda h: (h.loss, h.epoch))
        return best.epoch, f"lowest training loss ({best.loss:.4f}); no val split"
    return None


def plot_training_curve(history: list[EpochStats], url: str) -> None:
    """Loss, val Recall@1 / MAP@R (when validated) and learning rate per epoch, as a PNG at `url`."""
    storage.write_bytes(url, training_curve_png(history))


def training_curve_png(history: list[EpochStats]) -> bytes:
    # Figure + Agg canvas directly (not pyplot): no global figure state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    validated = any(h.val_recall_at_1 is not None for h in history)
    fig = Figure(figsize=(11 if validated else 8, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if validated else 2)
    ax_loss, ax_lr = axes[0], axes[-1]
    epochs = [h.epoch for h in history]
    ax_loss.plot(epochs, [h.loss for h in history], marker="o", label="total")
    if any(h.classification_loss for h in history):  # else the metric loss is the total: one line
        ax_loss.plot(epochs, [h.metric_loss for h in history], marker=".", linestyle="--", label="metric")
        ax_loss.plot(epochs, [h.classification_loss for h in history], marker=".", linestyle=":", label="classification")
        ax_loss.legend()
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    if validated:
        ax_val = axes[1]
        for key, label in (("val_recall_at_1", "Recall@1"), ("val_map_at_r", "MAP@R")):
            pts = [(h.epoch, getattr(h, key)) for h in history if getattr(h, key) is not None]
            if pts:
                ax_val.plot(*zip(*pts), marker="o", label=label)
        ax_val.set_ylim(0, 1.02)
        ax_val.set_xlabel("epoch")
        ax_val.set_ylabel("score")
        ax_val.set_title("validation (val split)")
        ax_val.legend()
    ax_lr.plot(epochs, [h.lr for h in history], marker="o", color="tab:green")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("learning rate (last step of epoch)")
    best = best_epoch(history)
    for ax in axes:
        ax.grid(alpha=0.3)
        if 0 < len(epochs) <= 20:
            ax.set_xticks(epochs)
        if best is not None:
            ax.axvline(best[0], color="tab:red", linestyle=":", linewidth=1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# Columns of the per-epoch table, in order, with the header a reader sees.
_COLUMNS = {
    "epoch": "epoch", "loss": "loss", "metric_loss": "metric loss", "classification_loss": "classification loss",
    "val_recall_at_1": "val Recall@1", "val_map_at_r": "val MAP@R", "lr": "learning rate",
    "seconds": "seconds", "val_seconds": "val seconds", "images": "images", "images_per_second": "images/s",
}


def table_columns(history: list[EpochStats]) -> list[str]:
    """The columns worth showing: none that is always empty or 0, none repeating an earlier one."""
    rows = [h.model_dump() for h in history]
    kept: list[str] = []
    for key in _COLUMNS:
        values = [r[key] for r in rows]
        if all(v is None or v == 0 for v in values) and key != "epoch":
            continue
        if any(values == [r[k] for r in rows] for k in kept):
            continue  # e.g. the metric loss is the total when loss.weight = 1
        kept.append(key)
    return kept


def training_curve_html(history: list[EpochStats] | list[dict[str, Any]], title: str) -> str:
    """One self-contained page (the PNG embedded): the curves above the per-epoch table, best epoch marked."""
    import base64
    import html

    history = [h if isinstance(h, EpochStats) else EpochStats.model_validate(h) for h in history]
    columns = table_columns(history)
    best = best_epoch(history)
    png = base64.b64encode(training_curve_png(history)).decode("ascii") if history else ""

    def cell(key: str, v: Any) -> str:
        if v is None:
            return "-"
        if key in ("loss", "metric_loss", "classification_loss", "val_recall_at_1", "val_map_at_r"):
            return f"{v:.4f}"
        if key == "lr":
            return f"{v:.3g}"
        if key in ("seconds", "val_seconds", "images_per_second"):
            return f"{v:.1f}"
        return str(v)

    head = "".join(f"<th>{html.escape(_COLUMNS[c])}</th>" for c in columns)
    body = "".join(
        f"<tr{' class=best' if best and h.epoch == best[0] else ''}>"
        + "".join(f"<td>{cell(c, getattr(h, c))}{' &#9733;' if c == 'epoch' and best and h.epoch == best[0] else ''}</td>"
                  for c in columns) + "</tr>"
        for h in history)
    note = (f"<p>&#9733; Epoch {best[0]}: {html.escape(best[1])}; the dotted red line in the charts.</p>"
            if best else "<p>No epochs finished.</p>")
    img = f"<img alt='training curve' src='data:image/png;base64,{png}'>" if png else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em 2em; color: #222; max-width: 1200px; }}
h1 {{ font-size: 1.4em; }}
img {{ max-width: 100%; height: auto; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
tr.best td {{ background: #fff4d6; font-weight: bold; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{note}
{img}
<table><tr>{head}</tr>{body}</table>
</body></html>
"""
