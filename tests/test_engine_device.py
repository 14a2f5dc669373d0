"""What a training process decides on its own host: its device, fp16, and DataLoader workers vs /dev/shm.

A config parses the same everywhere (a GPU pipeline's config on a CPU-only launcher or evaluate
pod); whether fp16 can run is the training process's question; evaluate picks its own device;
and a trainer under Kubernetes' default 64 MiB /dev/shm lowers its workers instead of dying.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.support.images import write_colour_dataset
from imlt.trainer.config import ConfigError, validate_config
from imlt.trainer.data.stream import batch_bytes, workers_that_fit
from imlt.trainer.engine import run_training
from imlt.trainer.steps import EvaluateInput, TrainInput

REPO = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "grey"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pipeline_defaults(name: str) -> dict:
    """A compiled pipeline's run-parameter defaults: what a run started from the UI gets."""
    from imlt.pipelines import training

    pipeline = getattr(training, name)
    return {k: v.default for k, v in pipeline.component_spec.inputs.items()}


def gpu_pipeline_config(output_dir: str) -> dict:
    """The train step's config as the GPU pipeline builds it, with fp16 on as a GPU run would have it."""
    d = pipeline_defaults("training_pipeline_gpu")
    return {
        "output_dir": output_dir,
        "data": {"image_size": d["image_size"], "reader_threads": d["reader_threads"]},
        "model": {"backbone": d["backbone"], "feature_dim": d["feature_dim"]},
        "loss": {"name": d["loss"], "weight": d["loss_weight"]},
        "optim": {"optimizer": d["optimizer"], "lr": d["lr"]},
        "train": {"batch_size": d["batch_size"], "epochs": d["epochs"], "seed": d["seed"], "fp16": True, "device": "cuda"},
        "compute": {"instance_type": d["instance_type"], "model_type": d["model_type"], "mode": d["compute_mode"]},
    }


def test_gpu_pipeline_config_parses_here_and_evaluate_runs_on_this_host(tmp_path: Path) -> None:
    from imlt.trainer import steps
    from imlt.trainer.model import build_model, save_embedding_model

    cfg = validate_config(gpu_pipeline_config(str(tmp_path / "model")))  # no CUDA needed to parse it
    assert cfg.train.fp16 and cfg.compute.instance_type == "ecs.gn5-c8g1.2xlarge"
    dataset = write_colour_dataset(tmp_path / "val", COLOURS, 2)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"num_classes": len(COLOURS)})})
    torch.manual_seed(0)
    save_embedding_model(build_model(cfg.model, cfg.data.image_size), cfg, cfg.output_dir, COLOURS)
    out = steps.evaluate(EvaluateInput(model_dir=cfg.output_dir, dataset_dir=dataset, output_dir=str(tmp_path / "metrics"),
                                       batch_size=4, reader_threads=0))
    assert 0.0 <= out.metrics["recall_at_1"] <= 1.0


