"""One rank of the distributed engine tests; tests/test_engine_distributed.py launches it with torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/engine_dist_worker.py SPEC OUT

SPEC (JSON) lists training runs; this process runs them one after another through the real
`engine.run_training`, inside one process group joined here once (starting torch costs seconds a
process, so one launch serves every test). Per run it can:
- load given full class centres into the loss (so a model-parallel run starts where a
  single-process AMSoftmax run does),
- stop on a time limit seen by one rank only, or SIGTERM one rank's own process at a step,
  then run again to resume,
and it records every step's global-batch loss. Each rank writes OUT/rank{r}.json.

BatchNorm is frozen (eval mode) in every run here and in the single-process references: on CPU,
DDP batch statistics are per rank (SyncBatchNorm needs CUDA), so with batch-statistics BN a
2-rank step normalises over half the batch and cannot equal the single-process step. Frozen BN
is a per-sample operation, which leaves everything else (sampler split, DDP averaging of model
and centres, sharded loss, gradient scaling, optimiser, checkpoints) to be compared exactly.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch

from imlt.trainer.collectives import barrier
from imlt.trainer import engine
from imlt.trainer.config import validate_config
from imlt.trainer.process_group import destroy_process_group, init_process_group
from imlt.trainer.steps import TrainInput


def freeze_batchnorm(trainer: engine.Trainer) -> None:
    trainer.model.train()
    trainer.loss_fn.train()
    for m in trainer.model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def load_centres(trainer: engine.Trainer, full: torch.Tensor) -> None:
    """The same C x D centres in either loss: AMSoftmax's matrix or this rank's rows of it."""
    with torch.no_grad():
        if hasattr(trainer.loss_fn, "classifier") and hasattr(trainer.loss_fn.classifier, "load_full_weight"):
            trainer.loss_fn.classifier.load_full_weight(full)
        else:
            trainer.loss_fn.centers.copy_(full)


def hooks(state: dict) -> dict[str, object]:
    """Replacement Trainer methods (wrapping the real ones, as tests/test_engine.py does) that drive
    and observe the real loop; the worker installs them, the single-process references too."""
    init, step = engine.Trainer.__init__, engine.Trainer.training_step

    def init_with_centres(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if state.get("centres"):
            load_centres(self, torch.load(state["centres"], weights_only=True))

    def recorded_step(self, images, labels, epoch, batch_index):
        out = step(self, images, labels, epoch, batch_index)
        state["losses"].append(float(out.total))
        state["steps"] += 1
        if state.get("sigterm_at") == state["steps"]:
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal, on this rank only
        return out

    return {"__init__": init_with_centres, "training_step": recorded_step, "set_train_mode": freeze_batchnorm}


def run_one(run: dict, rank: int, state: dict) -> dict:
    """One run_training call; returns what it produced or the error it raised."""
    state.update(losses=[], steps=0, centres=run.get("centres"), sigterm_at=None)
    limit = run.get("time_limit_steps", {}).get(str(rank))
    state["sigterm_at"] = run.get("sigterm_at_step", {}).get(str(rank))
    kwargs = {}
    if limit is not None:  # a clock that advances one second a step, on this rank only
        kwargs = {"clock": lambda: float(state["steps"]), "max_seconds": float(limit)}
    cfg = validate_config(run["config"])
    try:
        inp = TrainInput(config=cfg, train_dataset=run["dataset"], val_dataset=run.get("val_dataset"))
        result = engine.run_training(inp, **kwargs)
        return {"losses": state["losses"], "result": result.model_dump()}
    except Exception as e:  # recorded for the test to check; a worker crash would hide the others
        return {"losses": state["losses"], "error": type(e).__name__, "message": str(e), "trace": traceback.format_exc()[-3000:]}


def main(spec_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 shared cores: more threads only wait on each other
    spec = json.loads(Path(spec_path).read_text())
    env = init_process_group("cpu")  # once: run_training joins only when no group exists
    state: dict = {}
    for name, fn in hooks(state).items():
        setattr(engine.Trainer, name, fn)
    results = {run["name"]: run_one(run, env.rank, state) for run in spec["runs"]}
    results["_env"] = {"rank": env.rank, "world_size": env.world_size, "pg_alive": torch.distributed.is_initialized()}
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(results, indent=1))
    barrier()
    destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
