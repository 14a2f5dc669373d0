"""The CLI's face: help readable at 80 columns, `imlt run --help` describing the run file, and
the commented example run file working on the demo's data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from imlt.trainer import cli

REPO = Path(__file__).resolve().parents[1]
COMMANDS = sorted(typer.main.get_command(cli.app).commands)


def _help(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "imlt.trainer.cli", *args, "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_shows_every_option_name_in_full_at_80_columns() -> None:
    group = typer.main.get_command(cli.app)
    for name in COMMANDS:
        text = _help(name)
        assert "…" not in text, f"imlt {name} --help truncates:\n{text}"
        for param in group.commands[name].params:
            for opt in getattr(param, "opts", []) + getattr(param, "secondary_opts", []):
                if opt.startswith("--"):
                    assert opt in text, f"imlt {name} --help does not show {opt}"


def test_run_help_describes_the_sections() -> None:
    text = _help("run")
    for section in ("workdir:", "publish:", "destination", "min_recall_at_1", "data:", "model:", "loss:", "optim:",
                    "train:", "compute:", "examples/run.yaml"):
        assert section in text, section


def test_read_data_does_not_print_the_class_list(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tests.support.images import CLASSES, write_split

    ann = write_split(tmp_path / "data", "train", per_class=2)
    ran = CliRunner().invoke(cli.app, ["read-data", "--output-dir", str(tmp_path / "ds"), "--annotations", str(ann)])
    assert ran.exit_code == 0, ran.output
    assert '"num_classes": 4' in ran.output and f'"{CLASSES[0]}"' not in ran.output


def test_example_run_file_matches_what_the_demo_writes(tmp_path: Path) -> None:
    """examples/run.yaml is valid and reads exactly the files `imlt demo --data-only` writes."""
    from imlt.trainer.pipeline import PipelineConfig

    pc = PipelineConfig.from_file(str(REPO / "examples" / "run.yaml"))
    data = pc.run.data
    written = {"demo-output/data/" + name for name in ("train.txt", "val.txt", "train_classes.txt", "val_classes.txt")}
    assert {data.train_annotations, data.val_annotations, data.class_names[0], data.val_class_names[0]} == written


@pytest.mark.slow
def test_imlt_run_on_the_example_file(tmp_path: Path) -> None:
    """`imlt demo --data-only` then `imlt run examples/run.yaml` (one epoch: the file's other settings)."""
    from imlt.trainer.data.synthetic import generate_glyphs

    generate_glyphs(tmp_path / "demo-output" / "data", train_per_class=6, val_per_class=4, image_size=32)
    text = (REPO / "examples" / "run.yaml").read_text().replace("epochs: 3", "epochs: 1")
    (tmp_path / "run.yaml").write_text(text)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "imlt.trainer.cli", "run", "run.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recall_at_1" in proc.stderr and "Model published:" in proc.stderr
    assert (tmp_path / "demo-output" / "run" / "published" / "v1" / "model_card.json").exists()

    # the same folder with other settings: refused naming the field, then started over with --no-resume
    (tmp_path / "run.yaml").write_text(text.replace("epochs: 1", "epochs: 2"))
    refused = subprocess.run([sys.executable, "-m", "imlt.trainer.cli", "run", "run.yaml"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "train.epochs: 1 -> 2" in refused.stderr, refused.stderr[-3000:]
    again = subprocess.run([sys.executable, "-m", "imlt.trainer.cli", "run", "run.yaml", "--no-resume"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "demo-output" / "run" / "published" / "v2" / "model_card.json").exists()
