"""The 1M reference: exact search for a large random query sample, computed once and stored.

    nice -n 10 python -m benchmarks.eval_reference       # 1M x 512, 50,000 queries: ~35 CPU-minutes (2 idle cores: ~20 min)

Writes benchmarks/eval_reference.json: the data spec (with its seed), the query seed and
count, the metrics and their 95% intervals. Never the data: benchmarks.eval_data regenerates
it bit for bit from the spec. benchmarks.eval_scale checks the fast evaluation against it.

The queries run in chunks whose per-query results are kept in --work, so an interrupted run
(a shared machine, a time limit) resumes where it stopped; --max-minutes stops early and
writes what is done, marked partial (its intervals are then wider, and say so).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks import _common as C
from benchmarks.eval_data import default_spec, make_labels, make_realistic

REFERENCE = Path(__file__).resolve().parent / "eval_reference.json"
KS = (1, 2, 4, 8)


def query_sample(n: int, queries: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, queries, replace=False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=50_000)
    p.add_argument("--query-seed", type=int, default=12345)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--work", default="/tmp/imlt-eval-reference", help="Per-chunk results (resume)")
    p.add_argument("--max-minutes", type=float, default=None, help="Stop after this long and write a partial reference")
    p.add_argument("--out", default=str(REFERENCE))
    args = p.parse_args()
    import faiss

    from imlt.trainer.retrieval import mean_interval, per_query_metrics, wilson_interval

    spec = default_spec(args.n)
    started = time.monotonic()
    cpu0 = time.process_time()
    y = make_labels(spec)
    x = None  # drawn only when a chunk remains to be searched
    q = query_sample(args.n, args.queries, args.query_seed)
    work = Path(args.work) / f"n{args.n}-q{args.queries}-s{args.query_seed}-d{spec.seed}"
    work.mkdir(parents=True, exist_ok=True)
    load = [round(v, 2) for v in os.getloadavg()]
    search_s = 0.0
    for c, b in enumerate(range(0, len(q), args.chunk)):
        f = work / f"chunk{c:04d}.npz"
        if f.exists():
            continue
        if args.max_minutes is not None and time.monotonic() - started > 60 * args.max_minutes:
            break
        if x is None:
            x, y2 = make_realistic(spec)
            assert (y2 == y).all()
        t = time.perf_counter()
        per = per_query_metrics(x, y, KS, args.chunk, queries=q[b : b + args.chunk], backend="faiss", device="cpu", copy=False)
        search_s += time.perf_counter() - t
        np.savez(f, queries=per.queries, hits=per.hits, ap=per.ap)
        print(f"chunk {c}: {b + len(per.queries)} of {len(q)} queries, {time.perf_counter() - t:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    parts = [np.load(f) for f in sorted(work.glob("chunk*.npz"))]
    queries = np.concatenate([p["queries"] for p in parts])
    hits = np.concatenate([p["hits"] for p in parts])
    ap = np.concatenate([p["ap"] for p in parts])
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    population = int((counts[inverse] > 1).sum())
    metrics = {f"recall_at_{k}": float(hits[:, i].mean()) for i, k in enumerate(KS)}
    metrics["map_at_r"] = float(ap.mean())
    intervals = {f"recall_at_{k}": wilson_interval(int(hits[:, i].sum()), len(queries), population) for i, k in enumerate(KS)}
    intervals["map_at_r"] = mean_interval(ap, population)
    out = {
        "what": "exact leave-one-out retrieval (faiss brute-force inner product, fp32) for a random query sample of the benchmark data",
        "data": spec.as_dict(),
        "query_seed": args.query_seed,
        "query_sample": "benchmarks.eval_reference.query_sample(n, queries, query_seed); samples without a same-class partner dropped",
        "queries_drawn": args.queries,
        "num_queries": int(len(queries)),
        "num_eligible_queries": population,
        "partial": bool(len(parts) * args.chunk < args.queries),
        "partial_note": "a partial run holds the first chunks of the sorted sample; the generator's rows are in random "
                        "order, so that is still a uniform random sample of queries. Rerun the command to complete it.",
        "metrics": metrics,
        "intervals95": {m: [lo, hi] for m, (lo, hi) in intervals.items()},
        "interval_method": "Wilson (Recall@K), normal (MAP@R), finite-population corrected",
        "search_seconds_this_run": round(search_s, 1),
        "cpu_seconds_this_run": round(time.process_time() - cpu0, 1),
        "load_average_at_start": load,
        "machine": {k: v for k, v in C.machine_info("cpu").items() if k in ("cpu", "cpus", "faiss", "torch")},
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
