"""GPU check of the evaluation search, for a maintainer with one CUDA GPU; runs unattended.

    python -m benchmarks.eval_gpu            # 100k and 1M x 512, 30,000 sampled queries each

Runs benchmarks.eval_scale with --device cuda: the same sampled queries are evaluated by torch
on the GPU (fp16 candidates, exact fp32 re-ranking, fp32 fallback for uncertified rows) and by
faiss on the CPU; the metrics must agree within 1e-6 (exit 1 otherwise). Times, memory and the
agreement go to the eval_gpu section of benchmarks/RESULTS.md. Extra arguments are passed on
(e.g. --sizes 100000 --queries 5000 for a quick look).
"""

from __future__ import annotations

import sys


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks.eval_gpu: torch sees no CUDA device; run it on a GPU machine")
    from benchmarks import eval_scale

    extra = sys.argv[1:]
    defaults = [] if "--queries" in extra else ["--queries", "30000"]
    sys.argv = [sys.argv[0], "--device", "cuda", *defaults, *extra]
    eval_scale.main()


if __name__ == "__main__":
    main()
