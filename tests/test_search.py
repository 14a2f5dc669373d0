"""trainer.search: every exact back end against faiss brute force, the int8 certificate, the back-end choice."""

from __future__ import annotations

import numpy as np
import pytest

from imlt.trainer import search as S
from imlt.trainer.retrieval import EvaluationSettings, RetrievalError, evaluate_retrieval, l2_normalize, retrieval_metrics
from imlt.trainer.search import FlatSearch, Int8Search, TorchSearch, exact_searcher


def _ties_free(n: int = 600, dim: int = 24, classes: int = 30, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    y = rng.integers(0, classes, n)
    return (centres[y] + 1.3 * rng.standard_normal((n, dim))).astype(np.float32), y


def _near_ties(n_close: int = 120, n_far: int = 400, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Unit rows; rows 0-3 are queries with n_close gallery rows each whose exact scores are 0.5 + j * 2e-5:
    distinct (faiss orders them the same way every time) but far closer than the int8 bound can separate."""
    rng = np.random.default_rng(seed)
    queries = l2_normalize(rng.standard_normal((4, dim)).astype(np.float32))
    rows = [queries]
    for q in queries.astype(np.float64):
        u = rng.standard_normal((n_close, dim))
        u -= (u @ q)[:, None] * q  # orthogonal to the query
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        c = 0.5 + 2e-5 * rng.permutation(n_close)
        rows.append((c[:, None] * q + np.sqrt(1 - c**2)[:, None] * u).astype(np.float32))
    rows.append(l2_normalize(rng.standard_normal((n_far, dim)).astype(np.float32)) * 0.3)  # scores far below 0.5
    return np.ascontiguousarray(np.concatenate(rows))


def _same_as_faiss(x: np.ndarray, s: np.ndarray, i: np.ndarray, rows: np.ndarray, k: int) -> None:
    fs, fi = FlatSearch(x).search(x[rows], k)
    assert (i == fi).all()
    assert np.abs(s - fs).max() < 1e-6


@pytest.mark.parametrize("slack", [4e-3, 10.0])  # 10: no row is certified, every row takes the fp32 fallback
def test_torch_chunked_search_equals_faiss_exact(slack: float) -> None:
    x, y = _ties_free()
    xn = l2_normalize(x)
    ts = TorchSearch(xn, device="cpu", gallery_block=97, slack=slack)  # odd blocks: the merge across blocks runs
    s, i = ts.search(xn[:50], 20, rows=7)
    _same_as_faiss(xn, s, i, np.arange(50), 20)
    if slack > 1:
        assert ts.fallback_rows == 50
    faiss_m = retrieval_metrics(x, y)
    torch_m = retrieval_metrics(x, y, backend="torch")
    assert torch_m == pytest.approx(faiss_m, abs=1e-6)


def test_the_int8_gemm_is_exact_at_the_saturation_extremes() -> None:
    # u8 x s8 on AVX2 sums pairs of products in saturating int16: queries stay in [0, 128] so that
    # 128 * 127 * 2 fits; these are the largest products the quantisation can produce
    session = S._int8_matmul()
    d = 64
    a = np.zeros((4, d), dtype=np.uint8)
    a[0], a[1], a[2, ::2], a[3] = 128, 0, 128, np.arange(d) % 129
    b = np.full((d, 24), 127, dtype=np.int8)
    b[:, ::3] = -127
    b[::2, 1::3] = -127
    scale = np.linspace(0.5, 2.0, 24).astype(np.float32)
    got = session.run(None, {"a": a, "b": b, "scale": scale})[0]
    want = (a.astype(np.int64) - 64) @ b.astype(np.int64) * scale.astype(np.float64)
    assert np.allclose(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("width, block", [(30, 96), (30, 600), (1000, 128)])
def test_int8_search_equals_faiss_exact(width: int, block: int, threads: int) -> None:
    # width 30: candidates are a few per cent of the gallery, so the certificate decides (ragged
    # last block at 96 rows); width 1000 > n: every sample is a candidate, nothing to certify.
    # threads 3: the 4 query chunks run side by side
    xn = l2_normalize(_ties_free()[0])
    s8 = Int8Search(xn, gallery_block=block, width=width, rows=64, threads=threads)
    rows = np.arange(0, 600, 3)
    s, i = s8.search(xn[rows], 12)
    _same_as_faiss(xn, s, i, rows, 12)
    assert s8.searched_rows == len(rows)
    assert s8.fallback_rows < len(rows)
    if width > len(xn):
        assert s8.fallback_rows == 0


def test_int8_search_certifies_only_the_asked_depth() -> None:
    xn = l2_normalize(_ties_free()[0])
    s8 = Int8Search(xn, gallery_block=128, width=20, rows=50)
    depth = np.resize([3, 8, 15], 100)
    s, i = s8.search(xn[:100], 15, depth=depth)
    fs, fi = FlatSearch(xn).search(xn[:100], 15)
    for r, d in enumerate(depth):
        assert (i[r, :d] == fi[r, :d]).all() and np.abs(s[r, :d] - fs[r, :d]).max() < 1e-6
    assert s8.fallback_rows < 100


def test_near_ties_fall_back_to_fp32_and_stay_exact() -> None:
    x = _near_ties()
    s8 = Int8Search(x, gallery_block=64, width=40)
    s, i = s8.search(x[:4], 10)
    _same_as_faiss(x, s, i, np.arange(4), 10)
    assert s8.fallback_rows == 4  # 2e-5 apart: far inside the quantisation bound, no row can be certified


def test_the_fallback_count_and_back_end_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Int8Search, "WIDTH", 40)  # the default takes the whole of this small gallery
    x = _near_ties()
    y = np.concatenate([np.arange(4), np.repeat(np.arange(4), 120), np.arange(4, 404)]) % 50
    st = EvaluationSettings(mode="exact", backend="int8")
    int8 = evaluate_retrieval(x, y, settings=st)
    faiss = evaluate_retrieval(x, y, settings=EvaluationSettings(mode="exact", backend="faiss"))
    assert int8.metrics == pytest.approx(faiss.metrics, abs=1e-12)
    assert int8.details["backend"].startswith("int8 on cpu") and faiss.details["backend"] == "faiss on cpu"
    assert int8.details["search_fallback_rows"] >= 4 and faiss.details["search_fallback_rows"] == 0
    assert int8.evaluation()["search_fallback_rows"] == int8.details["search_fallback_rows"]  # into metrics.json


def test_int8_metrics_equal_faiss_metrics_with_the_sampled_pilot() -> None:
    x, y = _ties_free(n=3000, dim=16, classes=150)
    st = dict(mode="sampled", target_half_width=0.03, pilot_queries=300, seed=2)
    int8 = evaluate_retrieval(x, y, settings=EvaluationSettings(backend="int8", **st))
    faiss = evaluate_retrieval(x, y, settings=EvaluationSettings(backend="faiss", **st))
    assert int8.metrics == pytest.approx(faiss.metrics, abs=1e-12)
    assert int8.details["num_queries"] == faiss.details["num_queries"]


def test_auto_picks_int8_on_the_cpu_for_large_galleries_and_faiss_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    xn = l2_normalize(_ties_free(n=200)[0])
    assert isinstance(exact_searcher(xn, "auto", "cpu"), FlatSearch)  # below INT8_MIN_GALLERY
    monkeypatch.setattr(S, "INT8_MIN_GALLERY", 100)
    assert isinstance(exact_searcher(xn, "auto", "cpu"), Int8Search)
    assert isinstance(exact_searcher(xn, "faiss", "cpu"), FlatSearch)
    with pytest.raises(RetrievalError, match="runs on the CPU"):
        exact_searcher(xn, "int8", "cuda")


def test_unknown_backend_is_refused() -> None:
    x, y = _ties_free(n=50)
    with pytest.raises(RetrievalError, match="unknown search backend 'blas'"):
        retrieval_metrics(x, y, backend="blas")
