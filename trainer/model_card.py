"""The model card of a published version: model_card.json for programs, MODEL_CARD.md for people.

What a consumer needs to trust and use a version: the exact serving preprocessing (read off the
evaluation transform), the metrics and how they were measured (an estimate is never shown as
exact), the publishing gate, the training data, the starting weights and the config, with local
paths cut and credentials removed from URLs.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from imlt.trainer import storage
from imlt.trainer.model_files import CLASSES, PRETRAINED, USAGE
from imlt.trainer.step_models import PublishInput


def model_card(
    inp: PublishInput,
    staging: Path,
    config: dict[str, Any],
    metrics: dict[str, Any] | None,
    summary: dict[str, Any] | None,
    usage: dict[str, Any] | None,
    version: int,
    gate: dict[str, Any],
    export_check: dict[str, Any],
) -> dict[str, Any]:
    """Everything a consumer needs to trust and use a version, as JSON."""
    classes = (staging / CLASSES).read_text(encoding="utf-8").splitlines()
    size = config["data"]["image_size"]
    evaluation = (metrics or {}).get("evaluation")
    measured_on = evaluation.get("dataset") if isinstance(evaluation, dict) else None
    return {
        "version": version,
        "created": utc_now(),
        "config_hash": config.get("config_hash"),
        "backbone": config["model"]["backbone"],
        "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32",
                  "preprocessing": serving_preprocessing(size)},
        "output": {"name": "embeddings", "shape": ["batch", config["model"]["feature_dim"]], "dtype": "float32",
                   "note": "L2-normalised: compare by dot product (cosine similarity)"},
        "metrics": metrics,
        "measured_on": measured_on,
        "gate": gate,
        "num_classes": len(classes),
        "data": without_local_paths(summary),
        "usage": usage,
        "pretrained": json.loads(storage.read_text(p)) if storage.exists(p := storage.join(inp.model_dir, PRETRAINED)) else None,
        "config": without_local_paths(config),
        "export_check": export_check,
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                  for p in sorted(staging.iterdir()) if p.is_file()},
        # local folders are a task's temporary space, meaningless to a reader: only remote URLs
        "sources": {"model_dir": _remote(inp.model_dir), "metrics_dir": _remote(inp.metrics_dir),
                    "dataset_dir": _remote(inp.dataset_dir)},
    }


def serving_preprocessing(image_size: int) -> dict[str, Any]:
    """What a serving system must do to an image, read off the evaluation transform itself.

    Derived from the transform object rather than written as text, so the card cannot drift from
    what evaluate measured: an operation this does not know is an error, not a silent omission.
    """
    from torchvision.transforms import v2

    from imlt.trainer.data.transforms import build_eval_transform

    spec: dict[str, Any] = {"decode": "any format Pillow reads; convert to RGB (3 channels)", "channel_order": "RGB",
                            "layout": "NCHW", "dtype": "float32"}
    words = ["Decode the image and convert it to RGB (channel order R, G, B; alpha dropped, grey repeated)."]
    for op in build_eval_transform(image_size).transforms:
        if isinstance(op, v2.ToImage):
            continue
        if isinstance(op, v2.Resize):
            side = op.size[0] if isinstance(op.size, (list, tuple)) and len(op.size) == 1 else op.size
            interp = getattr(op.interpolation, "value", str(op.interpolation))
            spec["resize"] = {"shorter_side": side, "interpolation": interp, "antialias": bool(op.antialias),
                              "keep_aspect_ratio": True}
            words.append(f"Resize so the shorter side is {side} px, keeping the aspect ratio "
                         f"({interp}{', antialiased' if op.antialias else ''}).")
        elif isinstance(op, v2.CenterCrop):
            h, w = op.size
            spec["center_crop"] = [h, w]
            words.append(f"Crop the central {h}x{w} (height x width) pixels.")
        elif isinstance(op, v2.ToDtype):
            spec["value_range"] = [0.0, 1.0] if op.scale else None
            words.append("Convert to float32 and divide the 0-255 pixel values by 255 (range 0 to 1)."
                         if op.scale else "Convert to float32 without scaling.")
        elif isinstance(op, v2.Normalize):
            spec["mean"], spec["std"] = [float(m) for m in op.mean], [float(x) for x in op.std]
            words.append(f"Per channel (R, G, B), subtract mean {tuple(spec['mean'])} and divide by std {tuple(spec['std'])}.")
        else:
            raise TypeError(f"model card: the evaluation transform has {type(op).__name__}, which the card cannot describe")
    words.append(f"Feed a float32 tensor of shape [batch, 3, {image_size}, {image_size}] (NCHW).")
    spec["steps"] = words
    return spec


def without_local_paths(obj: Any) -> Any:
    """The card's copy with each local path cut to `.../name`: the folders were a task's temporary
    space (meaningless to a reader, and they leak host layout); remote URLs stay, credentials removed.
    config.json in the version folder keeps the full values the model was trained with."""
    if isinstance(obj, dict):
        return {k: without_local_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [without_local_paths(v) for v in obj]
    if isinstance(obj, str):
        if obj.startswith("file://") or (obj.startswith("/") and len(obj) > 1):
            return ".../" + obj.rstrip("/").rsplit("/", 1)[-1]
        if "://" in obj:
            return redact_url(obj)
    return obj


def _remote(url: str | None) -> str | None:
    """A remote URL without credentials; None for a local path (a task's temporary folder)."""
    if not url or "://" not in url or url.startswith("file://"):
        return None
    return redact_url(url)


def data_summary(dataset_dir: str | None) -> dict[str, Any] | None:
    from imlt.trainer.data.manifest import read_summary

    return read_summary(dataset_dir).model_dump(mode="json") if dataset_dir else None


def usage_record(model_dir: str) -> dict[str, Any] | None:
    """The train step's usage record (instance-minutes, GPUs), if it wrote one."""
    url = storage.join(model_dir, USAGE)
    if not storage.exists(url):
        return None
    try:
        usage = json.loads(storage.read_text(url))
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}:{e.lineno}: not valid JSON ({e.msg})") from None
    return usage if isinstance(usage, dict) else {"value": usage}


