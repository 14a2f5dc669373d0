"""The 1M reference: exact search (faiss flat, every row) for a large random query sample, run once.

    nice -n 10 python -m benchmarks.eval_reference            # 1M x 512, 50,000 queries (about 30-60 min on 2 cores)

Writes benchmarks/eval_reference.json: the data spec (with its seed), the query seed and
count, and the metrics with their 95% intervals. Never the data: benchmarks.eval_data
regenerates it bit for bit from the spec. benchmarks.eval_scale checks the fast evaluation
against these numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import _common as C
from benchmarks.eval_data import default_spec, make_realistic

REFERENCE = Path(__file__).resolve().parent / "eval_reference.json"
KS = (1, 2, 4, 8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=50_000)
    p.add_argument("--query-seed", type=int, default=12345)
    p.add_argument("--out", default=str(REFERENCE))
    args = p.parse_args()
    import faiss
    import torch

    from imlt.trainer.retrieval import retrieval_metrics

    spec = default_spec(args.n)
    started = time.monotonic()
    x, y = make_realistic(spec)
    q = np.sort(np.random.default_rng(args.query_seed).choice(args.n, args.queries, replace=False))
    load = [round(v, 2) for v in __import__("os").getloadavg()]
    with C.Stopwatch() as sw:
        m = retrieval_metrics(x, y, ks=KS, queries=q)
    out = {
        "what": "exact leave-one-out retrieval (faiss IndexFlatIP, fp32) for a random query sample of the benchmark data",
        "data": spec.as_dict(),
        "query_seed": args.query_seed,
        "query_sample": "np.sort(np.random.default_rng(query_seed).choice(n, queries, replace=False)), then samples without a same-class partner dropped",
        "queries": args.queries,
        "metrics": m,
        "seconds": round(sw.seconds, 1),
        "load_average_at_start": load,
        "machine": {k: v for k, v in C.machine_info("cpu").items() if k in ("cpu", "cpus", "faiss", "torch")},
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "total_seconds": round(time.monotonic() - started, 1),
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
