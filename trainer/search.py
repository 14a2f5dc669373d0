"""Exact and approximate inner-product search over unit embeddings: the back ends of trainer.retrieval.

Every exact back end returns the same neighbours (ties aside, which `neighbours` resolves by
the lower sample index): tests compare each with faiss brute force within 1e-6.

- FlatSearch: faiss brute force without an index (no copy of the gallery); faiss GPU where installed.
- TorchSearch: chunked matmul + topk with fp16 candidates re-ranked in fp32 (the CUDA path).
- Int8Search: int8 candidates from an integer GEMM (onnxruntime), re-ranked in fp32 (the CPU
  path for large galleries: 0.81x faiss's CPU time at 1M x 512; query chunks on every CPU).

The reduced-precision back ends are exact by a certificate: a row's candidates are re-ranked in
fp32 and the row is kept only if its k-th exact score provably beats every sample that was not
a candidate; other rows are searched again in fp32. `fallback_rows` counts those.

Approximate search (`ApproximateIndex`, `build_approximate_index`: faiss HNSW or IVF) is
opt-in only: benchmarks/eval_recall.py measured its agreement with exact search as poor at
scale, and it has no tie rule.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from imlt.trainer.config import SEARCH_BACKENDS
from imlt.trainer.device import available_cpus

if TYPE_CHECKING:
    import torch

class RetrievalError(ValueError):
    """Embeddings and labels that cannot give retrieval metrics (the message says why)."""


# --- approximate search (opt-in) --------------------------------------------------------------------


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


def approximate_spec(index: str | ApproximateIndex) -> ApproximateIndex | None:
    """None for "exact", else the ApproximateIndex that `index` names."""
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


def approximate_neighbours(index: object, x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
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


# --- exact search back ends -------------------------------------------------------------------------


# auto picks Int8Search on the CPU from this gallery size on. Measured (benchmarks.eval_scale, same
# queries, 2 idle cores): at 100k x 512 faiss took 0.6x int8's CPU time and a quarter of its extra
# memory; at 1M int8 took 0.81x faiss's. Between the two the crossover was not measured.
INT8_MIN_GALLERY = 500_000


def exact_searcher(x: np.ndarray, backend: str = "auto", device: str = "auto") -> "FlatSearch | TorchSearch | Int8Search":
    """An exact inner-product searcher over the rows of x (not copied), chosen by what is available.

    auto: torch on a CUDA device when torch sees one (faiss GPU instead when faiss has GPUs);
    on the CPU, Int8Search from INT8_MIN_GALLERY rows on (0.81x faiss's CPU seconds at 1M,
    benchmarks/eval_scale.py), faiss below. "faiss", "int8" or "torch" force a back end. Every
    back end returns the same neighbours (tests check them against faiss within 1e-6); only
    speed differs.
    """
    if backend not in SEARCH_BACKENDS:
        raise RetrievalError(f"unknown search backend {backend!r}; use {', '.join(repr(b) for b in SEARCH_BACKENDS)}")
    backend, device = resolve_backend(backend, device, len(x))
    if backend == "faiss":
        return FlatSearch(x, gpu=device.startswith("cuda") and _faiss_gpus() > 0)
    if backend == "int8":
        if device != "cpu":
            raise RetrievalError(f"the int8 search back end runs on the CPU, not {device!r}")
        return Int8Search(x)
    return TorchSearch(x, device=device)


def resolve_backend(backend: str, device: str, n: int) -> tuple[str, str]:
    """The (backend, device) that "auto" stands for with a gallery of n rows."""
    if backend == "auto" or device == "auto":
        cuda = _cuda_available() if device == "auto" or device.startswith("cuda") else False
        if device == "auto":
            device = "cuda" if cuda and backend != "int8" else "cpu"
        if backend == "auto":
            if device.startswith("cuda"):
                backend = "faiss" if _faiss_gpus() > 0 else "torch"
            else:
                backend = "int8" if n >= INT8_MIN_GALLERY else "faiss"
    return backend, device


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def _faiss_gpus() -> int:
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


class FlatSearch:
    """faiss brute force over x without building an index: an IndexFlatIP would copy x (2 GiB at 1M x 512)."""

    def __init__(self, x: np.ndarray, gpu: bool = False) -> None:
        self.x = x
        self.gpu = gpu
        self.name = "faiss-gpu" if gpu else "faiss"
        self.description = "faiss on cuda" if gpu else "faiss on cpu"
        self._res = None

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        xq = np.ascontiguousarray(xq, dtype=np.float32)
        if self.gpu:  # pragma: no cover - needs a GPU build of faiss
            if self._res is None:
                self._res = faiss.StandardGpuResources()
            return faiss.knn_gpu(self._res, xq, self.x, k, metric=faiss.METRIC_INNER_PRODUCT)
        return faiss.knn(xq, self.x, k, metric=faiss.METRIC_INNER_PRODUCT)


class TorchSearch:
    """Chunked matmul + topk: candidates in reduced precision, then exact fp32 re-ranking.

    Why hand-written: faiss has no CPU-free GPU build on pip, and a GPU evaluates a chunk of
    queries against the whole gallery with one fp16 matmul and one topk. fp16 scores of unit
    vectors are within `slack` of the fp32 ones (input rounding 2 x 2^-11, output rounding
    2^-11, fp32 accumulation), so after re-ranking the `k + margin` fp16 candidates in fp32,
    a row whose k-th exact score beats the last candidate's fp16 score by more than `slack` is
    provably the exact top k. Other rows are searched again in fp32. The result equals exact
    fp32 search; the CPU runs the same code (tests compare it with faiss), only slower.
    """

    def __init__(self, x: np.ndarray, device: str = "cpu", low: str = "float16", gallery_block: int = 1 << 16,
                 slack: float = 4e-3) -> None:
        import torch

        self.device = torch.device(device)
        self.name = f"torch-{self.device.type}-{low}"
        self.description = f"torch on {self.device.type} ({'fp16' if low == 'float16' else low} candidates, exact fp32 re-ranking)"
        self.x = torch.from_numpy(x)  # shares memory
        self.low = getattr(torch, low)
        self.gallery = self.x.to(self.device, self.low)  # the only copy: half the size of x in fp16
        self.full = self.x.to(self.device) if self.device.type != "cpu" else self.x
        self.block = gallery_block
        self.slack = slack
        self.fallback_rows = 0  # rows the certificate sent back to fp32 search (reported by benchmarks)

    def search(self, xq: np.ndarray, k: int, rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
        parts = [self._search(xq[b : b + rows], k) for b in range(0, len(xq), rows)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        n = self.gallery.shape[0]
        k = min(k, n)
        width = min(n, k + max(16, k // 2))  # candidates kept before re-ranking
        q = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32)).to(self.device)
        with _fp32_reductions():
            cand_s, cand_i = self._topk(q.to(self.low), width, low=True)
        exact = torch.einsum("qd,qcd->qc", q, self.full[cand_i])  # fp32 re-ranking of the candidates
        top_s, order = exact.topk(k, dim=1)
        top_i = torch.gather(cand_i, 1, order)
        if width < n:
            bad = top_s[:, -1] <= cand_s[:, -1].float() + self.slack
            if bool(bad.any()):
                rows = torch.nonzero(bad).squeeze(1)
                self.fallback_rows += len(rows)
                s2, i2 = self._topk(q[rows], k, low=False)
                top_s[rows], top_i[rows] = s2, i2
        return top_s.cpu().numpy(), top_i.cpu().numpy()

    def _topk(self, q: "torch.Tensor", k: int, low: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Top k over the gallery, in gallery blocks so the score matrix stays chunk x block."""
        import torch

        g = self.gallery if low else self.full
        best_s = best_i = None
        for b in range(0, g.shape[0], self.block):
            s = q @ g[b : b + self.block].T
            kk = min(k, s.shape[1])
            s, i = s.topk(kk, dim=1)
            i += b
            if best_s is None:
                best_s, best_i = s, i
            else:
                s = torch.cat([best_s, s], dim=1)
                i = torch.cat([best_i, i], dim=1)
                best_s, pos = s.topk(min(k, s.shape[1]), dim=1)
                best_i = torch.gather(i, 1, pos)
        return best_s, best_i


