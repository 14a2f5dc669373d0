"""Where this process sits in a training job, and joining or leaving the job's process group.

Rank, world size and rendezvous come from the variables torchrun sets (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so a bare `torchrun -m ...` works locally and inside a
Kubeflow Trainer pod (which sets the PET_* variables torchrun reads). Nothing here touches a
process group at import time, and the module imports torch only inside its functions: the CLI
asks `DistEnv` whether it is rank 0 before it knows whether it will train.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch


class DistEnv(BaseModel):
    """Where this process sits in the job. A missing WORLD_SIZE means a single process."""

    model_config = ConfigDict(frozen=True)

    rank: int = Field(0, ge=0, description="Global rank (RANK)")
    local_rank: int = Field(0, ge=0, description="Rank on this node (LOCAL_RANK); picks the GPU")
    world_size: int = Field(1, gt=0, description="Number of processes (WORLD_SIZE)")
    master_addr: str | None = Field(None, description="Rendezvous host (MASTER_ADDR)")
    master_port: int | None = Field(None, description="Rendezvous port (MASTER_PORT)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        if world > 1 and "RANK" not in env:
            raise RuntimeError(
                f"WORLD_SIZE={world} but RANK is not set: start the workers with torchrun "
                "(e.g. `torchrun --nproc-per-node 2 ...`), which sets RANK, LOCAL_RANK and MASTER_ADDR/PORT"
            )
        rank = int(env.get("RANK", "0"))
        if rank >= world:
            raise RuntimeError(f"RANK={rank} is not below WORLD_SIZE={world}")
        port = env.get("MASTER_PORT")
        return cls(
            rank=rank,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=world,
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(port) if port else None,
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 (or a single process): the one process that logs, prints and writes shared files."""
        return self.rank == 0


def init_process_group(device: str | torch.device = "cpu", environ: Mapping[str, str] | None = None) -> DistEnv:
    """Join the job's process group (nccl on CUDA, gloo on CPU); a single process joins nothing.

    Idempotent: a second call returns the environment without re-initialising.
    """
    import torch
    import torch.distributed as dist

    env = DistEnv.from_env(environ)
    if not env.distributed or dist.is_initialized():
        return env
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size)
    return env


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(env: DistEnv, device: str | torch.device) -> torch.device:
    """The device this rank computes on: cuda:LOCAL_RANK for CUDA, else the device as given."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", env.local_rank)
    return device
