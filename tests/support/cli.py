"""The real CLI, in-process and as a subprocess, and the tiny training set-up the faults suite runs.

Speed: 16 px images, a handful per class, and timm's `test_resnet` (a 0.37 M-parameter timm
ResNet: the same code path as resnet18, about 4x faster at this size). Subprocesses use one torch
thread (OMP_NUM_THREADS=1): the machine is shared and 2 threads crawl under contention.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imlt.trainer.checkpoint import CHECKPOINTS_SUFFIX

REPO = Path(__file__).resolve().parents[2]
BACKBONE = "test_resnet"
IMAGE_SIZE = 16
PER_CLASS = 6  # 4 colour classes: 24 images, batch 8: 3 steps per epoch
STEPS_PER_EPOCH = 3


@dataclass
class Ran:
    exit_code: int
    output: str  # stdout and stderr as the user sees them
    exception: BaseException | None = None

    def json(self) -> Any:
        """The step's JSON result: the last object starting on a line holding only '{' (log lines may follow)."""
        lines = self.output.splitlines()
        start = max(i for i, line in enumerate(lines) if line == "{")
        return json.JSONDecoder().raw_decode("\n".join(lines[start:]))[0]


def imlt(*args: str) -> Ran:
    """Run `imlt ARGS` in this process (typer's runner); output is not wrapped at 80 columns."""
    from typer.testing import CliRunner

    from imlt.trainer import cli

    soft = cli.console.soft_wrap
    cli.console.soft_wrap = True  # as on a wide terminal: messages keep their lines for the asserts
    try:
        result = CliRunner().invoke(cli.app, [str(a) for a in args], catch_exceptions=True)
    finally:
        cli.console.soft_wrap = soft
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return Ran(result.exit_code, result.output, exc)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "1000",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra)
    return env


def imlt_cmd(*args: str, prelude: str = "") -> list[str]:
    """A real `imlt` process; `prelude` is Python run first (e.g. a resource limit or DEBUG logging)."""
    code = f"{prelude}\nimport sys\nfrom imlt.trainer.cli import app\nsys.argv[0] = 'imlt'\napp()"
    return [sys.executable, "-c", code, *[str(a) for a in args]]


def run_imlt(*args: str, env: dict[str, str] | None = None, prelude: str = "", timeout: float = 300) -> Ran:
    proc = subprocess.run(imlt_cmd(*args, prelude=prelude), env=env or subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)
    return Ran(proc.returncode, proc.stdout + proc.stderr)


def train_args(dataset: str, output_dir: str | Path, epochs: int = 2, *extra: str) -> list[str]:
    return ["train", "--train-dataset", dataset, "--output-dir", str(output_dir), "--backbone", BACKBONE,
            "--image-size", str(IMAGE_SIZE), "--feature-dim", "16", "--batch-size", "8", "--epochs", str(epochs),
            "--reader-threads", "0", "--device", "cpu", "--lr", "0.05", "--seed", "3", *extra]


def ckpt_dir(output_dir: str | Path) -> Path:
    """Where a run's checkpoints go by default: the model folder's sibling, not inside it."""
    return Path(f"{output_dir}{CHECKPOINTS_SUFFIX}")


def kept(history: list) -> list[str]:
    """The epoch checkpoints a run keeps by default: its last epoch's and its best (lowest loss) epoch's."""
    losses = [h["loss"] for h in history]
    return sorted({f"epoch-{len(losses):04d}.ckpt", f"epoch-{1 + losses.index(min(losses)):04d}.ckpt"})


def checkpoints(output_dir: str | Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir(output_dir).glob("*.ckpt"))
