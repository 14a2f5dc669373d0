"""The opt-in paths of trainer.retrieval: approximate indexes and sampled queries (exact back ends: test_search.py)."""

from __future__ import annotations

import numpy as np
import pytest

from imlt.trainer.retrieval import RetrievalError, retrieval_metrics
from imlt.trainer.search import ApproximateIndex


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


def _ties_free(n: int = 600, dim: int = 24, classes: int = 30, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    y = rng.integers(0, classes, n)
    return (centres[y] + 1.3 * rng.standard_normal((n, dim))).astype(np.float32), y


# --- evaluation by size: exact or sampled queries with 95% intervals --------------------------------

from imlt.trainer.retrieval import (  # noqa: E402
    EvaluationSettings,
    evaluate_retrieval,
    mean_interval,
    required_sample_size,
    wilson_interval,
)


def test_small_sets_are_evaluated_exactly_with_zero_width() -> None:
    x, y = _ties_free()
    report = evaluate_retrieval(x, y)
    assert report.method == "exact" and report.exact
    assert report.metrics == retrieval_metrics(x, y)
    assert all(h == 0 for h in report.half_widths().values())
    ev = report.evaluation()
    assert ev["num_queries"] == report.metrics["num_queries"] and ev["confidence"] == 0.95


def test_sampled_evaluation_is_exact_search_on_a_seeded_sample() -> None:
    x, y = _ties_free()
    st = EvaluationSettings(mode="sampled", sample_queries=150, seed=7)
    a, b = evaluate_retrieval(x, y, settings=st), evaluate_retrieval(x, y, settings=st)
    assert a.method == "sampled" and not a.exact
    assert (a.metrics, a.intervals) == (b.metrics, b.intervals)  # same seed, same sample
    assert a.details["num_queries"] == 150 and a.details["sample_seed"] == 7
    sample = np.sort(np.random.default_rng(7).permutation(np.arange(len(y)))[:150])
    assert a.metrics == retrieval_metrics(x, y, queries=sample)
    for m, (lo, hi) in a.intervals.items():
        assert lo <= a.metrics[m] <= hi and hi - lo > 0
    assert "Wilson" in a.details["interval_method"]
    flat = a.flat()
    assert flat["recall_at_1_ci95_half_width"] == pytest.approx((a.intervals["recall_at_1"][1] - a.intervals["recall_at_1"][0]) / 2)


def test_auto_mode_samples_above_the_threshold_and_sizes_from_the_pilot() -> None:
    x, y = _ties_free(n=3000, dim=16, classes=150)
    st = EvaluationSettings(exact_max_samples=1000, target_half_width=0.03, pilot_queries=300)
    report = evaluate_retrieval(x, y, settings=st)
    assert report.method == "sampled"
    assert 300 <= report.details["num_queries"] < 3000
    assert report.half_widths()["recall_at_1"] <= 0.03 * 1.05
    assert "pilot of 300" in report.details["sample_size"]


def test_intervals_cover_the_exact_value_about_95_percent_of_the_time() -> None:
    x, y = _ties_free(n=1500, dim=16, classes=100, seed=5)
    exact = retrieval_metrics(x, y)
    covered = {"recall_at_1": 0, "map_at_r": 0}
    seeds = range(60)
    for seed in seeds:
        r = evaluate_retrieval(x, y, settings=EvaluationSettings(mode="sampled", sample_queries=200, seed=seed))
        for m in covered:
            lo, hi = r.intervals[m]
            covered[m] += lo <= exact[m] <= hi
    for m, c in covered.items():
        assert c / len(seeds) >= 0.85, (m, c)


def test_a_sample_as_large_as_the_set_falls_back_to_exact_and_says_so() -> None:
    x, y = _ties_free(n=200)
    report = evaluate_retrieval(x, y, settings=EvaluationSettings(mode="sampled", sample_queries=10_000))
    assert report.method == "exact"
    assert "would cover all 200 queries" in report.details["note"]
    assert report.metrics == retrieval_metrics(x, y)


def test_bad_input_is_refused_clearly() -> None:
    x, y = _ties_free(n=100)
    bad = x.copy()
    bad[17, 3] = np.inf
    for mode in ("exact", "sampled"):
        with pytest.raises(RetrievalError, match="embedding 17 holds NaN or inf"):
            evaluate_retrieval(bad, y, settings=EvaluationSettings(mode=mode, sample_queries=10))
    with pytest.raises(RetrievalError, match="one label"):
        evaluate_retrieval(x, np.zeros(len(x), dtype=int))
    with pytest.raises(RetrievalError, match="two or more samples"):
        evaluate_retrieval(x, np.arange(len(x)), settings=EvaluationSettings(mode="sampled", sample_queries=10))
    with pytest.raises(RetrievalError, match="unknown evaluation mode"):
        EvaluationSettings(mode="fast")
    with pytest.raises(RetrievalError, match="sample_queries"):
        EvaluationSettings(sample_queries=0)


def test_wilson_matches_scipy_and_the_finite_population_narrows_it() -> None:
    stats = pytest.importorskip("scipy.stats")
    for hits, n in [(0, 20), (7, 20), (750, 1000), (1000, 1000)]:
        ref = stats.binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(hits, n) == pytest.approx((ref.low, ref.high), abs=1e-9)
    lo, hi = wilson_interval(750, 1000)
    lo2, hi2 = wilson_interval(750, 1000, population=2000)
    assert hi2 - lo2 < hi - lo
    assert wilson_interval(750, 1000, population=1000) == (0.75, 0.75)
    v = np.random.default_rng(0).uniform(size=400)
    lo, hi = mean_interval(v)
    assert hi - lo == pytest.approx(2 * 1.959963984540054 * v.std(ddof=1) / 20)


def test_required_sample_size_follows_the_binomial_formula() -> None:
    from imlt.trainer.retrieval import PerQuery

    hits = np.zeros((4000, 1), dtype=bool)
    hits[:3000] = True  # pilot Recall@1 0.75
    pilot = PerQuery(ks=(1,), queries=np.arange(4000), hits=hits, ap=np.zeros(4000), num_classes=2)
    n = required_sample_size(pilot, population=10**9, half_width=0.005)
    # 1.96^2 * p(1-p) / 0.005^2 = 28,812 at p = 0.75; the conservative end of the pilot interval is a bit nearer 0.5
    assert 28_812 < n < 33_000


def test_benchmark_data_is_seeded_unit_and_zipf_like() -> None:
    from benchmarks.eval_data import DataSpec, class_sizes, make_realistic

    spec = DataSpec(n=3000, dim=32, seed=4)
    x, y = make_realistic(spec)
    x2, y2 = make_realistic(spec)
    assert (x == x2).all() and (y == y2).all()
    assert x.dtype == np.float32 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-6)
    sizes = np.bincount(y)
    assert len(sizes) == spec.num_classes == 300 and sizes.sum() == 3000
    assert sizes.min() >= 2 and sizes.max() <= spec.max_size
    assert np.median(sizes) < sizes.mean()  # a long tail: most classes small, a few large
    with pytest.raises(ValueError, match="need n >="):
        class_sizes(10, 6, 100, np.random.default_rng(0))


def test_a_pilot_sized_sample_equals_the_same_queries_searched_at_once() -> None:
    x, y = _ties_free(n=3000, dim=16, classes=150)
    st = EvaluationSettings(mode="sampled", target_half_width=0.03, pilot_queries=300, seed=2)
    r = evaluate_retrieval(x, y, settings=st)
    n = r.details["num_queries"]
    assert 300 < n < 3000
    once = retrieval_metrics(x, y, queries=np.random.default_rng(2).permutation(np.arange(len(y)))[:n])
    assert r.metrics == pytest.approx(once, abs=1e-12)
