"""The opt-in paths of trainer.retrieval: approximate indexes and sampled queries."""

from __future__ import annotations

import numpy as np
import pytest

from imlt.trainer.retrieval import ApproximateIndex, RetrievalError, retrieval_metrics


def _clusters(n_classes: int = 12, per_class: int = 15, dim: int = 16, noise: float = 0.6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim)).astype(np.float32)
    labels = np.repeat(np.arange(n_classes), per_class)
    return centres[labels] + noise * rng.standard_normal((len(labels), dim)).astype(np.float32), labels


@pytest.mark.parametrize("index", ["hnsw", ApproximateIndex("hnsw", hnsw_m=8, ef_search=64)])
def test_hnsw_with_a_wide_search_equals_exact(index: str | ApproximateIndex) -> None:
    # 180 points and a search width of at least k + 1 = 15: the graph search visits everything
    x, y = _clusters()
    exact = retrieval_metrics(x, y)
    approx = retrieval_metrics(x, y, index=index)
    assert approx == pytest.approx(exact, abs=1e-9)


def test_ivf_scanning_every_cell_equals_exact() -> None:
    x, y = _clusters()
    exact = retrieval_metrics(x, y)
    approx = retrieval_metrics(x, y, index=ApproximateIndex("ivf", nlist=4, nprobe=4))
    assert approx == pytest.approx(exact, abs=1e-9)


def test_ivf_scanning_one_cell_differs_and_marks_missing_neighbours() -> None:
    # Overlapping classes, one cell of many scanned: some queries get fewer than k neighbours
    # (faiss pads with -1), which must count as misses rather than index the last sample.
    x, y = _clusters(n_classes=6, per_class=60, dim=8, noise=2.0)
    exact = retrieval_metrics(x, y)
    approx = retrieval_metrics(x, y, index=ApproximateIndex("ivf", nlist=9, nprobe=1))
    assert approx["num_queries"] == exact["num_queries"]
    assert approx["map_at_r"] != pytest.approx(exact["map_at_r"], abs=1e-6)
    for key in ("recall_at_1", "recall_at_8", "map_at_r"):
        assert 0.0 <= approx[key] <= 1.0


def test_sampled_queries_average_over_the_sample_only() -> None:
    x, y = _clusters(noise=1.5)
    sample = np.arange(0, len(y), 3)
    full = retrieval_metrics(x, y)
    part = retrieval_metrics(x, y, queries=sample)
    assert part["num_queries"] == len(sample)
    # a query's result depends only on the gallery, so per-query values agree with the full run
    singles = [retrieval_metrics(x, y, queries=[i]) for i in sample]
    assert part["recall_at_1"] == pytest.approx(np.mean([s["recall_at_1"] for s in singles]))
    assert part["map_at_r"] == pytest.approx(np.mean([s["map_at_r"] for s in singles]))
    every = retrieval_metrics(x, y, queries=np.arange(len(y)))
    assert every == pytest.approx(full)


def test_sampled_queries_skip_lone_samples_and_check_range() -> None:
    x, y = _clusters()
    y = y.copy()
    y[0] = 99  # a class of one: never a query
    assert retrieval_metrics(x, y, queries=[0, 1, 2])["num_queries"] == 2
    with pytest.raises(RetrievalError, match="query indices"):
        retrieval_metrics(x, y, queries=[len(y)])
    with pytest.raises(RetrievalError, match="none of the given query indices"):
        retrieval_metrics(x, y, queries=[0])


def test_unknown_index_kind_is_refused() -> None:
    x, y = _clusters()
    with pytest.raises(RetrievalError, match="unknown index kind 'lsh'"):
        retrieval_metrics(x, y, index="lsh")
