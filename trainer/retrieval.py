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

Scale: exact search costs O(N^2 D); at a million 512-d embeddings that is hours on two
cores. `evaluate_retrieval` (what the evaluate step calls) therefore evaluates every query only
up to a size threshold; above it, it searches a seeded random sample of queries exactly against
the full gallery, sized from a pilot so Recall@1's 95% interval is at most 0.005 wide each side,
and reports every metric with its 95% interval (Wilson for Recall@K, normal for MAP@R,
finite-population corrected) and what it did. Each sampled query's result is the exact one, so
the only uncertainty is which queries were drawn, and the interval covers it.

The search itself lives in trainer.search. Its exact back ends all give the same neighbours:
faiss brute force (no copy of the gallery; faiss GPU where installed), int8 candidates re-ranked
in fp32 (the CPU path for large galleries) and torch fp16 candidates re-ranked in fp32 (the
CUDA path); the reduced-precision ones are exact by a certificate (see trainer.search).
`index="hnsw"` or `"ivf"` (or an `ApproximateIndex`) searches a faiss approximate index
instead, opt-in only: benchmarks/eval_recall.py measured its agreement with exact search as
poor at scale. Approximate search has no tie rule: results can depend on faiss's order there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imlt.trainer.search import (
    ApproximateIndex,
    RetrievalError,
    approximate_neighbours,
    approximate_spec,
    build_approximate_index,
    exact_searcher,
    neighbours,
)

__all__ = ["ApproximateIndex", "EvaluationSettings", "PerQuery", "RetrievalError", "RetrievalReport", "evaluate_retrieval",
           "l2_normalize", "mean_interval", "per_query_metrics", "required_sample_size", "retrieval_metrics",
           "wilson_interval"]


def l2_normalize(embeddings: np.ndarray, copy: bool = True) -> np.ndarray:
    """Unit rows as float32; all-zero rows stay zero instead of becoming NaN.

    copy=False returns float32 C-contiguous input whose rows already have unit length
    (within 1e-6) as it is: a model's normalised 1M x 512 output is not duplicated (2 GiB).
    """
    if not copy and _is_unit(embeddings):
        return embeddings
    x = np.array(embeddings, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _is_unit(x: np.ndarray, block: int = 65536) -> bool:
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous):
        return False
    return all(bool(np.all(np.abs(np.einsum("ij,ij->i", x[b : b + block], x[b : b + block]) - 1) < 2e-6))
               for b in range(0, len(x), block))


def retrieval_metrics(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 2, 4, 8), **search: Any) -> dict[str, float]:
    """Recall@K for each K, MAP@R, and the counts they are averaged over (the means of per_query_metrics).

    Returns {"recall_at_<K>": ..., "map_at_r": ..., "num_queries": int, "num_classes": int};
    num_classes counts the classes that have queries (two or more samples). `search`: the
    keywords of per_query_metrics (chunk_size, index, queries, backend); faiss searches on the CPU.
    """
    search.setdefault("device", "cpu" if search.get("backend", "faiss") == "faiss" else "auto")
    return per_query_metrics(embeddings, labels, ks, **search).summary()


@dataclass(frozen=True)
class PerQuery:
    """Each query's outcome: the metrics are means of these, and their intervals come from them."""

    ks: tuple[int, ...]
    queries: np.ndarray  # sample indices
    hits: np.ndarray  # (num_queries, len(ks)) bool: a same-class sample among the first K
    ap: np.ndarray  # (num_queries,) AP@R
    num_classes: int
    search: dict[str, Any] = field(default_factory=dict)  # back end, rows searched, rows that fell back to fp32

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {f"recall_at_{k}": int(self.hits[:, i].sum()) / len(self.queries) for i, k in enumerate(self.ks)}
        out["map_at_r"] = float(self.ap.mean())
        out["num_queries"] = int(len(self.queries))
        out["num_classes"] = self.num_classes
        return out


