"""Recall@K + MAP@R: time and peak memory of ours (faiss exact, query chunks) vs PML and torch.

    python -m benchmarks.eval_recall                      # 10k x 512, 100 classes (default)
    python -m benchmarks.eval_recall --sizes 10000 100000 # add 100k (about 3 minutes more on 2 cores)
    python -m benchmarks.eval_recall --million            # 1M: exact on sampled queries, IVF agreement

Methods, each in a fresh process that first loads the embeddings (so memory is the peak above
the data):
- ours: trainer.retrieval.retrieval_metrics (faiss IndexFlatIP, 2048 queries a chunk);
- PML: AccuracyCalculator(k="max_bin_count", knn_func=CustomKNN(CosineSimilarity())), with
  Recall@2/4/8 added by a subclass (PML has precision_at_1 = Recall@1 and MAP@R built in),
  once over the full similarity matrix (only at sizes where it fits) and once batched;
- torch: brute-force matmul + topk over query chunks.
Results must agree (max |difference| is reported). Approximate indexes (HNSW, IVF) are
scored against exact search: their Recall@K and MAP@R, and the share of the exact 8 nearest
neighbours they return.

Data: benchmarks.eval_data (unit embeddings around class centres on the sphere, Zipf-like
class sizes of mean 10, per-class spread, near-duplicate classes), whose exact Recall@1 lies
between 0.6 and 0.9 at 10k to 1M. (The earlier isotropic Gaussian data gave 0.09 at 1M.)
benchmarks.eval_scale measures the sampled evaluation the evaluate step uses above 100k.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _common as C

MODULE = "benchmarks.eval_recall"
KS = (1, 2, 4, 8)
METRICS = ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r")
FULL_MATRIX_LIMIT = 20_000  # PML's unbatched CustomKNN holds an N x N float matrix: 1.6 GB at 20k


def make_embeddings(n: int, dim: int, classes: int | None, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from benchmarks.eval_data import DataSpec, make_realistic

    return make_realistic(DataSpec(n=n, dim=dim, classes=classes, spread=spread, seed=seed))


# --- the measured methods (run inside a child process) ---------------------------------------------


def _ours(x: np.ndarray, y: np.ndarray, spec: dict[str, Any]) -> dict[str, float]:
    from imlt.trainer.retrieval import retrieval_metrics
    from imlt.trainer.search import ApproximateIndex

    index: Any = "exact"
    if spec.get("index"):
        index = ApproximateIndex(**spec["index"])
    return retrieval_metrics(x, y, ks=KS, chunk_size=spec["chunk"], index=index, queries=spec.get("queries_array"))


def _pml(x: np.ndarray, y: np.ndarray, spec: dict[str, Any]) -> dict[str, float]:
    import torch
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator, try_getting_not_lone_labels
    from pytorch_metric_learning.utils.inference import CustomKNN

    class WithRecall(AccuracyCalculator):
        """PML's documented extension point: calculate_<name> plus requires_knn."""

        def _recall(self, k: int, knn_labels: torch.Tensor, query_labels: torch.Tensor, not_lone_query_mask: torch.Tensor) -> float:
            knn_labels, query_labels = try_getting_not_lone_labels(knn_labels, query_labels, not_lone_query_mask)
            return float((knn_labels[:, :k] == query_labels[:, None]).any(dim=1).double().mean())

        def calculate_recall_at_2(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):  # type: ignore[no-untyped-def]
            return self._recall(2, knn_labels, query_labels, not_lone_query_mask)

        def calculate_recall_at_4(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):  # type: ignore[no-untyped-def]
            return self._recall(4, knn_labels, query_labels, not_lone_query_mask)

        def calculate_recall_at_8(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):  # type: ignore[no-untyped-def]
            return self._recall(8, knn_labels, query_labels, not_lone_query_mask)

        def requires_knn(self) -> list[str]:
            return super().requires_knn() + ["recall_at_2", "recall_at_4", "recall_at_8"]

    batch = spec["chunk"] if spec["method"] == "pml-batched" else None
    calc = WithRecall(
        include=("precision_at_1", "mean_average_precision_at_r", "recall_at_2", "recall_at_4", "recall_at_8"),
        k="max_bin_count", device=torch.device("cpu"), knn_func=CustomKNN(CosineSimilarity(), batch_size=batch),
    )
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    out = calc.get_accuracy(query=xt, query_labels=yt, reference=xt, reference_labels=yt, ref_includes_query=True)
    return {
        "recall_at_1": out["precision_at_1"], "recall_at_2": out["recall_at_2"], "recall_at_4": out["recall_at_4"],
        "recall_at_8": out["recall_at_8"], "map_at_r": out["mean_average_precision_at_r"],
    }


