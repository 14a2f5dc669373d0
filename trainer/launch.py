"""`imlt train --nproc-per-node N [--nnodes M ...]`: the same command again, under torchrun.

No launcher or rendezvous of our own: torch.distributed.run (torchrun) starts the processes and
sets RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT, and each process runs `imlt train` with
the arguments it was given, minus the per-node launch flags (node rank, master address and
port). `--nproc-per-node`/`--nnodes` stay: in the workers they are only what they always are,
the compute.nproc_per_node/compute.nnodes overrides, so the workers' config (and its hash)
is the one the user launched. A process torchrun started never launches again.

One node: `torchrun --standalone` (a local rendezvous on a free port). Several nodes: run the
same command on each node with its --node-rank and the node-0 --master-addr (torchrun's static
rendezvous); on Kubernetes, `imlt k8s-job` renders a TrainJob whose pods run torchrun directly.

No torch import here: the CLI imports this module before it knows whether to launch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

from imlt.trainer.config import ConfigError, RunConfig

DEFAULT_MASTER_PORT = 29500
# Flags that say where this node sits in a launch; the workers must not see them again.
NODE_FLAGS = frozenset({"node_rank", "master_addr", "master_port"})


def under_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """True in a process torchrun started (it sets RANK; a plain process has none)."""
    return "RANK" in (os.environ if environ is None else environ)


def needs_launch(cfg: RunConfig, environ: Mapping[str, str] | None = None) -> bool:
    """More than one process asked for (nnodes x nproc_per_node) and torchrun not yet running."""
    return cfg.compute.world_size > 1 and not under_torchrun(environ)


def torchrun_command(
    train_args: Sequence[str],
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    python: str = sys.executable,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """`python -m torch.distributed.run ... -m imlt.trainer.cli train TRAIN_ARGS` for this node.

    Several nodes need the node-0 address: from --master-addr or PET_MASTER_ADDR (what the
    Kubeflow operators set); without one, the error points at `imlt k8s-job`.
    """
    env = os.environ if environ is None else environ
    if nproc_per_node < 1 or nnodes < 1:
        raise ConfigError(f"--nproc-per-node ({nproc_per_node}) and --nnodes ({nnodes}) must be at least 1")
    cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc_per_node), "--nnodes", str(nnodes)]
    master_addr = master_addr or env.get("PET_MASTER_ADDR")
    if nnodes == 1 and master_addr is None:
        cmd.append("--standalone")
    else:
        if master_addr is None:
            raise ConfigError(
                f"compute.nnodes={nnodes}: a multi-node launch needs the address of node 0 on every node "
                "(`imlt train --nnodes N --node-rank R --master-addr HOST [--master-port P]`); on Kubernetes submit "
                "a Kubeflow TrainJob instead: `imlt k8s-job CONFIG` prints it"
            )
        if node_rank is None:
            node_rank = int(env.get("PET_NODE_RANK", "0"))
        if not 0 <= node_rank < nnodes:
            raise ConfigError(f"--node-rank {node_rank} must be in 0..{nnodes - 1} for --nnodes {nnodes}")
        port = master_port or int(env.get("PET_MASTER_PORT", str(DEFAULT_MASTER_PORT)))
        cmd += ["--node-rank", str(node_rank), "--master-addr", master_addr, "--master-port", str(port)]
    return [*cmd, "-m", "imlt.trainer.cli", "train", *train_args]


def run_torchrun(cmd: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """Run torchrun in the foreground and return its exit code.

    SIGTERM and SIGINT sent to this process are passed on to torchrun, which passes them to the
    workers; they checkpoint and stop (trainer.engine), so killing `imlt train` behaves like
    killing a single-process run.
    """
    env = dict(os.environ if environ is None else environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, said out loud: N processes share the cores
    proc = subprocess.Popen(list(cmd), env=env)
    if threading.current_thread() is not threading.main_thread():
        return proc.wait()

    def forward(signum: int, frame: Any) -> None:
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def cli_args(ctx: Any, drop: frozenset[str] = NODE_FLAGS) -> list[str]:
    """The options a (typer/click) command was given, as arguments again, minus `drop`.

    Rebuilt from the parsed parameters rather than sys.argv, so it is right however the command
    was invoked (`imlt train`, `python -m imlt.trainer.cli train`, a test runner). Options left at
    their defaults are left out, so a worker parses exactly what the user typed.
    """
    args: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if name in drop or not getattr(param, "opts", None) or param.opts[0][:1] != "-":
            continue
        source = ctx.get_parameter_source(name)
        if source is None or source.name == "DEFAULT":
            continue
        value = ctx.params[name]
        flag = param.opts[0]
        if param.is_flag and param.secondary_opts:
            args.append(flag if value else param.secondary_opts[0])
        elif param.is_flag:
            if value:
                args.append(flag)
        elif param.multiple:
            for item in value or ():
                args += [flag, _text(item)]
        elif value is not None:
            args += [flag, _text(value)]
    return args


def _text(value: Any) -> str:
    return str(value.value) if isinstance(value, Enum) else str(value)


def launch_train(
    cfg: RunConfig,
    train_args: Sequence[str],
    *,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> int:
    """Start `imlt train TRAIN_ARGS` on cfg.compute.nproc_per_node processes of this node; exit code."""
    cmd = torchrun_command(
        train_args,
        nproc_per_node=cfg.compute.nproc_per_node,
        nnodes=cfg.compute.nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
    )
    return run_torchrun(cmd)