def per_query_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int = 2048,
    *,
    index: str | ApproximateIndex = "exact",
    queries: Sequence[int] | np.ndarray | None = None,
    backend: str = "faiss",
    device: str = "auto",
    copy: bool = True,
    reuse: dict[str, Any] | None = None,
) -> PerQuery:
    """Each query's hit flags and AP@R (retrieval_metrics are their means; intervals come from them).

    index: "exact" (default), or "hnsw"/"ivf"/an ApproximateIndex for large sets.
    queries: indices of the samples to use as queries (default: all); every sample stays in
    the gallery. Samples without a same-class partner are left out as usual.
    backend: exact search by "faiss" (CPU, or faiss GPU where installed), "int8" (CPU: int8
    candidates, exact fp32 re-ranking), "torch" (fp16 candidates, exact fp32 re-ranking; the
    GPU path) or "auto" (see trainer.search.exact_searcher).
    copy=False: unit-length float32 rows are searched in place rather than normalised into a copy.
    reuse: a dict in which the exact searcher is kept for the next call on the same array (with
    copy=False; the int8 back end quantises the gallery once, seconds at 1M).
    """
    x, y = _check_inputs(embeddings, labels, ks, chunk_size, copy=copy)
    ks = tuple(int(k) for k in ks)
    n = len(x)
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    others = counts[inverse] - 1  # R of every sample
    approx = approximate_spec(index)
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
    k = min(n - 1, max(max(ks), int(others[queries].max())))

    # the columns a query uses: its R (MAP@R) and the largest K; searchers may certify only these
    depth = np.minimum(k, np.maximum(max(ks), others))
    if approx is None:
        kept = reuse.get("searcher") if reuse is not None and reuse.get("key") == (id(x), backend, device) else None
        search = kept or exact_searcher(x, backend, device)
        if reuse is not None:
            reuse.update(key=(id(x), backend, device), searcher=search, x=x)  # x kept alive: its id stays unique
    else:
        search = build_approximate_index(x, approx, k)

    fallback_before = int(getattr(search, "fallback_rows", 0))
    hits = np.empty((len(queries), len(ks)), dtype=bool)
    ap = np.empty(len(queries), dtype=np.float64)  # kept per query: sums then match across chunk sizes
    for start in range(0, len(queries), chunk_size):
        q = queries[start : start + chunk_size]
        if approx is None:
            found = neighbours(search, x, q, k, depth[q])
            relevant = y[found] == y[q][:, None]  # (chunk, k)
        else:
            found = approximate_neighbours(search, x, q, k)
            relevant = (found >= 0) & (y[found] == y[q][:, None])  # -1: fewer than k found
        for i, kk in enumerate(ks):
            hits[start : start + len(q), i] = relevant[:, :kk].any(axis=1)
        ap[start : start + len(q)] = _average_precision_at_r(relevant, others[q])
    info = {"backend": getattr(search, "description", type(search).__name__), "rows": int(len(queries)),
            "fallback_rows": int(getattr(search, "fallback_rows", 0)) - fallback_before}
    return PerQuery(ks=ks, queries=queries, hits=hits, ap=ap, num_classes=int((counts > 1).sum()), search=info)


def _check_inputs(
    embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int], chunk_size: int, copy: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    emb = np.asarray(embeddings)
    y = np.asarray(labels)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise RetrievalError(f"embeddings must be a non-empty (N, D) array, got shape {emb.shape}")
    if y.ndim != 1 or len(y) != len(emb):
        raise RetrievalError(f"labels must be a 1-D array of {len(emb)} labels, got shape {y.shape}")
    for b in range(0, len(emb), 65536):  # in blocks: one bool per element of a 1M x 512 set is 512 MB
        finite = np.isfinite(emb[b : b + 65536]).all(axis=1)
        if not finite.all():
            raise RetrievalError(f"embedding {b + int(np.flatnonzero(~finite)[0])} holds NaN or inf")
    if not ks or any(int(k) < 1 for k in ks):
        raise RetrievalError(f"ks must be positive integers, got {list(ks)}")
    if chunk_size < 1:
        raise RetrievalError(f"chunk_size must be positive, got {chunk_size}")
    return l2_normalize(emb, copy=copy), y


def _average_precision_at_r(relevant: np.ndarray, r: np.ndarray) -> np.ndarray:
    """AP@R per row: mean over the first R ranks of (precision at rank i if rank i is relevant)."""
    ranks = np.arange(1, relevant.shape[1] + 1)
    hit = relevant & (ranks[None, :] <= r[:, None])
    precision = np.cumsum(hit, axis=1) / ranks[None, :]
    return (precision * hit).sum(axis=1) / r


# --- evaluation by size: exact, or exact search for a random sample of queries ------------------------

Z95 = 1.959963984540054  # two-sided 95% normal quantile
INTERVALS = ("Recall@K: Wilson score interval; MAP@R: normal (CLT) interval on the mean AP@R; "
             "both with the finite-population correction for sampling queries without replacement")