def _torch(x: np.ndarray, y: np.ndarray, spec: dict[str, Any]) -> dict[str, float]:
    """The obvious hand-written version: normalise, matmul a chunk of queries, topk, score."""
    import torch
    import torch.nn.functional as F

    xt = F.normalize(torch.from_numpy(x), dim=1)
    yt = torch.from_numpy(y)
    others = torch.bincount(yt)[yt] - 1
    k = int(min(len(xt) - 1, max(max(KS), int(others.max()))))
    queries = torch.nonzero(others > 0).squeeze(1)
    hits = {kk: 0 for kk in KS}
    ap_sum = 0.0
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    for start in range(0, len(queries), spec["chunk"]):
        q = queries[start : start + spec["chunk"]]
        sim = xt[q] @ xt.T
        sim[torch.arange(len(q)), q] = -float("inf")  # leave the query itself out
        idx = sim.topk(k, dim=1).indices
        rel = yt[idx] == yt[q][:, None]
        for kk in KS:
            hits[kk] += int(rel[:, :kk].any(dim=1).sum())
        r = others[q].double()
        hit = rel & (ranks[None, :] <= r[:, None])
        precision = hit.cumsum(dim=1) / ranks[None, :]
        ap_sum += float(((precision * hit).sum(dim=1) / r).sum())
    out = {f"recall_at_{kk}": hits[kk] / len(queries) for kk in KS}
    out["map_at_r"] = ap_sum / len(queries)
    return out


def _neighbour_recall(x: np.ndarray, spec: dict[str, Any]) -> dict[str, float]:
    """Share of each query's exact 8 nearest neighbours that the approximate index returns."""
    import faiss

    from imlt.trainer.retrieval import l2_normalize
    from imlt.trainer.search import ApproximateIndex, build_approximate_index

    xn = l2_normalize(x)
    rng = np.random.default_rng(1)
    q = np.sort(rng.choice(len(xn), min(len(xn), spec.get("agreement_queries", 2000)), replace=False))
    exact = faiss.IndexFlatIP(xn.shape[1])
    exact.add(xn)
    _, e = exact.search(xn[q], 9)
    approx = build_approximate_index(xn, ApproximateIndex(**spec["index"]), 9)
    _, a = approx.search(xn[q], 9)
    found = [len(set(e_row[e_row != qi]) & set(a_row[a_row != qi])) / 8 for e_row, a_row, qi in zip(e, a, q)]
    return {"neighbour_recall_at_8": float(np.mean(found))}


METHODS = {"ours": _ours, "pml": _pml, "pml-batched": _pml, "torch": _torch}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    x = np.load(spec["embeddings"])
    y = np.load(spec["labels"])
    if spec.get("queries"):
        spec["queries_array"] = np.load(spec["queries"])
    mem = C.PeakMemory()
    mem.start()
    start = time.perf_counter()
    metrics = METHODS[spec["method"]](x, y, spec)
    seconds = time.perf_counter() - start
    peak = mem.stop()
    extra = _neighbour_recall(x, spec) if spec.get("index") and not spec.get("queries") else {}
    return {"metrics": {k: float(metrics[k]) for k in METRICS}, "seconds": seconds, "peak_bytes": peak, **extra}