def _search_words(ev: dict[str, Any]) -> str:
    """Which exact search ran (and how many queries its certificate sent back to fp32), if recorded."""
    if not ev.get("backend"):
        return ""
    fallback = ev.get("search_fallback_rows")
    return f" by {ev['backend']}" + (f", {fallback} of them re-searched in fp32" if fallback else "")


def evaluation_lines(ev: Any, metrics: dict[str, Any]) -> list[str]:
    """How the metrics were measured: an estimate from sampled queries is never shown as exact."""
    if not isinstance(ev, dict):
        return []
    search = _search_words(ev)
    if ev.get("exact"):
        return [f"Exact: every one of {ev.get('num_queries')} queries evaluated (no sampling error){search}.", ""]
    ivs = ev.get("intervals") or {}
    lines = [f"Estimated from {ev.get('num_queries')} randomly sampled queries of {ev.get('num_eligible_queries')} "
             f"(seed {ev.get('sample_seed')}), each searched exactly{search}; 95% intervals: {ev.get('interval_method')}.",
             "", "| metric | estimate | 95% interval | half-width |", "|---|---|---|---|"]
    return lines + [f"| {m} | {float(metrics.get(m, float('nan'))):.4f} | {lo:.4f} – {hi:.4f} | {(hi - lo) / 2:.4f} |"
                    for m, (lo, hi) in ivs.items()] + [""]


def _measured_on_lines(on: Any, metrics: dict[str, Any]) -> list[str]:
    """Which split, and how many classes the model never saw: the number that makes Recall@1 meaningful."""
    queries = metrics.get("num_queries")
    if not isinstance(on, dict):
        return ([f"Measured on {queries} queries of {metrics.get('num_classes')} classes (split not recorded).", ""]
                if queries is not None else [])
    split = f"split `{on['split']}`" if on.get("split") else "an unnamed split"
    unseen = on.get("unseen_classes")
    seen = ("" if unseen is None else
            f"; {unseen} of its {on['classes']} classes are unseen in training"
            + (" (all of them: a test of new classes)" if unseen == on["classes"] else ""))
    return [f"Measured on {split}: {queries} queries over {metrics.get('num_classes')} classes with 2+ images{seen}.", ""]


def render_card(card: dict[str, Any]) -> str:
    """MODEL_CARD.md: the same facts for people."""
    pre = card["input"]["preprocessing"]
    lines = [f"# {card['backbone']} embedding model, v{card['version']}", "",
             f"Published {card['created']}; config hash `{card['config_hash']}`.", "",
             "## Use", "",
             f"Input `{card['input']['name']}`: float32 {card['input']['shape']}, preprocessed as below.",
             f"Output `{card['output']['name']}`: {card['output']['shape']}, {card['output']['note']}.", "",
             "Files: " + ", ".join(f"`{n}`" for n in card["files"]) + ".", "",
             "### Preprocessing a serving system must apply", ""]
    if isinstance(pre, dict):
        lines += [f"{i}. {step}" for i, step in enumerate(pre["steps"], start=1)] + [""]
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in pre.items() if k != "steps"] + [""]
    else:  # a card written before the preprocessing was recorded as numbers
        lines += [str(pre), ""]
    lines += ["## Metrics", ""]
    metrics = card["metrics"]
    if metrics:
        lines += _measured_on_lines(card.get("measured_on"), metrics)
        lines += evaluation_lines(metrics.get("evaluation"), metrics)
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
                  if k != "evaluation" and not k.endswith("_ci95_half_width")]
    else:
        lines.append("Not evaluated.")
    gate = card["gate"]
    lines += ["", "## Publishing gate", "",
              f"Setting: publish only if Recall@1 >= {gate['min_recall_at_1']} (`min_recall_at_1`)"
              + (" - 0 means no gate." if not gate["min_recall_at_1"] else ".")]
    if gate.get("decision"):
        lines.append(f"Decision for this version: {gate['decision']}.")
    lines += ["", "## Training data", ""]
    data = card["data"]
    if data:
        lines.append(f"{data['num_samples']} images, {data['num_classes']} classes "
                     f"(split `{data['split']}`, format {data['data_format']}, from `{data['annotations']}`).")
    else:
        lines.append("No data summary given.")
    if card.get("pretrained"):  # where the starting weights came from (trainer.weights)
        lines += ["", "## Starting weights", "", "```json", json.dumps(card["pretrained"], indent=2), "```"]
    if card["usage"]:
        lines += ["", "## Usage", "", "```json", json.dumps(card["usage"], indent=2), "```"]
    lines += ["", "## Config", "", "```json", json.dumps(card["config"], indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(lines)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def redact_url(url: str | None) -> str | None:
    """A URL without user:password@ (fsspec URLs may carry them); never put credentials in a card."""
    if not url or "://" not in url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
