"""Per-worker classifier memory: ModelParallelAMSoftmax (sharded by class) vs data-parallel.

    python -m benchmarks.mp_memory                        # C = 100k and 1M at 512 dims, W = 2
    python -m benchmarks.mp_memory --classes 100000 --workers 2 --batch 64

Both modes run as W real worker processes under torchrun (gloo, CPU) and take one training
step on the classifier: forward, backward, SGD-with-momentum step (the trainer's default
optimiser). The backbone is left out (random embeddings with requires_grad stand in for it),
so the numbers are the classifier's own: parameters + gradients + momentum + logits and their
temporaries + communication buffers.
- model parallel: trainer.losses.ModelParallelAMSoftmax, each worker holding ceil(C/W)
  centres and scoring the all-gathered global batch against them;
- data parallel (baseline): trainer.losses.AMSoftmaxLoss holding all C centres on every worker,
  wrapped in DistributedDataParallel (gradient_as_bucket_view=True, so the all-reduce buckets
  are the gradients themselves: the most memory-frugal DDP setting), scoring its local batch.

Measured, not computed: every worker first runs the same step on a tiny classifier (so lazy
imports, thread pools and gloo buffers are not counted), notes its resident memory, resets the
kernel's peak mark, runs the step, and reports its peak above that start (and the
resident memory after each stage). The table shows the largest worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as C

MODULE = "benchmarks.mp_memory"
MODES = ("data-parallel", "model-parallel")


def _build(mode: str, num_classes: int, dim: int, env: Any) -> tuple[Any, int, list[Any]]:
    from imlt.trainer.losses import ModelParallelAMSoftmax

    if mode == "model-parallel":
        loss_fn = ModelParallelAMSoftmax(num_classes, dim, env)
        return loss_fn, loss_fn.classifier.end - loss_fn.classifier.start, list(loss_fn.parameters())
    from torch.nn.parallel import DistributedDataParallel

    from imlt.trainer.losses import AMSoftmaxLoss

    inner = AMSoftmaxLoss(num_classes, dim)
    return DistributedDataParallel(inner, gradient_as_bucket_view=True), num_classes, list(inner.parameters())


def _step(mode: str, num_classes: int, dim: int, env: Any, embeddings: Any, labels: Any, stages: dict[str, int] | None,
          mem: C.PeakMemory | None) -> tuple[int, float]:
    import torch

    def note(stage: str) -> None:
        if stages is not None and mem is not None:
            stages[stage] = mem.current()

    loss_fn, rows, params = _build(mode, num_classes, dim, env)
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    note("parameters")
    out = loss_fn(embeddings, labels)
    note("after forward")
    out.total.backward()
    note("after backward")
    optimizer.step()
    note("after optimiser step")
    return rows, float(out.total.detach())


def worker(spec: dict[str, Any]) -> None:
    """One rank: warm up on a tiny classifier, then measure one step of the real one; write rank{r}.json."""
    import gc

    import torch

    from imlt.trainer.collectives import barrier
    from imlt.trainer.process_group import destroy_process_group, init_process_group

    env = init_process_group("cpu")
    if not torch.distributed.is_initialized():  # a world of one joins nothing, but DDP needs a group
        torch.distributed.init_process_group("gloo", init_method="env://", rank=0, world_size=1)
    torch.manual_seed(env.rank)
    mode, num_classes, dim, local_batch = spec["mode"], spec["classes"], spec["dim"], spec["local_batch"]
    embeddings = torch.nn.functional.normalize(torch.randn(local_batch, dim), dim=1).requires_grad_(True)
    # Warm-up: lazy imports, thread pools and gloo buffers cost memory once; keep them out of the number.
    _step(mode, 4 * env.world_size, dim, env, embeddings, torch.randint(0, 4 * env.world_size, (local_batch,)), None, None)
    embeddings.grad = None
    gc.collect()
    labels = torch.randint(0, num_classes, (local_batch,))
    barrier()
    mem = C.PeakMemory()
    mem.start()
    stages: dict[str, int] = {}
    start = time.perf_counter()
    rows, loss = _step(mode, num_classes, dim, env, embeddings, labels, stages, mem)
    seconds = time.perf_counter() - start
    peak = mem.stop()
    result = {"rank": env.rank, "world_size": env.world_size, "rows": rows, "peak_bytes": peak, "stages": stages,
              "seconds": seconds, "loss": loss}
    Path(spec["out"], f"rank{env.rank}.json").write_text(json.dumps(result))
    barrier()
    destroy_process_group()


def launch(spec: dict[str, Any], workers: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="imlt-bench-mp-") as out:
        spec = {**spec, "out": out}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
               "-m", MODULE, "--child", json.dumps(spec)]
        proc = subprocess.run(cmd, cwd=C.REPO, capture_output=True, text=True, timeout=1800)
        files = sorted(Path(out).glob("rank*.json"))
        if proc.returncode != 0 or len(files) != workers:
            lines = proc.stderr.strip().splitlines()
            first = next((i for i, line in enumerate(lines) if "Traceback" in line), max(len(lines) - 20, 0))
            tail = "\n".join(lines[first : first + 30])
            raise RuntimeError(f"torchrun {spec['mode']} C={spec['classes']} failed (exit {proc.returncode}):\n{tail}")
        return [json.loads(f.read_text()) for f in files]


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="Global batch (each worker holds batch / workers)")
    args = p.parse_args()
    if args.child:
        worker(json.loads(args.child))
        return
    if args.device == "cuda":
        C.console.print("[yellow]mp_memory measures host memory with gloo on CPU; --device cuda is ignored[/]")
    if args.quick:
        args.classes = [20_000]
    started = time.monotonic()
    info = C.machine_info("cpu")
    rows: list[list[Any]] = []
    headlines: list[str] = []
    peaks: dict[tuple[int, str], int] = {}
    local_batch = args.batch // args.workers
    notes: list[str] = []
    for num_classes in sorted(args.classes):
        for mode in MODES:
            nproc, label = args.workers, mode
            smaller = [c for (c, m) in peaks if m == mode]
            if smaller:  # scale the measured smaller size up, with room to spare, before risking the box
                per_worker = peaks[(max(smaller), mode)] * num_classes / max(smaller) * 1.3
                if per_worker * args.workers > mem_available():
                    if mode == "data-parallel" and per_worker < mem_available():
                        # Every data-parallel worker holds the same full classifier: one worker process
                        # (DDP over a world of 1, the same local batch) shows what each of the W would need.
                        nproc, label = 1, f"{mode} (1 worker measured)"
                        notes.append(f"At C = {num_classes:,}, {args.workers} data-parallel workers do not fit in this "
                                     f"machine's free memory at once ({C.gib(mem_available())} GiB available), so one "
                                     "data-parallel worker was measured alone (same local batch; the gradient "
                                     "all-reduce over a world of 1 is a no-op).")
                    else:
                        C.console.print(f"[red]skipping {mode} C={num_classes}: needs ~{C.gib(per_worker * args.workers)} GiB, "
                                        f"{C.gib(mem_available())} GiB available[/]")
                        rows.append([f"{num_classes:,}", mode, "-", "skipped: not enough free memory", "", "", "", "", ""])
                        continue
            C.console.print(f"[cyan]C={num_classes:,} x {args.dim}, {label}, {nproc} workers[/]")
            spec = {"mode": mode, "classes": num_classes, "dim": args.dim, "local_batch": local_batch}
            ranks = launch(spec, nproc)
            top = max(ranks, key=lambda r: r["peak_bytes"])
            peaks[(num_classes, mode)] = top["peak_bytes"]
            s = top["stages"]
            full_copy = num_classes * args.dim * 4
            rows.append([
                f"{num_classes:,}", label, f"{top['rows']:,}", C.gib(top["peak_bytes"]),
                C.gib(s["parameters"]), C.gib(s["after forward"]), C.gib(s["after backward"]),
                C.gib(s["after optimiser step"]), f"{top['peak_bytes'] / full_copy:.2f}",
            ])
        dp, mp = peaks.get((num_classes, "data-parallel")), peaks.get((num_classes, "model-parallel"))
        if dp and mp:
            headlines.append(
                f"C = {num_classes:,} x {args.dim}, W = {args.workers}: model-parallel peak per worker {C.gib(mp)} GiB vs "
                f"data-parallel {C.gib(dp)} GiB, i.e. {C.ratio(mp, dp)} of the data-parallel baseline "
                f"(ideal 1/W = {1 / args.workers:.2f}x)."
            )
    columns = ["classes", "mode", "centres per worker", "peak GiB per worker", "RSS: parameters", "after forward",
               "after backward", "after optimiser step", "peak / one full C x D fp32 copy"]
    C.print_table(f"Classifier memory per worker, W = {args.workers}, global batch {args.batch}", columns, rows)
    body = (
        f"One training step (forward, backward, SGD momentum step) of the classifier alone, {args.workers} worker "
        f"processes under torchrun (gloo, CPU), global batch {args.batch}. Data parallel = AMSoftmaxLoss with all C "
        "centres on every worker in DistributedDataParallel (gradient_as_bucket_view=True); model parallel = "
        f"ModelParallelAMSoftmax with ceil(C/{args.workers}) centres per worker. Peak = highest resident memory of the "
        "largest worker above its state after a warm-up step on a tiny classifier; the stage columns are its resident memory "
        "above that start after each stage. The last column divides the peak by one full fp32 C x D matrix "
        f"({args.dim * 4} bytes a class).\n\n"
        + C.markdown_table(columns, rows)
        + "".join(f"\n\n{n}" for n in notes)
    )
    C.report(args, MODULE, "mp_memory", "Model-parallel classifier memory per worker", headlines, body,
             info=info, started=started)


if __name__ == "__main__":
    main()
