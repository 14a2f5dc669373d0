"""Which device, and how many CPU threads, a process computes with: decided by that process on its host.

A config names a wish (`auto`, `cpu`, `cuda`); whether it can be met is a fact of the host that
runs the step, so it is checked here, at run time, never while a config is parsed: the CPU
launcher of a GPU job and the evaluate pod read the same config as the GPU trainer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from imlt.trainer.config import ConfigError, Device

if TYPE_CHECKING:
    import torch


def resolve_device(choice: Device | str = Device.AUTO) -> torch.device:
    """`auto`: CUDA when this host has it, else the CPU; `cuda` without CUDA here is an error."""
    import torch

    choice = Device(choice)
    if choice == Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == Device.CUDA and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available here; use auto or cpu")
    return torch.device(choice.value)


def check_fp16(device: torch.device, amp_dtype: str = "float16") -> None:
    """Mixed precision (train.fp16) runs on CUDA only, bfloat16 only where the GPU has it: refuse it elsewhere, clearly."""
    if device.type != "cuda":
        raise ConfigError(
            f"train.fp16=true needs a CUDA device, and this process trains on {device.type} "
            "(no GPU usable here); set train.fp16=false, or run the training step on a GPU node"
        )
    import torch

    if amp_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"train.amp_dtype=bfloat16, but {torch.cuda.get_device_name(device)} has no bfloat16 support; "
            "use train.amp_dtype=float16 (with loss scaling)"
        )


# --- CPU threads: from the CPUs this process really has ----------------------------------------------

CGROUP_ROOT = "/sys/fs/cgroup"


def _cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """(cgroup v2 path, cgroup v1 cpu-controller path) of this process from /proc/self/cgroup's text."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: str = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The CPU limit (in CPUs) of this process's cgroup and its ancestors, or None when unlimited.

    Kubernetes turns a pod's CPU limit into a CFS quota: cgroup v2 `cpu.max` ("quota period" or
    "max ..."), cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none). os.cpu_count()
    sees the node's cores instead, which is why torch's default oversubscribes a pod.
    """
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    v2, v1 = _cgroup_paths(proc_cgroup)
    limits: list[float] = []

    def walk(base: Path, rel: str) -> list[Path]:
        parts = [p for p in rel.strip("/").split("/") if p]
        return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]

    if v2 is not None:
        for folder in walk(Path(root), v2):
            text = _read(folder / "cpu.max")
            if text and not text.startswith("max"):
                quota, _, period = text.partition(" ")
                limits.append(int(quota) / int(period or 100000))
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = Path(root) / name
        if v1 is None or not base.is_dir():
            continue
        for folder in walk(base, v1):
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota and period and int(quota) > 0:
                limits.append(int(quota) / int(period))
        break
    return min(limits) if limits else None


def available_cpus() -> float:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU limit."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(cpus, limit) if limit is not None else cpus


def default_threads(workers: int, processes_on_node: int = 1, cpus: float | None = None) -> int:
    """Intra-op threads for one training process: its share of the node's CPUs, minus its loader workers."""
    cpus = available_cpus() if cpus is None else cpus
    return max(1, int(cpus / max(processes_on_node, 1)) - workers)


def training_threads(threads: int | None, workers: int, environ: Mapping[str, str] | None = None) -> int:
    """train.threads, or by default this process's share of its CPUs minus its DataLoader workers.

    The processes on this node (torchrun's LOCAL_WORLD_SIZE) share the CPUs: each takes its part.
    """
    if threads:
        return threads
    env = os.environ if environ is None else environ
    return default_threads(workers, int(env.get("LOCAL_WORLD_SIZE", "1")))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for a block, then put back (a library call leaves the caller's as they were)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
