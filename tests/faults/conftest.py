"""Fixtures of the faults suite: tiny real data and real CLI runs (helpers in tests/support).

Every test here runs the product the way a user does (`imlt <step> ...`) and injects exactly one
fault; docs/faults.md maps each case to its test and to what the user sees. Torch uses one
thread here: the machine is shared and 2 threads crawl under contention.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import imlt, train_args
from tests.support.images import write_colour_images, write_text


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