# --- the parent ------------------------------------------------------------------------------------


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000], help="Numbers of embeddings")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=None, help="Classes (default N / 10: Zipf-like sizes of mean 10)")
    p.add_argument("--spread", type=float, default=2.0, help="Median within-class spread (sets the difficulty)")
    p.add_argument("--chunk", type=int, default=2048, help="Queries per chunk (ours, torch, batched PML)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64], help="IVF cells scanned per query")
    p.add_argument("--ef-search", type=int, default=128, help="HNSW search width")
    p.add_argument("--hnsw-max", type=int, default=20_000,
                   help="Largest N given an HNSW index (its build already costs 10x exact search at 10k on 2 cores)")
    p.add_argument("--million", action="store_true", help="Also 1M embeddings: exact on sampled queries vs IVF")
    p.add_argument("--million-classes", type=int, default=100_000, help="Classes at 1M (mean size 10)")
    p.add_argument("--million-queries", type=int, default=1000, help="Sampled queries at 1M")
    args = p.parse_args()
    if C.child_entry(args, child):
        return
    if args.quick:
        args.sizes, args.nprobe = [2000], [16]
    import torch

    threads = torch.get_num_threads()
    started = time.monotonic()
    info = C.machine_info(args.device)
    rows: list[list[Any]] = []
    approx_rows: list[list[Any]] = []
    headlines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="imlt-bench-eval-") as tmp:
        for n in args.sizes:
            x, y = make_embeddings(n, args.dim, args.classes, args.spread)
            emb, lab = Path(tmp, f"x{n}.npy"), Path(tmp, f"y{n}.npy")
            np.save(emb, x)
            np.save(lab, y)
            del x
            base = {"embeddings": str(emb), "labels": str(lab), "chunk": args.chunk, "threads": threads}
            methods = ["ours", "pml-batched", "torch"] + (["pml"] if n <= FULL_MATRIX_LIMIT else [])
            results: dict[str, dict[str, Any]] = {}
            for m in methods:
                C.console.print(f"[cyan]{n} x {args.dim}: {m}[/]")
                results[m] = C.run_child(MODULE, {**base, "method": m})
            ours = results["ours"]
            for m in methods:
                r = results[m]
                diff = max(abs(r["metrics"][k] - ours["metrics"][k]) for k in METRICS)
                rows.append([
                    f"{n:,}", _label(m, args.chunk), f"{r['seconds']:.2f}", C.ratio(r["seconds"], ours["seconds"]),
                    C.gib(r["peak_bytes"]), C.ratio(r["peak_bytes"], ours["peak_bytes"]),
                    f"{r['metrics']['recall_at_1']:.4f}", f"{r['metrics']['map_at_r']:.4f}", f"{diff:.1e}",
                ])
            pml = results["pml-batched"]
            headlines.append(
                f"At {n:,} x {args.dim}: PML AccuracyCalculator (batched) takes {C.ratio(pml['seconds'], ours['seconds'])} "
                f"our time and {C.ratio(pml['peak_bytes'], ours['peak_bytes'])} our peak memory; torch brute force "
                f"{C.ratio(results['torch']['seconds'], ours['seconds'])} time, "
                f"{C.ratio(results['torch']['peak_bytes'], ours['peak_bytes'])} memory. Largest metric difference to ours: "
                f"{max(max(abs(results[m]['metrics'][k] - ours['metrics'][k]) for k in METRICS) for m in methods):.1e}."
            )
            for spec in _index_specs(args, n):
                C.console.print(f"[cyan]{n} x {args.dim}: {spec['kind']}[/]")
                r = C.run_child(MODULE, {**base, "method": "ours", "index": spec})
                approx_rows.append(_approx_row(f"{n:,}", spec, r, ours))
        if args.million:
            rows_m, head_m = _million(args, tmp, threads)
            approx_rows += rows_m
            headlines.append(head_m)

    columns = ["N", "method", "seconds", "time vs ours", "peak GiB above data", "memory vs ours", "R@1", "MAP@R", "max |diff| vs ours"]
    C.print_table("Recall@K + MAP@R, exact", columns, rows)
    acols = ["N", "index", "seconds", "time vs exact", "peak GiB", "R@1 (exact)", "R@8 (exact)", "MAP@R (exact)", "exact 8-NN found"]
    C.print_table("Approximate indexes vs exact search", acols, approx_rows)
    body = (
        f"Data: benchmarks.eval_data, {args.dim}-d unit rows, spread {args.spread}, {args.classes or 'N/10'} classes "
        f"(1M: {args.million_classes}); every sample queries all others (leave-one-out). Each method runs in a fresh "
        "process; peak = highest resident memory above the loaded embeddings.\n\n"
        + C.markdown_table(columns, rows)
        + "\n\nApproximate indexes (trainer.retrieval `index=`), scored against exact search. Approximate search can "
        "*overstate* Recall@K: it skips far-away impostors along with far-away true neighbours, so check its agreement "
        "before trusting it. \"exact 8-NN found\" is the share of each query's exact 8 nearest neighbours it returns.\n\n"
        + C.markdown_table(acols, approx_rows)
    )
    C.report(args, MODULE, "eval", "Evaluation: Recall@K + MAP@R", headlines, body, info=info, started=started)


