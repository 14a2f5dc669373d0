"""Which device a process computes on, decided by that process on its own host.

A config names a wish (`auto`, `cpu`, `cuda`); whether it can be met is a fact of the host that
runs the step, so it is checked here, at run time, never while a config is parsed: the CPU
launcher of a GPU job and the evaluate pod read the same config as the GPU trainer.
"""

from __future__ import annotations

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


def check_fp16(device: torch.device) -> None:
    """Mixed precision with loss scaling (train.fp16) runs on CUDA only: refuse it elsewhere, clearly."""
    if device.type != "cuda":
        raise ConfigError(
            f"train.fp16=true needs a CUDA device, and this process trains on {device.type} "
            "(no GPU usable here); set train.fp16=false, or run the training step on a GPU node"
        )
