"""Step 4: embed a dataset with a trained model and measure retrieval (Recall@K, MAP@R).

The evaluation set is leave-one-out: every image queries all the others. For open-set
evaluation, give it a dataset of classes the model never saw in training.

Up to `exact_max_samples` images every query is evaluated exactly; above, a random sample of
queries is searched exactly against the full gallery (trainer.retrieval.evaluate_retrieval),
sized so Recall@1's 95% interval is at most `target_half_width` wide each side. metrics.json
always says which: "evaluation" holds the method, counts, seed and every metric's interval,
and `<metric>_ci95_half_width` sits beside each metric (0 when exact).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from imlt.trainer import storage
from imlt.trainer.data.manifest import ManifestRecord, read_manifest
from imlt.trainer.device import resolve_device
from imlt.trainer.retrieval import EvaluationSettings, evaluate_retrieval
from imlt.trainer.step_models import EvaluateInput, EvaluateOutput

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PLOT_FILE = "recall_at_k.png"


def evaluate_model(inp: EvaluateInput) -> EvaluateOutput:
    """Write output_dir/metrics.json and output_dir/recall_at_k.png; return the metrics."""
    from imlt.trainer.model import load_embedding_model

    model, cfg = load_embedding_model(inp.model_dir)
    records = read_manifest(inp.dataset_dir)
    if not records:
        raise ValueError(f"{storage.join(inp.dataset_dir, 'manifest.jsonl')}: the dataset is empty")
    device = resolve_device()  # this host's own device, whatever the training config asked for
    log.info("embedding %d images from %s on %s", len(records), inp.dataset_dir, device)
    embeddings, labels = embed(model, records, cfg.data.image_size, inp.batch_size, inp.reader_threads, device)
    settings = EvaluationSettings(mode=inp.eval_mode, exact_max_samples=inp.exact_max_samples,
                                  sample_queries=inp.sample_queries, target_half_width=inp.target_half_width,
                                  seed=inp.sample_seed, backend=inp.search_backend, device=device.type)
    # the embeddings are ours: searched in place when already unit length (no 2 GiB copy at 1M x 512)
    report = evaluate_retrieval(embeddings, labels, ks=tuple(inp.ks), settings=settings, copy=False)
    log.info("evaluation: %s, %d queries (%s)", report.method, report.details["num_queries"], report.details["backend"])
    metrics = report.flat()
    evaluation = report.evaluation()
    evaluation["dataset"] = _dataset_record(inp.dataset_dir, inp.model_dir)
    write_metrics(inp.output_dir, metrics, inp.ks, title=f"{cfg.model.backbone} on {len(records)} images",
                  evaluation=evaluation)
    return EvaluateOutput(metrics_dir=inp.output_dir, metrics=metrics, evaluation=evaluation)


def _dataset_record(dataset_dir: str, model_dir: str) -> dict[str, Any]:
    """What the metrics were measured on, for the model card: the split and how many of its
    classes the model never trained on (no path: a card must not carry a temporary folder)."""
    from imlt.trainer.data.manifest import read_classes, read_summary
    from imlt.trainer.model_files import CLASSES

    classes = read_classes(dataset_dir)
    record: dict[str, Any] = {"classes": len(classes)}
    try:
        record["split"] = read_summary(dataset_dir).split
    except FileNotFoundError:  # a dataset folder written by other tools may have no summary
        record["split"] = None
    trained_url = storage.join(model_dir, CLASSES)
    if storage.exists(trained_url):
        trained = set(storage.read_text(trained_url).splitlines())
        record["unseen_classes"] = sum(1 for c in classes if c not in trained)
    return record


def write_metrics(output_dir: str, metrics: dict[str, float], ks: Sequence[int], title: str = "Retrieval",
                  evaluation: dict[str, Any] | None = None) -> None:
    """metrics.json: the numbers flat (gates read them), the method record under "evaluation"."""
    from imlt.trainer.plots import recall_at_k_png

    doc: dict[str, Any] = dict(metrics)
    if evaluation is not None:
        doc["evaluation"] = evaluation
        if not evaluation.get("exact", True):
            title += f" (estimate: {evaluation.get('num_queries')} sampled queries, 95% CI)"
    storage.write_text(storage.join(output_dir, METRICS_FILE), json.dumps(doc, indent=2) + "\n")
    storage.write_bytes(storage.join(output_dir, PLOT_FILE), recall_at_k_png(metrics, ks, title))


def read_metrics(metrics_dir: str) -> dict[str, Any]:
    url = storage.join(metrics_dir, METRICS_FILE)
    try:
        metrics = json.loads(storage.read_text(url))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no metrics file; run the evaluate step first") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{url}: expected a JSON object of metrics, got {type(metrics).__name__}")
    return metrics


def embed(
    model: "torch.nn.Module",
    records: list[ManifestRecord],
    image_size: int,
    batch_size: int,
    reader_threads: int,
    device: "str | torch.device",
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (float32, N x D, in manifest order) and primary labels (int64, N)."""
    import torch
    from tqdm.auto import tqdm

    device = torch.device(device)
    model = model.to(device).eval()
    loader = _loader(records, image_size, batch_size, reader_threads)
    chunks: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc="embedding", unit="batch", leave=False):
            chunks.append(model(images.to(device)).float().cpu().numpy())
            labels.append(np.asarray(targets, dtype=np.int64))
    return np.concatenate(chunks).astype(np.float32, copy=False), np.concatenate(labels)


def raw_pixel_embeddings(records: list[ManifestRecord], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The images themselves as vectors (the model's input pixels, flattened): a no-learning baseline."""
    import torch

    chunks: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for images, targets in _loader(records, image_size, batch_size=256, reader_threads=0):
        chunks.append(images.reshape(len(images), -1).to(torch.float32).numpy())
        labels.append(np.asarray(targets, dtype=np.int64))
    return np.concatenate(chunks), np.concatenate(labels)


def _loader(records: list[ManifestRecord], image_size: int, batch_size: int, reader_threads: int) -> Any:
    import torch
    from torch.utils.data import DataLoader

    from imlt.trainer.data.dataset import ImageDataset

    return DataLoader(
        ImageDataset(records, image_size, train=False),
        batch_size=batch_size,
        shuffle=False,
        num_workers=reader_threads,
        pin_memory=torch.cuda.is_available(),
    )