def test_fp16_is_refused_by_the_training_process_on_a_cpu(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: fp16 trains here")
    dataset = write_colour_dataset(tmp_path / "data", COLOURS, 2)
    cfg = validate_config({"output_dir": str(tmp_path / "model"), "data": {"image_size": 16, "reader_threads": 0},
                           "model": {"backbone": "test_resnet", "feature_dim": 8}, "train": {"fp16": True, "epochs": 1}})
    with pytest.raises(ConfigError, match="train.fp16=true needs a CUDA device, and this process trains on cpu"):
        run_training(TrainInput(config=cfg, train_dataset=dataset))
    assert not (tmp_path / "model").exists()  # refused before anything was written


def test_fp16_with_train_device_cpu_is_refused_on_every_host() -> None:
    with pytest.raises(ConfigError, match="train.fp16=true needs a CUDA device, but train.device=cpu"):
        validate_config({"output_dir": "/x", "train": {"fp16": True, "device": "cpu"}})


def test_workers_that_fit_in_shared_memory() -> None:
    one = batch_bytes(32, 224)  # the component defaults' batch: 19 MB
    assert workers_that_fit(4, one, 64 * 2**20) == 0
    assert workers_that_fit(4, one, 512 * 2**20) == 4
    assert workers_that_fit(4, one, 256 * 2**20) == 4
    assert workers_that_fit(4, one, 160 * 2**20) == 2
    assert workers_that_fit(4, one, None) == 4 and workers_that_fit(0, one, 0) == 0


_TRAIN_UNDER_SMALL_SHM = """
import json, logging, sys, time
import torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from imlt.trainer import engine
from imlt.trainer.config import validate_config
from imlt.trainer.steps import TrainInput
step = engine.Trainer.training_step
def heavy_first_step(self, *args):
    # a real backbone's first step takes seconds, while the workers fill every prefetch slot:
    # that is when a small /dev/shm runs out (test_resnet alone is too quick to show it)
    if self.global_step == 0:
        time.sleep(2)
    return step(self, *args)
engine.Trainer.training_step = heavy_first_step
cfg = validate_config(json.loads(sys.argv[1]))
out = engine.run_training(TrainInput(config=cfg, train_dataset=sys.argv[2]))
print("EPOCHS", out.epochs_completed)
"""


def test_training_at_the_component_defaults_under_a_64_mib_dev_shm(tmp_path: Path) -> None:
    """Kubernetes' default /dev/shm: the component defaults' workers and batch need ~200 MiB of it.

    Without the trainer's check this run dies in a worker ("unable to allocate shared memory").
    """
    if os.geteuid() != 0 or not Path("/usr/bin/unshare").exists():
        pytest.skip("needs root and unshare for a private mount namespace")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64m tmpfs /dev/shm"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {probe.stderr.decode().strip()}")
    d = pipeline_defaults("training_pipeline")
    # 5 steps: without the check, 4 workers' batches in flight (4 x 19 MB) overflow 64 MiB
    dataset = write_colour_dataset(tmp_path / "data", COLOURS, 5 * d["batch_size"] // len(COLOURS))
    raw = {"output_dir": str(tmp_path / "model"),
           "data": {"image_size": d["image_size"], "reader_threads": d["reader_threads"]},
           "model": {"backbone": "test_resnet", "feature_dim": 8},
           "train": {"batch_size": d["batch_size"], "epochs": 1, "device": "cpu"}}
    import json

    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_TRAIN_UNDER_SMALL_SHM))
    cmd = f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} {script} '{json.dumps(raw)}' {dataset}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ran = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, env=env, timeout=300)
    assert ran.returncode == 0, ran.stderr[-4000:]
    assert "EPOCHS 1" in ran.stdout
    warnings = [line for line in ran.stderr.splitlines() if "/dev/shm" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], ran.stderr[-4000:]
    assert f"{d['reader_threads']} DataLoader workers" in warnings[0]


def test_threads_follow_the_cpus_this_process_really_has(tmp_path: Path) -> None:
    from imlt.trainer.device import cgroup_cpu_limit, default_threads, training_threads

    (tmp_path / "kubepods" / "pod1").mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "kubepods" / "cpu.max").write_text("400000 100000\n")
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("250000 100000\n")  # a pod limited to 2.5 CPUs
    assert cgroup_cpu_limit(str(tmp_path), "0::/kubepods/pod1\n") == 2.5
    assert cgroup_cpu_limit(str(tmp_path), "0::/\n") is None  # "max": no limit
    v1 = tmp_path / "v1" / "cpu" / "pod2"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(str(tmp_path / "v1"), "4:cpu,cpuacct:/pod2\n") == 1.5
    # 8 CPUs, 2 processes on the node, 2 loader workers each: 2 threads each; never below 1
    assert default_threads(2, 2, cpus=8) == 2 and default_threads(4, 1, cpus=2.5) == 1
    assert training_threads(3, 4) == 3  # the setting wins
    assert training_threads(None, 0, {"LOCAL_WORLD_SIZE": "2"}) == default_threads(0, 2)