@dataclass(frozen=True)
class EvaluationSettings:
    """How to evaluate a set of embeddings (mirrors trainer.steps.EvaluateInput's fields).

    mode: "auto" (exact up to exact_max_samples samples, sampled above), "exact" or "sampled".
    sample_queries: fixed number of sampled queries; None sizes the sample from a pilot of
    pilot_queries so Recall@1's 95% interval half-width is at most target_half_width.
    """

    mode: str = "auto"
    exact_max_samples: int = 100_000
    sample_queries: int | None = None
    target_half_width: float = 0.005
    pilot_queries: int = 2000
    seed: int = 0
    backend: str = "auto"
    device: str = "auto"
    chunk_size: int = 2048

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "exact", "sampled"):
            raise RetrievalError(f"unknown evaluation mode {self.mode!r}; use 'auto', 'exact' or 'sampled'")
        if self.sample_queries is not None and self.sample_queries < 1:
            raise RetrievalError(f"sample_queries must be positive, got {self.sample_queries}")
        if not 0 < self.target_half_width < 0.5:
            raise RetrievalError(f"target_half_width must be in (0, 0.5), got {self.target_half_width}")


@dataclass(frozen=True)
class RetrievalReport:
    """Metrics, their 95% intervals, and what was done to get them."""

    metrics: dict[str, float]  # point estimates and counts, as retrieval_metrics returns them
    intervals: dict[str, tuple[float, float]]  # 95% interval per metric; (v, v) when exact over every query
    method: str  # "exact" or "sampled"
    details: dict[str, Any]

    @property
    def exact(self) -> bool:
        return self.method == "exact"

    def half_widths(self) -> dict[str, float]:
        return {m: float(hi - lo) / 2 for m, (lo, hi) in self.intervals.items()}

    def flat(self) -> dict[str, float]:
        """The numbers for metrics.json / KFP: metrics plus <metric>_ci95_half_width."""
        return {**self.metrics, **{f"{m}_ci95_half_width": h for m, h in self.half_widths().items()}}

    def evaluation(self) -> dict[str, Any]:
        """The record of the method for metrics.json and the model card."""
        return {
            "method": self.method,
            "exact": self.exact,
            "confidence": 0.95,
            "intervals": {m: [lo, hi] for m, (lo, hi) in self.intervals.items()},
            **self.details,
        }


def evaluate_retrieval(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8),
    settings: EvaluationSettings | None = None,
    *,
    copy: bool = True,
) -> RetrievalReport:
    """Recall@K and MAP@R with 95% intervals, exact or on a random sample of queries by size.

    Sampled: each sampled query is searched exactly against the full gallery, so its hit flags
    and AP@R are the exact ones and their sample means are unbiased estimates of the full
    leave-one-out metrics; the interval is the sampling uncertainty only. The pilot queries are
    the first of the same random permutation, so none is wasted. A sample as large as the set
    of queries falls back to exact evaluation (and says so in details["note"]).
    """
    import time

    st = settings or EvaluationSettings()
    y = np.asarray(labels)
    if y.ndim == 1 and len(y) and len(np.unique(y)) == 1:
        raise RetrievalError(
            f"all {len(y)} samples have one label: every neighbour is relevant, so Recall@K and MAP@R "
            "would be 1 by construction; evaluate on a set with two or more classes")
    n = len(y)
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True) if y.ndim == 1 else (None, None, None)
    eligible = np.flatnonzero(counts[inverse] > 1) if counts is not None else np.arange(0)
    details: dict[str, Any] = {"num_samples": int(n), "num_eligible_queries": int(len(eligible)),
                               "backend": None, "search": "exact inner product on unit rows (fp32 scores)"}
    started = time.perf_counter()

    reuse: dict[str, Any] = {}  # the pilot's searcher serves the rest of the sample

    def run(queries: np.ndarray | None) -> PerQuery:
        return per_query_metrics(embeddings, labels, ks, st.chunk_size, queries=queries,
                                 backend=st.backend, device=st.device, copy=copy, reuse=reuse)

    sampled = st.mode == "sampled" or (st.mode == "auto" and n > st.exact_max_samples)
    if not sampled or len(eligible) == 0:
        per = run(None)  # raises the clear errors on bad input
        return _report(per, None, details, started, st)
    perm = np.random.default_rng(st.seed).permutation(eligible)
    details.update({"sample_seed": st.seed, "sampling": "uniform without replacement over the samples that have a same-class partner"})
    if st.sample_queries is not None:
        size = st.sample_queries
        details["sample_size"] = f"fixed at {size}"
    else:
        pilot = run(np.sort(perm[: st.pilot_queries]))
        size = required_sample_size(pilot, len(eligible), st.target_half_width)
        details["sample_size"] = (f"sized from a pilot of {len(pilot.queries)} queries for a Recall@1 95% half-width "
                                  f"<= {st.target_half_width}")
        details["target_half_width"] = st.target_half_width
        if size <= len(pilot.queries):
            return _report(pilot, len(eligible), details, started, st)
    if size >= len(eligible):
        details["note"] = (f"a sample of {size} queries would cover all {len(eligible)} queries: "
                           "evaluated every query exactly instead")
        return _report(run(None), None, details, started, st)
    if st.sample_queries is not None:
        return _report(run(np.sort(perm[:size])), len(eligible), details, started, st)
    rest = run(np.sort(perm[len(pilot.queries) : size]))  # the pilot's queries are not searched twice
    both = PerQuery(ks=pilot.ks, queries=np.concatenate([pilot.queries, rest.queries]),
                    hits=np.concatenate([pilot.hits, rest.hits]), ap=np.concatenate([pilot.ap, rest.ap]),
                    num_classes=rest.num_classes,
                    search={**rest.search, "rows": pilot.search["rows"] + rest.search["rows"],
                            "fallback_rows": pilot.search["fallback_rows"] + rest.search["fallback_rows"]})
    return _report(both, len(eligible), details, started, st)


