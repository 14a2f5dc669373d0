"""Retrieval metrics on a set of embeddings: Recall@K and MAP@R, leave-one-out.

Every sample queries all the others by cosine similarity. The numbers equal
pytorch-metric-learning's AccuracyCalculator (precision_at_1 is Recall@1,
mean_average_precision_at_r is MAP@R; Musgrave et al., "A Metric Learning Reality Check"),
which tests/test_retrieval.py checks. They are computed here rather than with
AccuracyCalculator because it holds every query's neighbour list (and, on its default
backend, ranks by L2) at once; here faiss exact search runs over query chunks, so memory
stays at chunk_size x k no matter how many samples there are.

Conventions (the same as PML's):
- a sample whose class has no other member cannot retrieve anything and is not a query
  (it still sits in the gallery, where it can be a wrong neighbour);
- R for a query is the number of *other* samples of its class;
- the query itself is removed from its own neighbour list; if exact ties push it out of
  the searched window, the last neighbour is dropped instead so every row keeps k columns.

Ties between equal similarities are broken by the lower sample index, so a result never
depends on faiss's internal order or on the chunk size.

Scale: exact search costs O(N^2 D); at a million 512-d embeddings that is over an hour on two
cores. Two ways out, both opt-in: `queries` scores a sample of queries against the full
gallery (an unbiased estimate of the same numbers), and `index="hnsw"` or `"ivf"` (or an
`ApproximateIndex`) searches a faiss approximate index instead, whose agreement with exact
search benchmarks/eval_recall.py reports. Approximate search has no tie rule: results can
depend on faiss's order there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class RetrievalError(ValueError):
    """Embeddings and labels that cannot give retrieval metrics (the message says why)."""


@dataclass(frozen=True)
class ApproximateIndex:
    """A faiss approximate inner-product index for large evaluation sets.

    hnsw: a graph (IndexHNSWFlat, M links per node); search widens ef_search to at least k + 1.
    ivf: k-means cells (IndexIVFFlat); nlist defaults to about 4 sqrt(N) cells, of which nprobe
    are scanned per query; trained on at most 256 points per cell.
    """

    kind: str
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    nlist: int | None = None
    nprobe: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("hnsw", "ivf"):
            raise RetrievalError(f"unknown index kind {self.kind!r}; use 'exact', 'hnsw' or 'ivf'")


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Unit rows as a new float32 array; all-zero rows stay zero instead of becoming NaN."""
    x = np.array(embeddings, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int = 2048,
    *,
    index: str | ApproximateIndex = "exact",
    queries: Sequence[int] | np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@K for each K, MAP@R, and the counts they are averaged over.

    Returns {"recall_at_<K>": ..., "map_at_r": ..., "num_queries": int, "num_classes": int};
    num_classes counts the classes that have queries (two or more samples).

    index: "exact" (default), or "hnsw"/"ivf"/an ApproximateIndex for large sets.
    queries: indices of the samples to use as queries (default: all); every sample stays in
    the gallery. Samples without a same-class partner are left out as usual.
    """
    import faiss  # imported here: the metric module is also loaded by light-weight callers

    x, y = _check_inputs(embeddings, labels, ks, chunk_size)
    n = len(x)
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    others = counts[inverse] - 1  # R of every sample
    approx = _approximate(index)
    if queries is None:
        queries = np.flatnonzero(others > 0)
    else:
        queries = np.unique(np.asarray(queries, dtype=np.int64))
        if len(queries) and (queries[0] < 0 or queries[-1] >= n):
            raise RetrievalError(f"query indices must be in [0, {n}), got {queries[0]}..{queries[-1]}")
        queries = queries[others[queries] > 0]
        if len(queries) == 0 and (others > 0).any():
            raise RetrievalError("none of the given query indices has another sample of its class in the gallery")
    if len(queries) == 0:
        raise RetrievalError(
            f"no class has two or more samples (of {n} samples, {len(counts)} classes); "
            "retrieval needs at least one pair of the same class"
        )
    # the window must hold every same-class neighbour (MAP@R) and the largest K; +1 for self
    k = min(n - 1, max(max(ks), int(others.max())))

    if approx is None:
        search = faiss.IndexFlatIP(x.shape[1])
        search.add(x)
    else:
        search = build_approximate_index(x, approx, k)

    hits_at = {kk: 0 for kk in ks}
    ap = np.empty(len(queries), dtype=np.float64)  # kept per query: sums then match across chunk sizes
    for start in range(0, len(queries), chunk_size):
        q = queries[start : start + chunk_size]
        if approx is None:
            neighbours = _neighbours(search, x, q, k)
            relevant = y[neighbours] == y[q][:, None]  # (chunk, k)
        else:
            neighbours = _approximate_neighbours(search, x, q, k)
            relevant = (neighbours >= 0) & (y[neighbours] == y[q][:, None])  # -1: fewer than k found
        for kk in ks:
            hits_at[kk] += int(relevant[:, :kk].any(axis=1).sum())
        ap[start : start + len(q)] = _average_precision_at_r(relevant, others[q])

    out: dict[str, float] = {f"recall_at_{kk}": hits_at[kk] / len(queries) for kk in ks}
    out["map_at_r"] = float(ap.mean())
    out["num_queries"] = int(len(queries))
    out["num_classes"] = int((counts > 1).sum())
    return out


def _approximate(index: str | ApproximateIndex) -> ApproximateIndex | None:
    if isinstance(index, ApproximateIndex):
        return index
    if index == "exact":
        return None
    return ApproximateIndex(kind=index)


def build_approximate_index(x: np.ndarray, spec: ApproximateIndex, k: int = 0) -> object:
    """A faiss inner-product index over the (unit) rows of x, built as `spec` says.

    k: the number of neighbours that will be asked for; HNSW's ef_search is raised to k + 1.
    """
    import faiss

    n, d = x.shape
    if spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        index.hnsw.efSearch = max(spec.ef_search, k + 1)
        index.add(x)
        return index
    nlist = spec.nlist or int(round(4 * np.sqrt(n)))
    nlist = max(1, min(nlist, n // 39 or 1))  # faiss wants >= 39 training points per cell
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(spec.seed)
    train = x if n <= 256 * nlist else x[np.sort(rng.choice(n, 256 * nlist, replace=False))]
    index.train(train)
    index.add(x)
    index.nprobe = min(spec.nprobe, nlist)
    return index


def _approximate_neighbours(index: object, x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """The k best other samples an approximate index returns (-1 where it found fewer)."""
    n = len(x)
    width = min(n, k + 1)
    _, idx = index.search(x[q], width)
    is_self = idx == q[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True  # self not returned: drop the last column instead
    out = idx[~is_self].reshape(len(q), width - 1)
    if out.shape[1] < k:  # n - 1 < k cannot happen (k <= n - 1), kept for safety
        out = np.pad(out, ((0, 0), (0, k - out.shape[1])), constant_values=-1)
    return out


def _check_inputs(
    embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int], chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    emb = np.asarray(embeddings)
    y = np.asarray(labels)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise RetrievalError(f"embeddings must be a non-empty (N, D) array, got shape {emb.shape}")
    if y.ndim != 1 or len(y) != len(emb):
        raise RetrievalError(f"labels must be a 1-D array of {len(emb)} labels, got shape {y.shape}")
    if not np.isfinite(emb).all():
        bad = int(np.flatnonzero(~np.isfinite(emb).all(axis=1))[0])
        raise RetrievalError(f"embedding {bad} holds NaN or inf")
    if not ks or any(int(k) < 1 for k in ks):
        raise RetrievalError(f"ks must be positive integers, got {list(ks)}")
    if chunk_size < 1:
        raise RetrievalError(f"chunk_size must be positive, got {chunk_size}")
    return l2_normalize(emb), y


def _neighbours(index: object, x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k nearest other samples of each query, ties by lower index."""
    n = len(x)
    # one column beyond the k+1 needed shows whether the last needed score is tied with
    # samples faiss left out of the window (faiss orders and cuts equal scores arbitrarily)
    width = min(n, k + 2)
    scores, idx = index.search(x[q], width)
    order = np.lexsort((idx, -scores), axis=1)
    top = np.take_along_axis(idx, order, axis=1)[:, : k + 1]
    if width < n:
        cut = np.flatnonzero(scores[:, k] <= scores[:, width - 1])
        if len(cut):
            top[cut] = _exact_top(x, q[cut], k + 1)
    is_self = top == q[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True  # self tied out of the window: drop the last column instead
    return top[~is_self].reshape(len(q), k)


def _exact_top(x: np.ndarray, q: np.ndarray, m: int, budget: int = 1 << 23) -> np.ndarray:
    """Top m by (-score, index) against every sample, for the rows whose ties faiss cut.

    Hand-written because faiss has no tie rule; rare outside duplicate images or a collapsed
    model, and memory stays at `budget` scores per block.
    """
    n = len(x)
    out = np.empty((len(q), m), dtype=np.int64)
    rows = max(1, budget // n)
    for b in range(0, len(q), rows):
        s = x[q[b : b + rows]] @ x.T  # (B, n)
        threshold = np.partition(s, n - m, axis=1)[:, n - m][:, None]  # the m-th largest
        above = s > threshold
        need = m - above.sum(axis=1, keepdims=True)
        equal = s == threshold
        chosen = above | (equal & (np.cumsum(equal, axis=1) <= need))
        idx = np.nonzero(chosen)[1].reshape(-1, m)  # row-major: ascending index per row
        val = np.take_along_axis(s, idx, axis=1)
        order = np.lexsort((idx, -val), axis=1)
        out[b : b + rows] = np.take_along_axis(idx, order, axis=1)
    return out


def _average_precision_at_r(relevant: np.ndarray, r: np.ndarray) -> np.ndarray:
    """AP@R per row: mean over the first R ranks of (precision at rank i if rank i is relevant)."""
    ranks = np.arange(1, relevant.shape[1] + 1)
    hit = relevant & (ranks[None, :] <= r[:, None])
    precision = np.cumsum(hit, axis=1) / ranks[None, :]
    return (precision * hit).sum(axis=1) / r
