"""Evaluation at scale: exact vs sampled-query evaluation, faiss vs int8 search (trainer.retrieval.evaluate_retrieval).

    nice -n 10 python -m benchmarks.eval_scale                              # 100k and 1M x 512, realistic data
    nice -n 10 python -m benchmarks.eval_scale --sizes 1000000 --queries 3000  # a cheaper 1M measurement
    python -m benchmarks.eval_scale --device cuda                           # GPU machine: torch on CUDA vs faiss CPU

Data: benchmarks.eval_data (unit embeddings around class centres on the sphere, Zipf-like
class sizes, per-class spread, near-duplicate classes; 1M: 100k classes). Each measurement runs
in a fresh process that first loads the embeddings, so memory is the peak above the data.

Methods per size:
- exact: every query, faiss brute force (only up to --exact-max, it is O(N^2 D));
- sampled: exact search for a random sample of queries against the full gallery; by default
  the sample is sized from a pilot for a Recall@1 95% half-width of 0.005 (--queries fixes it);
  run twice on the same queries, by faiss brute force (fp32) and by the int8 back end (int8
  candidates, exact fp32 re-ranking, fp32 fallback for uncertified rows: trainer.search.Int8Search),
  whose metrics must agree to 1e-6 (--backends picks either);
- pml: PML AccuracyCalculator, batched (--pml; sizes up to --exact-max).
Agreement: sampled vs exact (where both ran), and at 1M vs benchmarks/eval_reference.json
(exact search for 50k queries, computed once): the difference and whether it lies inside
the two 95% intervals combined (sqrt(h1^2 + h2^2)).

CPU seconds are reported beside wall seconds because the machine is shared: on 2 idle cores
wall time is about CPU seconds / 2 (faiss, BLAS and onnxruntime keep both busy). "fallback"
counts the sampled queries the int8 certificate sent back to fp32 search.

On --device cuda the sampled evaluation runs twice on the same queries, torch on the GPU
(fp16 candidates, exact fp32 re-ranking) and faiss on the CPU, and the metrics must agree
to 1e-6; results go to their own section (eval_gpu).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _common as C
from benchmarks.eval_data import default_spec, save_realistic

MODULE = "benchmarks.eval_scale"
KS = (1, 2, 4, 8)
METRICS = ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r")
REFERENCE = Path(__file__).resolve().parent / "eval_reference.json"


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from imlt.trainer.retrieval import EvaluationSettings, evaluate_retrieval

    torch.set_num_threads(spec["threads"])
    x = np.load(spec["embeddings"])
    y = np.load(spec["labels"])
    mem = C.PeakMemory()
    mem.start()
    cpu = time.process_time()
    start = time.perf_counter()
    load = os.getloadavg()[0]
    if spec["method"] == "pml":
        from benchmarks.eval_recall import _pml

        metrics = _pml(x, y, {"method": "pml-batched", "chunk": 2048})
        out: dict[str, Any] = {"metrics": metrics, "half_widths": {m: 0.0 for m in METRICS}, "num_queries": len(y)}
    else:
        st = EvaluationSettings(mode=spec["method"], sample_queries=spec.get("queries"), seed=spec.get("seed", 0),
                                backend=spec.get("backend", "auto"), device=spec.get("device", "auto"))
        r = evaluate_retrieval(x, y, ks=KS, settings=st, copy=False)
        out = {"metrics": {m: r.metrics[m] for m in METRICS}, "half_widths": r.half_widths(),
               "num_queries": r.details["num_queries"], "backend": r.details["backend"], "method": r.method,
               "fallback_rows": r.details.get("search_fallback_rows", 0)}
    out.update(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu, peak_bytes=mem.stop(),
               data_bytes=int(x.nbytes), load_start=load, load_end=os.getloadavg()[0])
    return out


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=None, help="Fixed sample size (default: sized for half-width 0.005)")
    p.add_argument("--exact-max", type=int, default=100_000, help="Largest N also evaluated exactly")
    p.add_argument("--backends", nargs="+", default=["faiss", "int8"], choices=["faiss", "int8"],
                   help="CPU search back ends of the sampled evaluation (same queries for each)")
    p.add_argument("--pml", action="store_true", help="Also PML AccuracyCalculator (batched) up to --exact-max")
    p.add_argument("--data", default=None, help="Folder for the generated .npy files (default: a temporary one)")
    p.add_argument("--save", default=None, help="Also write the raw measurements to this JSON file")
    p.add_argument("--from-saved", default=None, help="Re-render the section from a --save file (e.g. once the reference exists)")
    args = p.parse_args()
    if C.child_entry(args, child):
        return
    if args.quick:
        args.sizes, args.queries = [20_000], 2000
    import torch

    threads = torch.get_num_threads()
    started = time.monotonic()
    info = C.machine_info(args.device)
    rows: list[list[Any]] = []
    headlines: list[str] = []
    saved: dict[str, Any] = json.loads(Path(args.from_saved).read_text()) if args.from_saved else {}
    if saved:
        args.sizes = [int(n) for n in saved["runs"]]
        info = saved["info"]
    with tempfile.TemporaryDirectory(prefix="imlt-bench-scale-") as tmp:
        for n in args.sizes:
            spec = default_spec(n)
            if saved:
                runs = saved["runs"][str(n)]
                _rows_for(n, spec, runs, rows, headlines)
                continue
            C.console.print(f"[cyan]generating {n:,} x {spec.dim} ({spec.num_classes:,} classes)[/]")
            emb, lab = save_realistic(spec, args.data or tmp)
            base = {"embeddings": str(emb), "labels": str(lab), "threads": threads, "queries": args.queries}
            runs = {}
            if args.device == "cuda":
                plan = [("sampled", {"backend": "torch", "device": "cuda"}), ("sampled", {"backend": "faiss", "device": "cpu"})]
            else:
                plan = [("sampled", {"backend": b, "device": "cpu"}) for b in args.backends]
                if n <= args.exact_max:
                    plan.insert(0, ("exact", {}))
                    if args.pml:
                        plan.append(("pml", {}))
            for method, extra in plan:
                label = method + (f" ({extra['backend']} on {extra['device']})" if extra else "")
                C.console.print(f"[cyan]{n:,}: {label}[/]")
                runs[label] = C.run_child(MODULE, {**base, "method": method, **extra}, timeout=6 * 3600)
            saved.setdefault("runs", {})[str(n)] = runs
            if args.save:
                Path(args.save).write_text(json.dumps({"info": info, **saved}, indent=1))
            _rows_for(n, spec, runs, rows, headlines)
    columns = ["N", "method", "queries", "wall s", "CPU s", "load (start-end)", "peak GiB above data", "x data",
               "fallback", "R@1 ± 95%", "MAP@R ± 95%", "vs exact", "vs reference (inside CI?)"]
    C.print_table("Evaluation at scale", columns, rows)
    body = (
        "Data: benchmarks.eval_data defaults (unit rows, class centres on the sphere, Zipf-like class sizes 2-100 "
        "with mean 10, per-class log-normal spread around 2.0, 10% near-duplicate classes at 0.6 rad), seed 0. "
        "sampled = exact search of a random query sample against the full gallery, by faiss brute force (fp32) or by "
        "int8 candidates (onnxruntime integer GEMM) re-ranked in fp32 with a certificate, uncertified queries searched "
        "again in fp32 (\"fallback\" counts them); the same queries for both. Sample "
        "sized from a 2,000-query pilot for a Recall@1 95% half-width <= 0.005 unless fixed; intervals: Wilson "
        "(Recall@K) and normal (MAP@R), finite-population corrected. The reference is "
        f"benchmarks/eval_reference.json ({_reference_words()}, seeds inside); \"inside CI?\" asks whether the "
        "difference lies within the two 95% half-widths combined. \"x data\" is the peak above "
        "the loaded embeddings as a multiple of their size.\n\n" + C.markdown_table(columns, rows)
    )
    name = "eval_gpu" if args.device == "cuda" else "eval_scale"
    worst = _disagreement(saved.get("runs", {}))
    if worst is not None:
        pair = "torch on CUDA vs faiss on the CPU" if args.device == "cuda" else "int8 vs faiss search"
        headlines.append(f"{pair}, same queries: largest metric difference {worst:.1e} (must be <= 1e-6).")
    C.report(args, MODULE, name, "Evaluation at scale: exact vs sampled queries" + (" (GPU)" if args.device == "cuda" else ""),
             headlines, body, info=info, started=started)
    if worst is not None and worst > 1e-6:
        raise SystemExit("the two search back ends' evaluations disagree by more than 1e-6")


def _disagreement(all_runs: dict[str, dict[str, dict[str, Any]]]) -> float | None:
    """Largest metric difference between the two sampled runs of a size (same queries), or None."""
    worst = None
    for runs in all_runs.values():
        sampled = [r for k, r in runs.items() if k.startswith("sampled (")]
        if len(sampled) == 2:
            a, b = sampled
            worst = max(worst or 0.0, *(abs(a["metrics"][m] - b["metrics"][m]) for m in METRICS))
    return worst


def _rows_for(n: int, spec: Any, runs: dict[str, dict[str, Any]], rows: list[list[Any]], headlines: list[str]) -> None:
    ref = _reference(spec, n)
    exact = next((r for k, r in runs.items() if k == "exact"), None)
    for label, r in runs.items():
        rows.append(_row(n, label, r, exact, ref))
    headlines.append(_headline(n, runs, exact, ref))
    faiss = next((r for k, r in runs.items() if k == "sampled (faiss on cpu)"), None)
    int8 = next((r for k, r in runs.items() if k == "sampled (int8 on cpu)"), None)
    if faiss and int8:
        headlines.append(_speedup(n, faiss, int8))


def _reference_words() -> str:
    if not REFERENCE.exists():
        return "not computed yet"
    ref = json.loads(REFERENCE.read_text())
    return (f"exact search of {ref['num_queries']:,} random queries at {ref['data']['n']:,}"
            + (f", a partial run of the {ref['queries_drawn']:,} planned" if ref.get("partial") else ""))


def _reference(spec: Any, n: int) -> dict[str, Any] | None:
    if not REFERENCE.exists():
        return None
    ref = json.loads(REFERENCE.read_text())
    return ref if ref.get("data") == json.loads(json.dumps(spec.as_dict())) else None


def _agree(r: dict[str, Any], other: dict[str, Any] | None, other_hw: dict[str, float] | None) -> str:
    if other is None:
        return "n/a"
    d = r["metrics"]["recall_at_1"] - other["recall_at_1"]
    h = float(np.hypot(r["half_widths"]["recall_at_1"], (other_hw or {}).get("recall_at_1", 0.0)))
    inside = "yes" if abs(d) <= h or (h == 0 and abs(d) < 1e-6) else "NO"
    return f"R@1 {d:+.4f} ({inside})"


def _row(n: int, label: str, r: dict[str, Any], exact: dict[str, Any] | None, ref: dict[str, Any] | None) -> list[Any]:
    m, h = r["metrics"], r["half_widths"]
    ref_hw = {k: (hi - lo) / 2 for k, (lo, hi) in ref["intervals95"].items()} if ref else None
    return [
        f"{n:,}", label, f"{r['num_queries']:,}", f"{r['seconds']:.1f}", f"{r['cpu_seconds']:.1f}",
        f"{r['load_start']:.1f}-{r['load_end']:.1f}", C.gib(r["peak_bytes"]), f"{r['peak_bytes'] / r['data_bytes']:.2f}",
        _fallback(r),
        f"{m['recall_at_1']:.4f} ± {h['recall_at_1']:.4f}", f"{m['map_at_r']:.4f} ± {h['map_at_r']:.4f}",
        _agree(r, exact["metrics"] if exact and exact is not r else None, exact["half_widths"] if exact else None),
        _agree(r, ref["metrics"] if ref else None, ref_hw),
    ]


def _fallback(r: dict[str, Any]) -> str:
    if "int8" not in str(r.get("backend")):
        return "n/a"
    f = r.get("fallback_rows", 0)
    return f"{f:,} ({f / r['num_queries']:.2%})"


def _needed(p: float, n: int) -> int:
    """Queries for a 0.005 Recall@1 half-width at Recall@1 p among n (normal approximation, finite population)."""
    need = 1.959963984540054**2 * p * (1 - p) / 0.005**2
    return int(np.ceil(need / (1 + (need - 1) / n)))


def _speedup(n: int, faiss: dict[str, Any], int8: dict[str, Any]) -> str:
    """The two back ends on the same queries: CPU time, and what the 0.005 half-width costs with each."""
    need = _needed(faiss["metrics"]["recall_at_1"], n)
    per = {name: r["cpu_seconds"] / r["num_queries"] for name, r in (("faiss", faiss), ("int8", int8))}
    return (f"At {n:,} x 512, int8 vs faiss search on the same {int8['num_queries']:,} queries: {int8['cpu_seconds']:.0f} vs "
            f"{faiss['cpu_seconds']:.0f} CPU s ({C.ratio(int8['cpu_seconds'], faiss['cpu_seconds'])}), {int8['seconds']:.0f} vs "
            f"{faiss['seconds']:.0f} s wall (loads {int8['load_start']:.1f} / {faiss['load_start']:.1f}); peak "
            f"{C.gib(int8['peak_bytes'])} vs {C.gib(faiss['peak_bytes'])} GiB above the data; {_fallback(int8)} queries fell "
            f"back to fp32." + ("" if int8["num_queries"] >= need else
            f" A 0.005 Recall@1 half-width ({need:,} queries) at these rates: {per['int8'] * need:.0f} CPU s with "
            f"int8, {per['faiss'] * need:.0f} with faiss (not measured)."))


def _headline(n: int, runs: dict[str, dict[str, Any]], exact: dict[str, Any] | None, ref: dict[str, Any] | None) -> str:
    s = next(r for k, r in runs.items() if k.startswith("sampled"))
    text = (f"At {n:,} x 512: sampled evaluation ({s.get('backend')}), {s['num_queries']:,} queries, Recall@1 {s['metrics']['recall_at_1']:.4f} "
            f"± {s['half_widths']['recall_at_1']:.4f} in {s['seconds']:.0f} s wall ({s['cpu_seconds']:.0f} CPU s, load "
            f"{s['load_start']:.1f}), peak {C.gib(s['peak_bytes'])} GiB above the data ({s['peak_bytes'] / s['data_bytes']:.2f}x).")
    need = _needed(s["metrics"]["recall_at_1"], n)
    if s["num_queries"] < need:  # a fixed smaller sample: say what the 0.005 target would cost at this rate
        cpu = s["cpu_seconds"] / s["num_queries"] * need
        text += (f" Extrapolated at this rate: the {need:,} queries a 0.005 half-width needs take about {cpu:.0f} CPU s, "
                 f"i.e. about {cpu / 2 / 60:.1f} min on 2 idle cores (not measured).")
    if exact is not None:
        text += (f" Exact: {exact['metrics']['recall_at_1']:.4f} in {exact['seconds']:.0f} s "
                 f"(sampled takes {C.ratio(s['seconds'], exact['seconds'])} of exact's time).")
    if "pml" in runs and exact is not None:
        text += f" PML batched takes {C.ratio(runs['pml']['seconds'], exact['seconds'])} of exact's time."
    if ref is not None:
        text += f" Reference ({ref['num_queries']:,} exact queries): {ref['metrics']['recall_at_1']:.4f}."
    return text


if __name__ == "__main__":
    main()
