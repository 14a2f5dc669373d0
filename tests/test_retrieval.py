"""Retrieval metrics against PML's AccuracyCalculator and a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from imlt.trainer.retrieval import RetrievalError, retrieval_metrics


def _pml(emb: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    # AccuracyCalculator has no distance argument: cosine ranking comes from its kNN
    # backend. CustomKNN(CosineSimilarity()) is torch topk over the full matrix, so the
    # reference shares neither faiss nor chunking with the code under test.
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=CustomKNN(CosineSimilarity()),
    )
    return calc.get_accuracy(
        query=emb, query_labels=labels, reference=emb, reference_labels=labels, ref_includes_query=True
    )


def _brute_force(emb: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Full-matrix leave-one-out retrieval, ties by lower index, written for clarity."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x.astype(np.float64) @ x.T.astype(np.float64)
    recalls = {k: [] for k in ks}
    aps = []
    for i in range(len(x)):
        r = int((labels == labels[i]).sum()) - 1
        if r == 0:
            continue
        others = [j for j in range(len(x)) if j != i]
        ranked = sorted(others, key=lambda j: (-sim[i, j], j))
        rel = [labels[j] == labels[i] for j in ranked]
        for k in ks:
            recalls[k].append(any(rel[:k]))
        hits, ap = 0, 0.0
        for rank, ok in enumerate(rel[:r], start=1):
            if ok:
                hits += 1
                ap += hits / rank
        aps.append(ap / r)
    out = {f"recall_at_{k}": float(np.mean(v)) for k, v in recalls.items()}
    out["map_at_r"] = float(np.mean(aps))
    return out


def _clustered(rng: np.random.Generator, n: int, d: int, classes: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d))
    return (centres[labels] + noise * rng.normal(size=(n, d))).astype(np.float32), labels


CASES = [(40, 8, 4), (257, 16, 20), (900, 32, 9)]


@pytest.mark.parametrize("n,d,classes", CASES)
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_equals_pml_accuracy_calculator(n: int, d: int, classes: int, kind: str) -> None:
    rng = np.random.default_rng(n + d)
    if kind == "random":
        labels = rng.integers(0, classes, n)
        emb = rng.normal(size=(n, d)).astype(np.float32)
    else:
        emb, labels = _clustered(rng, n, d, classes, noise=0.8)
    # a few singleton classes: PML leaves them out of the queries, so must we
    labels[:3] = classes + np.arange(3)
    ours = retrieval_metrics(emb, labels, chunk_size=max(1, n // 7))
    ref = _pml(emb, labels)
    assert ours["recall_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)
    assert ours["num_queries"] == n - 3
    assert ours["num_classes"] == len(np.unique(labels[3:]))
    if kind == "clustered":
        assert ours["recall_at_1"] > 0.5  # the data is really clustered, not a trivial case


def test_pml_default_backend_agrees_only_on_normalised_input() -> None:
    # PML's default kNN is faiss L2: equal to cosine ranking on unit vectors, not otherwise
    rng = np.random.default_rng(11)
    emb, labels = _clustered(rng, 300, 16, 10, noise=1.0)
    emb *= rng.uniform(0.1, 10.0, size=(len(emb), 1)).astype(np.float32)
    ours = retrieval_metrics(emb, labels)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                              device=torch.device("cpu"))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    on_unit = calc.get_accuracy(unit, labels, unit, labels, ref_includes_query=True)
    on_raw = calc.get_accuracy(emb, labels, emb, labels, ref_includes_query=True)
    assert ours["recall_at_1"] == pytest.approx(on_unit["precision_at_1"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(on_unit["mean_average_precision_at_r"], abs=1e-6)
    assert abs(ours["map_at_r"] - on_raw["mean_average_precision_at_r"]) > 1e-3


@pytest.mark.parametrize("n,d,classes", CASES[:2])
def test_recall_at_k_matches_brute_force(n: int, d: int, classes: int) -> None:
    rng = np.random.default_rng(7)
    emb, labels = _clustered(rng, n, d, classes, noise=1.5)
    ks = (1, 2, 4, 8, 16)
    ours = retrieval_metrics(emb, labels, ks=ks, chunk_size=13)
    ref = _brute_force(emb, labels, ks)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert ours["recall_at_1"] <= ours["recall_at_2"] <= ours["recall_at_8"] <= ours["recall_at_16"]


def test_chunk_size_does_not_change_results() -> None:
    rng = np.random.default_rng(3)
    emb, labels = _clustered(rng, 500, 24, 12, noise=1.2)
    results = [retrieval_metrics(emb, labels, chunk_size=c) for c in (1, 7, 64, 499, 500, 4096)]
    for r in results[1:]:
        assert r == results[0]


def test_scale_does_not_matter_cosine_not_l2() -> None:
    rng = np.random.default_rng(4)
    emb, labels = _clustered(rng, 200, 16, 8, noise=1.0)
    scaled = emb * rng.uniform(0.01, 100.0, size=(len(emb), 1)).astype(np.float32)
    assert retrieval_metrics(scaled, labels) == pytest.approx(retrieval_metrics(emb, labels), abs=1e-9)


def test_ties_break_by_lower_index_whatever_the_chunking() -> None:
    # duplicated images give identical embeddings: the result must not depend on faiss's
    # order of equal scores nor on which chunk a query falls in
    rng = np.random.default_rng(5)
    base, base_labels = _clustered(rng, 30, 8, 5, noise=1.0)
    emb = np.repeat(base, 4, axis=0)
    labels = np.repeat(base_labels, 4)
    labels[::4] = (labels[::4] + 1) % 5  # a duplicate with another label makes ties matter
    ks = (1, 2, 4, 8)
    ref = _brute_force(emb, labels, ks)
    for chunk in (1, 5, 120):
        ours = retrieval_metrics(emb, labels, ks=ks, chunk_size=chunk)
        for key, value in ref.items():
            assert ours[key] == pytest.approx(value, abs=1e-9), (chunk, key)


def test_collapsed_embeddings_are_all_ties() -> None:
    # an untrained zero-init ResNet maps every image to one point: pure tie breaking
    labels = np.array([0, 1, 0, 1, 2, 2, 0])
    emb = np.ones((7, 4), dtype=np.float32)
    ours = retrieval_metrics(emb, labels, ks=(1, 2))
    assert ours == pytest.approx({**_brute_force(emb, labels, (1, 2)), "num_queries": 7, "num_classes": 3})


def test_hand_computed_example() -> None:
    # directions on a circle: angles 0, 8, 20 degrees are class 0; 90, 100 are class 1
    angles = np.deg2rad([0, 8, 20, 90, 100])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.array([0, 0, 0, 1, 1])
    m = retrieval_metrics(emb, labels, ks=(1,))
    assert m["recall_at_1"] == 1.0
    assert m["map_at_r"] == pytest.approx(1.0)
    # swap one label: sample 2 (20 deg) now belongs to class 1 but sits among class 0
    labels = np.array([0, 0, 1, 1, 1])
    m = retrieval_metrics(emb, labels, ks=(1,))
    # queries 0,1 (R=1): nearest is each other -> AP 1, hit. 2 (R=2): ranking 1(0),0(0),3(1)
    # -> AP 0, miss. 3 (R=2): 4(1), 2(1) -> AP 1, hit. 4 (R=2): 3(1), 2(1) -> AP 1, hit.
    assert m["recall_at_1"] == pytest.approx(4 / 5)
    assert m["map_at_r"] == pytest.approx(4 / 5)


def test_errors_are_clear() -> None:
    with pytest.raises(RetrievalError, match="two or more samples"):
        retrieval_metrics(np.eye(3, dtype=np.float32), np.array([0, 1, 2]))
    with pytest.raises(RetrievalError, match="labels"):
        retrieval_metrics(np.eye(3, dtype=np.float32), np.array([0, 1]))
    with pytest.raises(RetrievalError, match="NaN"):
        retrieval_metrics(np.array([[1.0, 0.0], [np.nan, 1.0]]), np.array([0, 0]))