def _label(method: str, chunk: int) -> str:
    return {
        "ours": f"ours (faiss exact, chunks of {chunk})",
        "pml": "PML AccuracyCalculator (full matrix)",
        "pml-batched": f"PML AccuracyCalculator (batched {chunk})",
        "torch": f"torch matmul + topk (chunks of {chunk})",
    }[method]


def _index_specs(args: Any, n: int) -> list[dict[str, Any]]:
    hnsw = [{"kind": "hnsw", "ef_search": args.ef_search}] if n <= args.hnsw_max else []
    return [{"kind": "ivf", "nprobe": p} for p in args.nprobe] + hnsw


def _index_label(spec: dict[str, Any]) -> str:
    if spec["kind"] == "ivf":
        return f"IVF nprobe {spec['nprobe']}" + (f" of {spec['nlist']}" if spec.get("nlist") else "")
    return f"HNSW M {spec.get('hnsw_m', 32)} ef {spec.get('ef_search', 128)}"


def _approx_row(n: str, spec: dict[str, Any], r: dict[str, Any], exact: dict[str, Any]) -> list[Any]:
    m, e = r["metrics"], exact["metrics"]
    found = r.get("neighbour_recall_at_8")
    return [
        n, _index_label(spec), f"{r['seconds']:.2f}", C.ratio(r["seconds"], exact["seconds"]), C.gib(r["peak_bytes"]),
        f"{m['recall_at_1']:.4f} ({e['recall_at_1']:.4f})", f"{m['recall_at_8']:.4f} ({e['recall_at_8']:.4f})",
        f"{m['map_at_r']:.4f} ({e['map_at_r']:.4f})", "n/a" if found is None else f"{found:.3f}",
    ]


def _million(args: Any, tmp: str, threads: int) -> tuple[list[list[Any]], str]:
    n = 1_000_000
    C.console.print(f"[cyan]generating {n:,} x {args.dim}[/]")
    x, y = make_embeddings(n, args.dim, args.million_classes, args.spread)
    emb, lab, qs = Path(tmp, "x1m.npy"), Path(tmp, "y1m.npy"), Path(tmp, "q1m.npy")
    np.save(emb, x)
    np.save(lab, y)
    del x
    np.save(qs, np.sort(np.random.default_rng(2).choice(n, args.million_queries, replace=False)))
    base = {"embeddings": str(emb), "labels": str(lab), "chunk": args.chunk, "threads": threads, "queries": str(qs)}
    C.console.print(f"[cyan]1M: exact on {args.million_queries} sampled queries[/]")
    exact = C.run_child(MODULE, {**base, "method": "ours"})
    rows = [[f"{n:,} ({args.million_queries} queries)", "exact (faiss flat)", f"{exact['seconds']:.1f}", "1.00x",
             C.gib(exact["peak_bytes"]), f"{exact['metrics']['recall_at_1']:.4f}", f"{exact['metrics']['recall_at_8']:.4f}",
             f"{exact['metrics']['map_at_r']:.4f}", "1.000"]]
    nlist = 4096
    for p in args.nprobe:
        spec = {"kind": "ivf", "nprobe": p, "nlist": nlist}
        C.console.print(f"[cyan]1M: {_index_label(spec)}[/]")
        r = C.run_child(MODULE, {**base, "method": "ours", "index": spec})
        rows.append(_approx_row(f"{n:,} ({args.million_queries} queries)", spec, r, exact))
    full = exact["seconds"] * n / args.million_queries
    head = (f"At 1M x {args.dim} ({args.million_classes} classes): exact search for {args.million_queries} sampled queries "
            f"took {exact['seconds']:.0f} s, i.e. about {full / 60:.0f} min for all 1M queries; IVF (build included) is in the table.")
    return rows, head


if __name__ == "__main__":
    main()