class _fp32_reductions:
    """Keep cuBLAS from summing fp16 products in fp16 (the slack above assumes fp32 sums)."""

    def __enter__(self) -> None:
        import torch

        self.saved = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = self.saved


class Int8Search:
    """Exact search on the CPU: int8 candidates from an integer GEMM, then exact fp32 re-ranking.

    The gallery is quantised once, per row and symmetric (g ~ s_g * G, G in [-127, 127]), and
    kept transposed in blocks of `gallery_block` rows: one int8 copy, a quarter of x. A chunk
    of queries is quantised per row to [-64, 64] (q ~ s_q * Q) and scored against each block
    by one integer GEMM; the `width` best approximate scores per row are kept as candidates
    and re-ranked with exact fp32 dot products.

    Certificate. With e_q = q - s_q Q and e_g = g - s_g G (any rows, unit or not),
        |q.g - s_q s_g Q.G| <= ||e_q|| ||g|| + ||s_q Q|| ||e_g|| <= ||e_q|| max||g|| + ||s_q Q|| max||e_g|| = bound
    (Cauchy-Schwarz on q.g - q~.g~ = e_q.g + q~.e_g), plus fp32 rounding (`_ROUNDING`). Every
    sample that is not a candidate scored at most t, the row's threshold (see _candidates), so
    its exact score is at most t + bound. A row whose depth-th exact candidate score exceeds
    t + bound therefore holds the exact top `depth`; any other row is searched again in fp32
    by brute force (`fallback_rows` counts them). `depth` lets a caller that needs only a row's first
    few neighbours exact (evaluation needs max(K, R) per query, not the largest R of all
    queries) certify just those: the bound is loose (it assumes the worst direction of the
    errors), so certifying 100 neighbours at 1M needs far more candidates than certifying 20.

    Why onnxruntime's MatMulIntegerToFloat: it is the CPU int8 GEMM of a library the project
    already depends on (ONNX export) and is kept up for quantised inference (MLAS kernels; the
    op is what onnxruntime's own dynamic quantisation produces). Measured on a 2-core AVX2 EPYC,
    1024 x 512 @ 512 x 65536: 2.2-2.4x faster than torch fp32 matmul, with the per-column
    gallery scale applied in the GEMM's output stage (no extra pass). The alternatives were
    slower or unmaintained: torch._int_mm is 45x slower on CPU, torch.ao dynamic quantisation
    is deprecated, numpy has no integer BLAS. On AVX2 without VNNI the u8 x s8 kernel adds
    pairs of products in saturating int16 (VPMADDUBSW); queries in [0, 128] (zero point 64)
    against gallery values in [-127, 127] keep every pair within 2 * 128 * 127 = 32512, so the
    integer products are exact (tests check the extremes against numpy).
    """

    name = "int8"
    description = "int8 on cpu (int8 candidates by onnxruntime, exact fp32 re-ranking)"
    QUERY_LEVELS = 64  # queries in [-64, 64], stored as uint8 + 64: no int16 saturation (see above)
    GALLERY_LEVELS = 127

    WIDTH = 1024  # candidates per query: at 1M x 512, 0.3% of the queries then fall back (RESULTS.md, eval_scale)

    def __init__(self, x: np.ndarray, gallery_block: int = 16384, width: int | None = None, rows: int = 256,
                 threads: int | None = None) -> None:
        if x.dtype != np.float32 or x.ndim != 2:
            raise RetrievalError(f"Int8Search needs a float32 (N, D) array, got {x.dtype} {x.shape}")
        self.x = x
        self.n, self.d = x.shape
        self.block = max(8, gallery_block // 8 * 8)
        self.width = width or self.WIDTH
        self.rows = rows
        self.blocks: list[np.ndarray] = []  # (D, block) int8, C-contiguous: the GEMM's right operand
        self.scales = np.empty(self.n, dtype=np.float32)
        gallery_error = gallery_norm = 0.0
        for b in range(0, self.n, self.block):
            g = x[b : b + self.block]
            q, s, err = _quantise(g, self.GALLERY_LEVELS)
            self.blocks.append(np.ascontiguousarray(q.T))
            self.scales[b : b + len(g)] = s
            gallery_error = max(gallery_error, float(err.max()))
            gallery_norm = max(gallery_norm, float(np.sqrt(np.einsum("ij,ij->i", g, g, dtype=np.float64).max())))
        self.gallery_error = gallery_error  # max ||g - s_g G|| over the gallery
        self.gallery_norm = gallery_norm  # max ||g||: 1 for unit rows
        self._session = _int8_matmul()  # single-threaded, see search()
        self.threads = max(1, int(available_cpus())) if threads is None else threads
        self.searched_rows = 0
        self.fallback_rows = 0  # rows the certificate sent back to fp32 search

    def search(self, xq: np.ndarray, k: int, depth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top k per row (scores descending); depth: rows need only their first depth[i] exact."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        k = min(k, self.n)
        need = np.full(len(xq), k) if depth is None else np.clip(np.asarray(depth), 1, k)
        scores = np.empty((len(xq), k), dtype=np.float32)
        idx = np.empty((len(xq), k), dtype=np.int64)
        starts = range(0, len(xq), self.rows)

        def one(b: int) -> np.ndarray:
            rows = slice(b, b + self.rows)
            scores[rows], idx[rows], uncertified = self._search(xq[rows], k, need[rows])
            return uncertified + b

        # Chunks run side by side, one single-threaded GEMM each, on as many threads as this process
        # has CPUs (affinity and cgroup limit): onnxruntime and numpy's heavy calls release the GIL,
        # and independent chunks share no barrier. A thread pool inside each GEMM instead left
        # threads spinning at every barrier for a descheduled partner on the shared 2-core machine.
        workers = min(self.threads, len(starts))
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                bad = np.concatenate(list(pool.map(one, starts)))
        else:
            bad = np.concatenate([one(b) for b in starts])
        if len(bad):
            self.fallback_rows += len(bad)
            scores[bad], idx[bad] = self._fallback_search(xq[bad], k)
        self.searched_rows += len(xq)
        return scores, idx

    def _fallback_search(self, q: np.ndarray, k: int, rows: int = 256, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """fp32 search of the uncertified rows: numpy GEMM over gallery blocks, top k merged per block.

        Not faiss: in a process that has loaded onnxruntime, faiss.knn on a few rows stalled for
        minutes on the shared machine (its OpenMP threads against onnxruntime's); numpy's BLAS did not.
        """
        scores = np.empty((len(q), k), dtype=np.float32)
        idx = np.empty((len(q), k), dtype=np.int64)
        for r in range(0, len(q), rows):
            best_s = np.full((len(q[r : r + rows]), 0), -np.inf, dtype=np.float32)
            best_i = np.zeros(best_s.shape, dtype=np.int64)
            for b in range(0, self.n, block):
                sc = q[r : r + rows] @ self.x[b : b + block].T
                s_all = np.concatenate([best_s, sc], axis=1)
                i_all = np.concatenate([best_i, np.broadcast_to(np.arange(b, b + sc.shape[1]), sc.shape)], axis=1)
                keep = np.argpartition(-s_all, min(k, s_all.shape[1]) - 1, axis=1)[:, :k]
                best_s, best_i = np.take_along_axis(s_all, keep, axis=1), np.take_along_axis(i_all, keep, axis=1)
            order = np.argsort(-best_s, axis=1, kind="stable")
            scores[r : r + rows] = np.take_along_axis(best_s, order, axis=1)
            idx[r : r + rows] = np.take_along_axis(best_i, order, axis=1)
        return scores, idx

    def _search(self, q: np.ndarray, k: int, need: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One chunk: (scores, indices, the rows the certificate did not cover)."""
        qi, qs, q_err = _quantise(q, self.QUERY_LEVELS)
        a = (qi.astype(np.int16) + self.QUERY_LEVELS).astype(np.uint8)
        width = min(self.n, max(k, self.width))
        cand, threshold = self._candidates(a, width)
        if cand.shape[1] < k:  # fewer candidates than asked for (pathological ties): pad, certify nothing
            cand = np.pad(cand, ((0, 0), (0, k - cand.shape[1])), constant_values=-1)
        exact = _rerank(self.x, q, cand)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        top_s = np.take_along_axis(exact, order, axis=1)
        top_i = np.take_along_axis(cand, order, axis=1)
        q_norm = np.linalg.norm(qi.astype(np.float64), axis=1) * qs  # ||s_q Q||
        bound = q_err * self.gallery_norm + q_norm * self.gallery_error + _ROUNDING * max(1.0, self.gallery_norm)
        # no sample outside the candidates scores above this (-inf: the row's candidates are the whole gallery)
        beyond = qs.astype(np.float64) * threshold + bound
        last = np.arange(len(q)), need - 1
        certified = (top_s[last].astype(np.float64) > beyond) | (threshold == -np.inf)
        return top_s, top_i, np.flatnonzero(~certified | (top_i[last] < 0))

    def _candidates(self, a: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's candidates by approximate score, s_g * (Q - 64).G: (indices padded with -1, threshold).

        Every sample left out scored at most the row's threshold. Blocks are scored one at a
        time; a row's threshold starts at its width-th best score in the first block and rises
        to the width-th best it holds whenever the pending candidates are pruned, so after the
        first block only the few scores above it are kept (one compare and one flatnonzero per
        block instead of a top-k).
        """
        m = len(a)
        threshold = np.full(m, -np.inf, dtype=np.float32)
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        pending = 0
        for j, g in enumerate(self.blocks):
            start = j * self.block
            nb = g.shape[1]
            f = self._session.run(None, {"a": a, "b": g, "scale": self.scales[start : start + nb]})[0]  # (m, nb)
            if j == 0 and nb > width:  # ties at the width-th score stay in: everything dropped is below
                threshold = np.partition(f, nb - width, axis=1)[:, nb - width]
                hit = np.flatnonzero(f >= threshold[:, None])
            else:
                hit = np.flatnonzero(f > threshold[:, None])
            rows.append((hit // nb).astype(np.int16))  # rows < 32768: numpy's stable sort is then a radix sort
            cols.append(hit % nb + start)
            vals.append(f.ravel()[hit])
            pending += len(hit)
            if pending > 2 * m * width:
                rows, cols, vals, threshold = self._prune(rows, cols, vals, threshold, width, m)
                pending = len(rows[0])
        r, c, v, threshold = self._prune(rows, cols, vals, threshold, width, m)
        r, rank = r[0], _rank_in_row(r[0], m)
        cand = np.full((m, int(rank.max(initial=-1)) + 1), -1, dtype=np.int64)
        cand[r, rank] = c[0]
        return cand, threshold

    @staticmethod
    def _prune(rows: list[np.ndarray], cols: list[np.ndarray], vals: list[np.ndarray], threshold: np.ndarray,
               width: int, m: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Keep each row's `width` best pending candidates (and ties); raise its threshold to the width-th."""
        r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        order = np.argsort(r, kind="stable")
        r, c, v = r[order], c[order], v[order]
        counts = np.bincount(r, minlength=m)
        full = np.flatnonzero(counts >= width)
        if len(full):
            table = np.full((m, int(counts.max())), -np.inf, dtype=np.float32)
            table[r, _rank_in_row(r, m)] = v
            kth = -np.partition(-table[full], width - 1, axis=1)[:, width - 1]  # width-th largest
            threshold = threshold.copy()
            threshold[full] = np.maximum(threshold[full], kth)
            keep = v >= threshold[r]  # what is dropped scored below the threshold
            r, c, v = r[keep], c[keep], v[keep]
        return [r], [c], [v], threshold


def _rank_in_row(r: np.ndarray, m: int) -> np.ndarray:
    """Position of each entry within its row, for row numbers r sorted ascending."""
    counts = np.bincount(r, minlength=m)
    return np.arange(len(r)) - (np.cumsum(counts) - counts)[r]


# |fp32 - exact| of a unit-norm dot product of <= 4096 terms, of the score products and of the
# norms, with room to spare (d * 2^-24 = 3e-5 at d = 512): added to the certificate's bound
_ROUNDING = 1e-4


def _quantise(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row symmetric quantisation of float32 rows: (int8 values, scales, ||x - s Q|| per row).

    In float32: the error norms are off by at most ~d * 2^-24 of ||x||, well inside _ROUNDING.
    """
    peak = np.abs(x).max(axis=1)
    scale = np.where(peak > 0, peak / np.float32(levels), np.float32(1)).astype(np.float32)
    q = np.rint(x / scale[:, None])
    np.clip(q, -levels, levels, out=q)
    err = x - q * scale[:, None]
    return q.astype(np.int8), scale, np.sqrt(np.einsum("ij,ij->i", err, err, dtype=np.float64))


def _rerank(x: np.ndarray, q: np.ndarray, cand: np.ndarray, rows: int = 16) -> np.ndarray:
    """Exact fp32 scores of each row's candidates (-inf for the -1 padding), a few rows at a time."""
    out = np.empty(cand.shape, dtype=np.float32)
    for b in range(0, len(q), rows):
        c = cand[b : b + rows]
        out[b : b + rows] = np.einsum("qd,qcd->qc", q[b : b + rows], x[np.maximum(c, 0)])
    out[cand < 0] = -np.inf
    return out


def _int8_matmul() -> object:
    """An onnxruntime session computing (a - 64) @ b * scale: a uint8 (m, d), b int8 (d, n), scale (n,)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node("MatMulIntegerToFloat", ["a", "b", "a_scale", "scale", "a_zero"], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node], "int8_scores",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", "d"]),
         helper.make_tensor_value_info("b", TensorProto.INT8, ["d", "n"]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", "n"])],
        [helper.make_tensor("a_scale", TensorProto.FLOAT, [], [1.0]),
         helper.make_tensor("a_zero", TensorProto.UINT8, [], [Int8Search.QUERY_LEVELS])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    options = ort.SessionOptions()
    # single-threaded GEMMs (Int8Search.search runs chunks side by side instead): with a thread pool
    # inside each GEMM, threads spin and yield at every GEMM's end waiting for a descheduled partner,
    # which on the loaded 2-core machine more than doubled the CPU time (measured at 1M)
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# --- neighbour lists with the tie rule -------------------------------------------------------------


def neighbours(searcher: object, x: np.ndarray, q: np.ndarray, k: int, depth: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k nearest other samples of each query, ties by lower index.

    depth: per query, how many of its k neighbours are used (default all k); columns beyond a
    query's depth may hold any samples (Int8Search certifies only the used ones).
    """
    n = len(x)
    depth = np.full(len(q), k) if depth is None else np.minimum(np.asarray(depth), k)
    # one column beyond the depth + 1 needed (self included) shows whether the last needed score
    # is tied with samples left out of the window (faiss orders and cuts equal scores arbitrarily)
    width = min(n, k + 2)
    if isinstance(searcher, Int8Search):
        scores, idx = searcher.search(x[q], width, depth=np.minimum(depth + 2, width))
    else:
        scores, idx = searcher.search(x[q], width)
    order = np.lexsort((idx, -scores), axis=1)
    top = np.take_along_axis(idx, order, axis=1)[:, : k + 1]
    if width < n:
        rows = np.arange(len(q))
        cut = np.flatnonzero(scores[rows, depth] <= scores[rows, depth + 1])
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
