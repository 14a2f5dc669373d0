"""The evaluate step end to end on a tiny image folder, plus its embedding helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imlt.trainer.config import RunConfig
from imlt.trainer.data.dataset import ImageDataset
from imlt.trainer.data.manifest import DatasetSummary, ManifestRecord, read_manifest, write_dataset
from imlt.trainer.evaluate import embed, evaluate_model, raw_pixel_embeddings, read_metrics
from imlt.trainer.model import build_model, load_embedding_model, save_embedding_model
from imlt.trainer.retrieval import retrieval_metrics
from imlt.trainer.steps import EvaluateInput

IMAGE_SIZE = 16
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 210)}
PER_CLASS = 4
METRICS = {"recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r"}
KEYS = METRICS | {"num_queries", "num_classes"} | {f"{m}_ci95_half_width" for m in METRICS}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three colour classes with noise; one singleton class that cannot be a query."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    classes = [*COLOURS, "grey"]
    records = []
    for label, name in enumerate(classes):
        colour = COLOURS.get(name, (128, 128, 128))
        for i in range(PER_CLASS if name in COLOURS else 1):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
            path = root / "images" / f"{name}_{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(pixels).save(path)
            records.append(ManifestRecord(uri=str(path), labels=[label], source=f"list.txt:{len(records) + 1}"))
    summary = DatasetSummary(split="val", annotations="list.txt", data_format="ClsSourceImageList",
                             num_samples=len(records), num_classes=len(classes),
                             images_per_class={c: PER_CLASS if c in COLOURS else 1 for c in classes})
    write_dataset(str(root / "dataset"), records, classes, summary)
    return str(root / "dataset")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("model")
    cfg = RunConfig(output_dir=str(root), data={"image_size": IMAGE_SIZE},
                    model={"backbone": "resnet18", "feature_dim": 8, "zero_init_last": False}, train={"device": "cpu"})
    torch.manual_seed(0)
    save_embedding_model(build_model(cfg.model, IMAGE_SIZE).eval(), cfg, str(root), list(COLOURS))
    return str(root)


def test_evaluate_model_writes_metrics_and_plot(model_dir: str, dataset_dir: str, tmp_path: Path) -> None:
    out_dir = tmp_path / "eval"
    out = evaluate_model(EvaluateInput(model_dir=model_dir, dataset_dir=dataset_dir, output_dir=str(out_dir),
                                       batch_size=5, reader_threads=0))
    assert out.metrics_dir == str(out_dir)
    on_disk = read_metrics(str(out_dir))
    evaluation = on_disk.pop("evaluation")
    assert set(on_disk) == KEYS
    assert on_disk == pytest.approx(out.metrics)
    assert evaluation == out.evaluation and evaluation["method"] == "exact" and evaluation["exact"] is True
    assert all(on_disk[f"{m}_ci95_half_width"] == 0 for m in METRICS)
    assert on_disk["num_queries"] == 3 * PER_CLASS and on_disk["num_classes"] == 3  # the singleton is no query
    assert isinstance(on_disk["num_queries"], int)
    assert all(0.0 <= on_disk[k] <= 1.0 for k in KEYS - {"num_queries", "num_classes"})
    assert on_disk["recall_at_1"] <= on_disk["recall_at_2"] <= on_disk["recall_at_4"] <= on_disk["recall_at_8"]
    png = (out_dir / "recall_at_k.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out_dir / "recall_at_k.png") as im:
        assert im.width > 100 and im.height > 100

    # the metrics are those of the model's own forward pass over the images, one at a time
    model, _ = load_embedding_model(model_dir)
    data = ImageDataset(read_manifest(dataset_dir), IMAGE_SIZE, train=False)
    with torch.inference_mode():
        direct = np.concatenate([model(data[i][0][None]).numpy() for i in range(len(data))])
    expected = retrieval_metrics(direct, np.array(data.labels))
    assert {k: out.metrics[k] for k in expected} == pytest.approx(expected, abs=1e-6)


def test_embed_is_batch_independent_and_ordered(model_dir: str, dataset_dir: str) -> None:
    model, _ = load_embedding_model(model_dir)
    records = read_manifest(dataset_dir)
    a, la = embed(model, records, IMAGE_SIZE, batch_size=1, reader_threads=0, device="cpu")
    b, lb = embed(model, records, IMAGE_SIZE, batch_size=7, reader_threads=1, device="cpu")
    assert a.dtype == np.float32 and a.shape == (len(records), 8)
    assert np.abs(a - b).max() < 1e-5
    assert la.tolist() == lb.tolist() == [r.labels[0] for r in records]
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_raw_pixels_separate_colours(dataset_dir: str) -> None:
    records = read_manifest(dataset_dir)
    pixels, labels = raw_pixel_embeddings(records, IMAGE_SIZE)
    assert pixels.shape == (len(records), 3 * IMAGE_SIZE * IMAGE_SIZE)
    m = retrieval_metrics(pixels, labels)
    assert m["recall_at_1"] == 1.0 and m["map_at_r"] == pytest.approx(1.0)


def test_evaluate_refuses_a_dataset_without_pairs(model_dir: str, tmp_path: Path, dataset_dir: str) -> None:
    records = read_manifest(dataset_dir)
    one_each = [records[0], records[PER_CLASS]]
    summary = DatasetSummary(split="val", annotations="x", data_format="ClsSourceImageList", num_samples=2,
                             num_classes=2, images_per_class={"red": 1, "green": 1})
    write_dataset(str(tmp_path / "ds"), one_each, ["red", "green"], summary)
    with pytest.raises(ValueError, match="two or more samples"):
        evaluate_model(EvaluateInput(model_dir=model_dir, dataset_dir=str(tmp_path / "ds"),
                                     output_dir=str(tmp_path / "eval"), reader_threads=0))
    assert not (tmp_path / "eval").exists()


def test_metrics_json_is_plain_json(model_dir: str, dataset_dir: str, tmp_path: Path) -> None:
    evaluate_model(EvaluateInput(model_dir=model_dir, dataset_dir=dataset_dir, output_dir=str(tmp_path),
                                 ks=[1, 3], reader_threads=0))
    text = (tmp_path / "metrics.json").read_text()
    assert set(json.loads(text)) == {"recall_at_1", "recall_at_3", "map_at_r", "num_queries", "num_classes", "evaluation",
                                     "recall_at_1_ci95_half_width", "recall_at_3_ci95_half_width", "map_at_r_ci95_half_width"}
    assert "NaN" not in text


def test_sampled_evaluation_says_so_everywhere(model_dir: str, dataset_dir: str, tmp_path: Path) -> None:
    # forced sampling on the tiny set: an estimate with intervals, never presented as exact
    out = evaluate_model(EvaluateInput(model_dir=model_dir, dataset_dir=dataset_dir, output_dir=str(tmp_path),
                                       eval_mode="sampled", sample_queries=6, sample_seed=3, reader_threads=0))
    ev = json.loads((tmp_path / "metrics.json").read_text())["evaluation"]
    assert ev["method"] == "sampled" and ev["exact"] is False
    assert ev["num_queries"] == out.metrics["num_queries"] == 6 and ev["sample_seed"] == 3
    assert ev["num_eligible_queries"] == 3 * PER_CLASS
    for m in METRICS:
        lo, hi = ev["intervals"][m]
        assert lo <= out.metrics[m] <= hi
        assert out.metrics[f"{m}_ci95_half_width"] == pytest.approx((hi - lo) / 2)
    assert out.metrics["recall_at_1_ci95_half_width"] > 0


def test_auto_mode_uses_the_threshold(model_dir: str, dataset_dir: str, tmp_path: Path) -> None:
    out = evaluate_model(EvaluateInput(model_dir=model_dir, dataset_dir=dataset_dir, output_dir=str(tmp_path),
                                       exact_max_samples=5, sample_queries=4, reader_threads=0))
    assert out.evaluation["method"] == "sampled" and out.metrics["num_queries"] == 4
    with pytest.raises(ValueError, match="eval_mode"):
        EvaluateInput(model_dir=model_dir, dataset_dir=dataset_dir, output_dir=str(tmp_path), eval_mode="quick")


def test_model_card_shows_an_estimate_with_its_intervals() -> None:
    from imlt.trainer.model_card import evaluation_lines

    ev = {"method": "sampled", "exact": False, "num_queries": 30000, "num_eligible_queries": 10**6, "sample_seed": 0,
          "interval_method": "Wilson", "intervals": {"recall_at_1": [0.745, 0.755]}}
    text = "\n".join(evaluation_lines(ev, {"recall_at_1": 0.75}))
    assert "Estimated from 30000 randomly sampled queries" in text
    assert "| recall_at_1 | 0.7500 | 0.7450 – 0.7550 | 0.0050 |" in text
    assert "Exact" in "\n".join(evaluation_lines({"exact": True, "num_queries": 12}, {}))
    ev.update(backend="int8 on cpu (int8 candidates by onnxruntime, exact fp32 re-ranking)", search_fallback_rows=61)
    text = "\n".join(evaluation_lines(ev, {"recall_at_1": 0.75}))
    assert "each searched exactly by int8 on cpu (int8 candidates by onnxruntime, exact fp32 re-ranking), 61 of them re-searched in fp32;" in text
