"""The retraining DAG's publish decision: better than the floor and than what is published.

The layout (DEST/latest -> DEST/vN/model_card.json) is trainer.publish's; this module only
compares. (The comparison could move into trainer.publish if the CLI or KFP want it too.)
"""

from __future__ import annotations

import json
from typing import Any

RECALL_KEY = "recall_at_1"


def published_metrics(destination: str) -> dict[str, Any] | None:
    """Metrics of the model card that DESTINATION/latest points at; None when nothing is published."""
    from trainer import storage
    from trainer.publish import CARD_JSON, resolve_published

    try:
        folder = resolve_published(destination)
    except FileNotFoundError:
        return None
    card = json.loads(storage.read_text(storage.join(folder, CARD_JSON)))
    return dict(card.get("metrics") or {})


def publish_decision(metrics: dict[str, Any], destination: str, floor: float) -> tuple[bool, str]:
    """(publish?, why). Recall@1 must exceed `floor` and the published model's Recall@1."""
    recall = float(metrics[RECALL_KEY])
    if recall < floor:
        return False, f"Recall@1 {recall:.4f} is below the floor {floor:.4f}: not publishing"
    current = published_metrics(destination)
    if current is None or RECALL_KEY not in current:
        return True, f"Recall@1 {recall:.4f} >= floor {floor:.4f} and nothing is published at {destination}: publishing"
    best = float(current[RECALL_KEY])
    if recall <= best:
        return False, f"Recall@1 {recall:.4f} does not beat the published model's {best:.4f}: not publishing"
    return True, f"Recall@1 {recall:.4f} beats the floor {floor:.4f} and the published {best:.4f}: publishing"
