"""Shared parts of the faults suite: tiny real data, the real CLI (in-process and as a subprocess).

Every test here runs the product the way a user does (`imlt <step> ...`) and injects exactly one
fault; docs/faults.md maps each case to its test and to what the user sees.

Speed: 16 px images, a handful per class, and timm's `test_resnet` (a 0.37 M-parameter timm
ResNet: the same code path as resnet18, about 4x faster at this size). Torch uses one thread
here and in subprocesses (OMP_NUM_THREADS=1): the machine is shared and 2 threads crawl under
contention.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.colour_data import RGB, noisy_colour

REPO = Path(__file__).resolve().parents[2]
BACKBONE = "test_resnet"
IMAGE_SIZE = 16
COLOURS = {name: RGB[name] for name in ("red", "green", "blue", "grey")}
PER_CLASS = 6  # 24 images, batch 8: 3 steps per epoch
STEPS_PER_EPOCH = 3


# --- the CLI ----------------------------------------------------------------------------------------


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


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    if "torch" not in sys.modules:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- data ----------------------------------------------------------------------------------------------


def png_bytes(rgb: tuple[int, int, int], seed: int, size: int = IMAGE_SIZE, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    img = noisy_colour(rgb, np.random.default_rng(seed), size)
    if mode == "I;16":  # 16-bit greyscale, as scanners and medical imaging write
        img = Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257))
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


# One image of each class is stored in a mode other than 8-bit RGB: training converts, never fails.
ODD_MODES = [("L", "PNG", ".png"), ("RGBA", "PNG", ".png"), ("I;16", "PNG", ".png"), ("CMYK", "JPEG", ".jpg")]


def write_colour_images(root: Path, per_class: int = PER_CLASS) -> list[str]:
    """Colour classes with noise (learnable in a few steps); returns ImageList lines relative to root."""
    lines = []
    for c, (name, rgb) in enumerate(COLOURS.items()):
        for i in range(per_class):
            mode, fmt, ext = ODD_MODES[c] if i == 0 else ("RGB", "PNG", ".png")
            rel = f"images/{name}_{i}{ext}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(png_bytes(rgb, seed=c * 100 + i, mode=mode, fmt=fmt))
            lines.append(f"{rel} {name}")
    return lines


def write_text(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with images/ and train.txt (24 lines, 4 colour classes, one odd image mode each)."""
    root = tmp_path_factory.mktemp("colours")
    write_text(root / "train.txt", "\n".join(write_colour_images(root)) + "\n")
    return root


@pytest.fixture(scope="session")
def dataset(colour_data: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """read-data output of colour_data (a real `imlt read-data` run)."""
    out = tmp_path_factory.mktemp("dataset") / "ds"
    ran = imlt("read-data", "--annotations", colour_data / "train.txt", "--output-dir", out)
    assert ran.exit_code == 0, ran.output
    return str(out)


def train_args(dataset: str, output_dir: str | Path, epochs: int = 2, *extra: str) -> list[str]:
    return ["train", "--train-dataset", dataset, "--output-dir", str(output_dir), "--backbone", BACKBONE,
            "--image-size", str(IMAGE_SIZE), "--feature-dim", "16", "--batch-size", "8", "--epochs", str(epochs),
            "--reader-threads", "0", "--device", "cpu", "--lr", "0.05", "--seed", "3", *extra]


@pytest.fixture(scope="session")
def trained(dataset: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(model_dir, metrics_dir) of a real 1-epoch `imlt train` and `imlt evaluate` run."""
    root = tmp_path_factory.mktemp("trained")
    import torch

    torch.set_num_threads(1)
    ran = imlt(*train_args(dataset, root / "model", 1))
    assert ran.exit_code == 0, ran.output
    ran = imlt("evaluate", "--model-dir", root / "model", "--dataset-dir", dataset, "--output-dir", root / "metrics",
               "--reader-threads", "0")
    assert ran.exit_code == 0, ran.output
    return str(root / "model"), str(root / "metrics")


def ckpt_dir(output_dir: str | Path) -> Path:
    """Where a run's checkpoints go by default: the model folder's sibling, not inside it."""
    return Path(f"{output_dir}-checkpoints")


def kept(history: list) -> list[str]:
    """The epoch checkpoints a run keeps by default: its last epoch's and its best (lowest loss) epoch's."""
    losses = [h["loss"] for h in history]
    return sorted({f"epoch-{len(losses):04d}.ckpt", f"epoch-{1 + losses.index(min(losses)):04d}.ckpt"})


def checkpoints(output_dir: str | Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir(output_dir).glob("*.ckpt"))
