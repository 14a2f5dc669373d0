"""How a run computes: its processes (checked against torchrun's), its process group, its wrapping.

Several processes (torchrun; `imlt train --nproc-per-node N` starts it, see trainer.launch):
`run_training` joins the job's process group (gloo on CPU, nccl on cuda:LOCAL_RANK) for the run
and leaves it after (`distributed_session`); nothing joins one at import. Rank and world size
come from the variables torchrun sets, so a bare `torchrun -m imlt.trainer.cli train ...` in a
Kubeflow Trainer pod works unchanged. `compute.nnodes x compute.nproc_per_node` must equal
WORLD_SIZE (a default 1 x 1 config takes torchrun's shape; `resolve_compute`).

Wrapping (`wrap_objective`): data-parallel is DistributedDataParallel over one module holding
the embedding model and the loss (class centres), so both are averaged. Model-parallel: the
class centres are sharded by class (trainer.losses.sharded_classifier); only the embedding model
is in DDP, and because the sharded loss is replicated (every rank holds the whole global-batch
loss) the backbone's true gradient is the sum over ranks, so the loop multiplies its
DDP-averaged gradient by the world size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from imlt.trainer.config import ComputeMode, ConfigError, ModelType, RunConfig
from imlt.trainer.device import resolve_device
from imlt.trainer.launch import under_torchrun
from imlt.trainer.process_group import DistEnv, destroy_process_group, init_process_group

log = logging.getLogger(__name__)


def resolve_compute(cfg: RunConfig, environ: dict[str, str] | None = None) -> RunConfig:
    """The config with compute.nnodes/nproc_per_node agreeing with the processes actually running.

    Refuses, rather than quietly training in one process, a config that asks for several
    processes (compute.mode=distributed, or nnodes x nproc_per_node > 1) in a process torchrun did
    not start: a KFP/Airflow task or a plain `python` call. Under torchrun, a default 1 x 1 config
    takes torchrun's shape (a bare `torchrun --nproc-per-node 2 -m imlt.trainer.cli train ...`); any
    other disagreement with WORLD_SIZE is an error, because the config names the run (its hash
    guards resume) and its usage record.
    """
    env = os.environ if environ is None else environ
    c = cfg.compute
    if not under_torchrun(env):
        if c.mode == ComputeMode.DISTRIBUTED:
            raise ConfigError(
                f"compute.mode=distributed (nnodes={c.nnodes}, nproc_per_node={c.nproc_per_node}) runs under torchrun on "
                "every node, and this process was not started by torchrun (no RANK in its environment); it will not "
                "train standalone. On Kubernetes submit it as a Kubeflow TrainJob: `imlt k8s-job CONFIG` prints the "
                "manifest (the KFP and Airflow train steps submit it for you); by hand, run `imlt train --config CONFIG "
                "--nnodes N --node-rank R --master-addr HOST` on each node"
            )
        if c.world_size > 1:
            raise ConfigError(
                f"compute.nproc_per_node={c.nproc_per_node} x compute.nnodes={c.nnodes} asks for {c.world_size} "
                "processes, but this one was not started by torchrun; run `imlt train --nproc-per-node "
                f"{c.nproc_per_node} ...` (it starts torchrun) or `torchrun --nproc-per-node {c.nproc_per_node} "
                "-m imlt.trainer.cli train ...`, or set compute.nproc_per_node=1"
            )
        return cfg
    world = int(env.get("WORLD_SIZE", "1"))
    if c.world_size == world:
        return cfg
    if c.world_size == 1:
        per_node = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        nnodes = max(world // max(per_node, 1), 1)
        mode = ComputeMode.DISTRIBUTED if nnodes > 1 else c.mode
        if env.get("RANK") == "0":
            log.info("compute: torchrun started %d x %d processes; recording that in the run's config", nnodes, per_node)
        compute = c.model_copy(update={"nproc_per_node": per_node, "nnodes": nnodes, "mode": mode})
        return cfg.model_copy(update={"compute": compute})
    raise ConfigError(
        f"compute.nnodes x compute.nproc_per_node = {c.nnodes} x {c.nproc_per_node} = {c.world_size}, but torchrun "
        f"started WORLD_SIZE={world} processes; make the config and the launch agree "
        "(`imlt train --nproc-per-node N --nnodes M` sets both)"
    )


@contextlib.contextmanager
def distributed_session(cfg: RunConfig, environ: dict[str, str] | None = None) -> Iterator[DistEnv]:
    """This process's place in the job, with the process group joined for the run (if several).

    Leaves the group afterwards only if it joined it here, so a caller that set one up (a test
    running several trainings in one launch) keeps it.
    """
    env = DistEnv.from_env(environ)
    if not env.distributed:
        yield env
        return
    import torch.distributed as dist

    joined = not dist.is_initialized()
    init_process_group(resolve_device(cfg.train.device), environ)
    try:
        yield env
    finally:
        if joined:
            destroy_process_group()


class Objective(nn.Module):
    """Embedding model and loss as one module: what DistributedDataParallel wraps (data-parallel)
    so the class centres are averaged with the backbone. Returns plain tensors, not LossOutput,
    because DDP walks a forward's output for tensors."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, device_type: str, amp_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.device_type, self.amp_dtype = device_type, amp_dtype

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=self.device_type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            embeddings = self.model(images)
        out = self.loss_fn(embeddings, labels)
        return out.total, out.metric, out.classification


def wrap_objective(model: nn.Module, loss_fn: nn.Module, cfg: RunConfig, device: torch.device, world_size: int) -> nn.Module:
    """The one place modules get wrapped: the `objective(images, labels)` training_step calls.

    Data-parallel: DDP over model and loss together. Model-parallel: DDP over the model only;
    the class shards differ per rank and must stay out of DDP's averaging and broadcast.
    `model` and `loss_fn` stay the bare modules (state dicts, saving).
    """
    kind = device.type
    amp = getattr(torch, cfg.train.amp_dtype.value) if cfg.train.fp16 else None
    if world_size == 1:
        return Objective(model, loss_fn, kind, amp)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if kind == "cuda" else None
    if cfg.compute.model_type == ModelType.MODEL_PARALLEL:
        return Objective(DDP(model, device_ids=ids), loss_fn, kind, amp)
    return DDP(Objective(model, loss_fn, kind, amp), device_ids=ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The bare module inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)


def usage_record(wall_seconds: float, cfg: RunConfig, device: torch.device, world_size: int) -> dict[str, Any]:
    """Billing-style usage (usage.json): each process is an instance billed in whole minutes, rounded up."""
    cuda = device.type == "cuda"
    return {
        "instance_minutes": math.ceil(wall_seconds / 60.0) * world_size,
        "wall_seconds": round(wall_seconds, 3),
        "processes": world_size,
        "nnodes": cfg.compute.nnodes,
        "nproc_per_node": cfg.compute.nproc_per_node,
        "device": device.type,
        "gpu_type": torch.cuda.get_device_name(device) if cuda else cfg.compute.gpu_type,
        "gpu_count": world_size if cuda else 0,
        "instance_type": cfg.compute.instance_type,
    }


@contextlib.contextmanager
def sigterm_flag(on_term: Callable[[], None]) -> Iterator[None]:
    """While the block runs, SIGTERM (Kubernetes eviction, Airflow kill) only calls `on_term`.

    The loop checks the flag it sets at step boundaries, so a checkpoint is written before it stops.
    Outside the main thread nothing is installed: signal handlers can only be set there.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: on_term())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
