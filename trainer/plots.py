"""Report figures as PNG bytes, so any step can write them through trainer.storage."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence


def recall_at_k_png(metrics: Mapping[str, float], ks: Sequence[int], title: str = "Retrieval") -> bytes:
    """A bar per Recall@K, MAP@R beside them, values printed on the bars."""
    # Figure + the Agg canvas directly: no pyplot global state, no display backend needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [f"R@{k}" for k in ks] + ["MAP@R"]
    values = [float(metrics[f"recall_at_{k}"]) for k in ks] + [float(metrics["map_at_r"])]
    fig = Figure(figsize=(1.1 * len(names) + 1.5, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(names, values, color=["#4c72b0"] * len(ks) + ["#dd8452"])
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=2, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("score")
    subtitle = ""
    if "num_queries" in metrics:
        subtitle = f"\n{int(metrics['num_queries'])} queries, {int(metrics.get('num_classes', 0))} classes"
    ax.set_title(title + subtitle, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
