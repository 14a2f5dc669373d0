"""One rank of the model-parallel tests; tests/test_distributed.py launches it with torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py INPUT OUT CKPT

It reads the global batch and the full class matrix from INPUT, takes this rank's rows
of the batch and of the class matrix, runs both model-parallel losses forward and backward,
checks all_gather_with_grad, writes a sharded checkpoint to CKPT and resumes from it (one
launch: starting torch costs seconds per process), and saves everything this rank
saw to OUT/rank{r}.pt. The test compares those files with single-process computations.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from imlt.trainer.checkpoint import load_sharded, save_sharded
from imlt.trainer.collectives import all_gather_rows, all_gather_with_grad, barrier
from imlt.trainer.losses import ModelParallelAMSoftmax, ModelParallelSoftmax, ShardedClassifier
from imlt.trainer.process_group import destroy_process_group, init_process_group


def _local_rows(n_per_rank: list[int], rank: int) -> slice:
    start = sum(n_per_rank[:rank])
    return slice(start, start + n_per_rank[rank])


def compute(inp_path: str, out_dir: str, ckpt_dir: str) -> None:
    env = init_process_group("cpu")
    inp = torch.load(inp_path, weights_only=True)
    rows = _local_rows(inp["n_per_rank"], env.rank)
    num_classes, dim = inp["weight"].shape
    result: dict[str, object] = {"rank": env.rank, "world_size": env.world_size, "losses": {}}

    for dtype_name in ("float64", "float32"):
        dtype = getattr(torch, dtype_name)
        for kind in ("softmax", "amsoftmax"):
            if kind == "softmax":
                loss_fn = ModelParallelSoftmax(num_classes, dim, env, scale=inp["softmax_scale"])
            else:
                loss_fn = ModelParallelAMSoftmax(num_classes, dim, env, margin=inp["margin"], scale=inp["scale"])
            loss_fn = loss_fn.to(dtype)
            loss_fn.classifier.load_full_weight(inp["weight"].to(dtype))
            emb = inp["embeddings"][rows].to(dtype).clone().requires_grad_(True)
            loss = loss_fn(emb, inp["labels"][rows]).total
            loss.backward()
            result["losses"][(kind, dtype_name)] = {
                "loss": loss.detach(),
                "grad_embeddings": emb.grad.detach(),
                "grad_shard": loss_fn.classifier.weight.grad.detach(),
                "start": loss_fn.classifier.start,
                "end": loss_fn.classifier.end,
            }

    # all_gather_with_grad: each rank weights the gathered rows differently, so the objective is
    # the sum over ranks of different terms and a row's gradient collects every rank's weights.
    x = inp["embeddings"][rows].clone().requires_grad_(True)
    gathered = all_gather_with_grad(x)
    (gathered * inp["gather_weights"][env.rank]).sum().backward()
    result["gathered"] = gathered.detach()
    result["gather_grad"] = x.grad.detach()

    emb_all, lab_all = all_gather_rows(inp["embeddings"][rows]), all_gather_rows(inp["labels"][rows])
    result["eval_embeddings"], result["eval_labels"] = emb_all, lab_all

    classifier = ShardedClassifier(num_classes, dim, env)
    classifier.load_full_weight(inp["weight"].float())
    state = {
        "classifier": classifier.state_dict(),
        "model": {"backbone.w": inp["embeddings"].float()},
        "epoch": 3,
    }
    save_sharded(state, ckpt_dir, env)
    # resume: every rank reads back the replicated part and its own shard
    result["resumed"] = load_sharded(ckpt_dir, env)
    result["is_main"] = env.is_main
    torch.save(result, Path(out_dir) / f"rank{env.rank}.pt")
    barrier()
    destroy_process_group()


if __name__ == "__main__":
    compute(*sys.argv[1:])