def required_sample_size(pilot: PerQuery, population: int, half_width: float) -> int:
    """Queries needed for Recall@1's 95% half-width, from a pilot (conservative end of its interval)."""
    i = pilot.ks.index(1) if 1 in pilot.ks else 0
    lo, hi = wilson_interval(int(pilot.hits[:, i].sum()), len(pilot.queries), population)
    p = min(max(0.5, lo), hi) if lo <= 0.5 <= hi else (hi if hi < 0.5 else lo)  # the end nearest 0.5
    n0 = Z95**2 * p * (1 - p) / half_width**2
    n = n0 / (1 + (n0 - 1) / population)  # finite population
    return int(np.ceil(n * 1.02))  # 2% over: Wilson is a little wider than the normal formula


def wilson_interval(hits: int, n: int, population: int | None = None) -> tuple[float, float]:
    """95% Wilson score interval of a proportion; population: finite-population correction."""
    if n == 0:
        return 0.0, 1.0
    if population is not None and n >= population:
        p = hits / n
        return p, p
    n_eff = n if population is None else n * (population - 1) / (population - n)
    p = hits / n
    z2 = Z95**2
    centre = (p + z2 / (2 * n_eff)) / (1 + z2 / n_eff)
    half = Z95 / (1 + z2 / n_eff) * np.sqrt(p * (1 - p) / n_eff + z2 / (4 * n_eff**2))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def mean_interval(values: np.ndarray, population: int | None = None) -> tuple[float, float]:
    """95% normal (CLT) interval of a mean of values in [0, 1]; population: finite-population correction."""
    n = len(values)
    m = float(values.mean())
    if n < 2 or (population is not None and n >= population):
        return (m, m) if population is not None and n >= population else (0.0, 1.0)
    se = float(values.std(ddof=1)) / np.sqrt(n)
    if population is not None:
        se *= np.sqrt((population - n) / (population - 1))
    return float(max(0.0, m - Z95 * se)), float(min(1.0, m + Z95 * se))


def _report(per: PerQuery, population: int | None, details: dict[str, Any], started: float,
            st: EvaluationSettings) -> RetrievalReport:
    import time

    metrics = per.summary()
    if population is None:  # every query: the metrics are exact, nothing to estimate
        intervals = {m: (metrics[m], metrics[m]) for m in [f"recall_at_{k}" for k in per.ks] + ["map_at_r"]}
        method = "exact"
        details["interval_method"] = "none needed: every query was evaluated (half-width 0)"
    else:
        intervals = {f"recall_at_{k}": wilson_interval(int(per.hits[:, i].sum()), len(per.queries), population)
                     for i, k in enumerate(per.ks)}
        intervals["map_at_r"] = mean_interval(per.ap, population)
        method = "sampled"
        details["interval_method"] = INTERVALS
    details["num_queries"] = int(len(per.queries))
    details["backend"] = per.search.get("backend")
    details["search_fallback_rows"] = per.search.get("fallback_rows", 0)
    details["seconds"] = round(time.perf_counter() - started, 3)
    return RetrievalReport(metrics=metrics, intervals=intervals, method=method, details=details)
